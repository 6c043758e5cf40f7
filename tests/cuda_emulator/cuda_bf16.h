#pragma once
#include <cstdint>
#include <cstring>
#include <cmath>
struct __nv_bfloat16 { uint16_t bits; };
inline float __bfloat162float(__nv_bfloat16 h) { uint32_t u = static_cast<uint32_t>(h.bits) << 16; float f; std::memcpy(&f, &u, 4); return f; }
inline __nv_bfloat16 __float2bfloat16_rn(float v) {
  uint32_t u; std::memcpy(&u, &v, 4);
  __nv_bfloat16 h;
  if (std::isnan(v)) { h.bits = 0x7fc0; return h; }
  const uint32_t rounding = 0x7fffu + ((u >> 16) & 1u);
  h.bits = static_cast<uint16_t>((u + rounding) >> 16);
  return h;
}

// Python bindings: pointers travel as integers (tensor.data_ptr()), so this module never links torch.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <cstdint>

#include "cpu/fv_accumulate_cpu.h"
#ifdef FVK_WITH_CUDA
#include "cuda/fv_accumulate_cuda.h"
#endif

namespace py = pybind11;
using fvk::FVAccumulateArgs;
using fvk::FVAccumulateBackwardArgs;

namespace {

template <class Struct, typename Ptr>
void def_pointer(py::class_<Struct>& cls, const char* name, Ptr Struct::*field) {
  cls.def_property(
      name, [field](const Struct& a) { return reinterpret_cast<std::uintptr_t>(a.*field); },
      [field](Struct& a, std::uintptr_t address) { a.*field = reinterpret_cast<Ptr>(address); });
}

template <std::size_t Rank>
void def_strides(py::class_<FVAccumulateArgs>& cls, const char* name, int64_t (FVAccumulateArgs::*field)[Rank]) {
  cls.def_property(
      name,
      [field](const FVAccumulateArgs& a) {
        std::array<int64_t, Rank> s;
        for (std::size_t i = 0; i < Rank; ++i) s[i] = (a.*field)[i];
        return s;
      },
      [field](FVAccumulateArgs& a, const std::array<int64_t, Rank>& s) {
        for (std::size_t i = 0; i < Rank; ++i) (a.*field)[i] = s[i];
      });
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "fvkernels compiled kernels (framework-agnostic: raw pointers and strides)";

  py::enum_<fvk::DType>(m, "DType")
      .value("float32", fvk::DType::Float32)
      .value("float64", fvk::DType::Float64)
      .value("bfloat16", fvk::DType::BFloat16)
      .value("float16", fvk::DType::Float16);

  py::class_<FVAccumulateArgs> args(m, "FVAccumulateArgs");
  args.def(py::init<>())
      .def_readwrite("num_sets", &FVAccumulateArgs::num_sets)
      .def_readwrite("set_size", &FVAccumulateArgs::set_size)
      .def_readwrite("channels", &FVAccumulateArgs::channels)
      .def_readwrite("latent", &FVAccumulateArgs::latent)
      .def_readwrite("dtype", &FVAccumulateArgs::dtype)
      .def_readwrite("out_stride_n", &FVAccumulateArgs::out_stride_n)
      .def_readwrite("signed_sqrt", &FVAccumulateArgs::signed_sqrt)
      .def_readwrite("workspace_floats", &FVAccumulateArgs::workspace_floats);
  def_pointer(args, "z", &FVAccumulateArgs::z);
  def_pointer(args, "x", &FVAccumulateArgs::x);
  def_pointer(args, "x_scale", &FVAccumulateArgs::x_scale);
  def_pointer(args, "dec_weight", &FVAccumulateArgs::dec_weight);
  def_pointer(args, "dec_bias", &FVAccumulateArgs::dec_bias);
  def_pointer(args, "inv_sigma2", &FVAccumulateArgs::inv_sigma2);
  def_pointer(args, "fisher_rsqrt", &FVAccumulateArgs::fisher_rsqrt);
  def_pointer(args, "lengths", &FVAccumulateArgs::lengths);
  def_pointer(args, "out", &FVAccumulateArgs::out);
  def_pointer(args, "row_sumsq", &FVAccumulateArgs::row_sumsq);
  def_pointer(args, "workspace", &FVAccumulateArgs::workspace);
  def_strides(args, "z_stride", &FVAccumulateArgs::z_stride);
  def_strides(args, "x_stride", &FVAccumulateArgs::x_stride);
  def_strides(args, "x_scale_stride", &FVAccumulateArgs::x_scale_stride);
  def_strides(args, "w_stride", &FVAccumulateArgs::w_stride);

  py::class_<FVAccumulateBackwardArgs> backward_args(m, "FVAccumulateBackwardArgs");
  backward_args.def(py::init<>())
      .def_readwrite("forward", &FVAccumulateBackwardArgs::forward)
      .def_readwrite("grad_out_stride_n", &FVAccumulateBackwardArgs::grad_out_stride_n);
  def_pointer(backward_args, "grad_out", &FVAccumulateBackwardArgs::grad_out);
  def_pointer(backward_args, "grad_z", &FVAccumulateBackwardArgs::grad_z);
  def_pointer(backward_args, "grad_x", &FVAccumulateBackwardArgs::grad_x);
  def_pointer(backward_args, "grad_x_scale", &FVAccumulateBackwardArgs::grad_x_scale);
  def_pointer(backward_args, "grad_weight", &FVAccumulateBackwardArgs::grad_weight);
  def_pointer(backward_args, "grad_bias", &FVAccumulateBackwardArgs::grad_bias);
  def_pointer(backward_args, "grad_inv_sigma2", &FVAccumulateBackwardArgs::grad_inv_sigma2);

  // The GIL is released: the kernels only touch the memory the pointers name.
  m.def("fv_accumulate_cpu", &fvk::fv_accumulate_cpu, py::arg("args"), py::arg("num_threads") = 0,
        py::call_guard<py::gil_scoped_release>());
  m.def("fv_accumulate_backward_cpu", &fvk::fv_accumulate_backward_cpu, py::arg("args"), py::arg("num_threads") = 0,
        py::call_guard<py::gil_scoped_release>());
  m.def("cpu_kernel_isa", &fvk::cpu_kernel_isa);
  m.def(
      "advise_huge_pages",
      [](std::uintptr_t address, int64_t bytes) { fvk::advise_huge_pages(reinterpret_cast<void*>(address), bytes); },
      py::arg("address"), py::arg("bytes"));
  m.def("cpu_bf16_kernel_available", &fvk::bf16_kernel_available);

#ifdef FVK_WITH_CUDA
  m.def(
      "fv_accumulate_cuda",
      [](const FVAccumulateArgs& a, std::uintptr_t stream) {
        fvk::fv_accumulate_cuda(a, reinterpret_cast<void*>(stream));
      },
      py::arg("args"), py::arg("stream") = 0, py::call_guard<py::gil_scoped_release>());
  m.def("fv_accumulate_cuda_workspace_floats", &fvk::fv_accumulate_cuda_workspace_floats, py::arg("args"));
  m.def(
      "fv_accumulate_backward_cuda",
      [](const FVAccumulateBackwardArgs& a, std::uintptr_t stream) {
        fvk::fv_accumulate_backward_cuda(a, reinterpret_cast<void*>(stream));
      },
      py::arg("args"), py::arg("stream") = 0, py::call_guard<py::gil_scoped_release>());
  m.def("fv_accumulate_backward_cuda_supported", &fvk::fv_accumulate_backward_cuda_supported, py::arg("args"));
  m.attr("built_with_cuda") = true;
#else
  m.attr("built_with_cuda") = false;
#endif
}

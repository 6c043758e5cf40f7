"""fv_vae_encode against a plain transcription of DESIGN §1, and the official release's format (§3)."""
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fvkernels import fv_vae_encode, load_official_weights, to_official_layout
from fvkernels.pipeline import encode

from tests.helpers import cpu_backends, random_params, relative_error, write_official_mat

BACKENDS = cpu_backends()


def encode_by_the_book(acts, params, lengths=None, normalize=True):
    """DESIGN §1 steps 1–8 one set at a time, in float64, no shortcuts."""
    params = params.to(torch.float64)
    acts = acts.double()
    results = []
    for n in range(acts.shape[0]):
        sample = acts[n]
        if sample.dim() == 3:  # (C, H, W) map
            if params.prenorm == "map":
                sample = params.norm_scale * sample / sample.norm().clamp_min(1e-12)
            if params.spp == "official":
                cells = [F.max_pool2d(sample[None], k, s)[0].flatten(1) for k, s in ((2, 1), (3, 2), (4, 3), (7, 6))]
                x = torch.cat(cells, 1).t()
            else:
                x = sample.flatten(1).t()
        else:
            x = sample[: (lengths[n] if lengths is not None else sample.shape[0])]
            if params.prenorm == "map":
                x = params.norm_scale * x / x.norm().clamp_min(1e-12)
        if params.prenorm == "descriptor":
            x = params.norm_scale * x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
        z = x
        for weight, bias, relu in params.encoder:
            z = z @ weight.t() + bias
            z = z.relu() if relu else z
        pre = z @ params.dec_weight.t() + params.dec_bias
        residual = (pre.relu() - x) / params.sigma_x ** 2 * (pre > 0)
        g = residual.t() @ torch.cat([z, torch.ones(len(z), 1, dtype=z.dtype)], 1)
        if params.fisher is not None:
            g = g / params.fisher.clamp_min(1e-12).sqrt()
        v = g.flatten()
        if normalize:
            v = v.sign() * v.abs().sqrt()
            v = v / v.norm().clamp_min(1e-12)
        results.append(v)
    return torch.stack(results)


CASES = [  # (acts shape, prenorm, spp, ragged)
    ((3, 17, 7, 7), "map", "official", False),
    ((3, 17, 7, 7), "descriptor", "official", False),
    ((3, 17, 5, 6), "descriptor", None, False),
    ((3, 17, 5, 6), "map", None, False),
    ((3, 17, 5, 6), None, None, False),
    ((4, 23, 17), "descriptor", None, True),
    ((4, 23, 17), "map", None, True),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape,prenorm,spp,ragged", CASES)
@pytest.mark.parametrize("normalize", [True, False])
def test_matches_design_transcription(backend, shape, prenorm, spp, ragged, normalize):
    params = random_params(17, 7, hidden=(13,), prenorm=prenorm, spp=spp, norm_scale=3.0)
    acts = torch.rand(shape, dtype=torch.float64)
    lengths = torch.tensor([23, 0, 5, 11]) if ragged else None
    expected = encode_by_the_book(acts, params, lengths, normalize)
    dtype = torch.float32 if backend == "triton" else torch.float64
    out = fv_vae_encode(acts.to(dtype), params.to(dtype), lengths=lengths, normalize=normalize, backend=backend)
    assert out.shape == (shape[0], 17 * 8) and out.dtype == dtype
    tolerance = 1e-5 if dtype == torch.float32 else 1e-9
    if normalize:  # √ turns a rounding error ε near 0 into √ε: compare sign(v)·v², the L1-normalised raw FV
        assert relative_error(out * out.abs(), expected * expected.abs()) <= tolerance
        norms = out.double().norm(dim=1)
        assert torch.allclose(norms, (expected.norm(dim=1) > 0).double(), atol=1e-5)
    else:
        assert relative_error(out, expected) <= tolerance


@pytest.mark.parametrize("shape,prenorm,spp,ragged", CASES)
def test_chunked_inference_equals_one_chunk(monkeypatch, shape, prenorm, spp, ragged):
    """Tiny workspace → many chunks and row blocks; the result must not change."""
    params = random_params(17, 7, hidden=(13,), prenorm=prenorm, spp=spp).to(torch.float32)
    acts = torch.rand(shape)
    lengths = torch.tensor([23, 0, 5, 11]) if ragged else None
    whole = fv_vae_encode(acts, params, lengths=lengths)
    monkeypatch.setattr(encode, "MIN_WORKSPACE_BYTES", 1)
    monkeypatch.setattr(encode, "WORKSPACE_FRACTION", 1e-4)
    chunked = fv_vae_encode(acts, params, lengths=lengths)
    assert relative_error(chunked * chunked.abs(), whole * whole.abs()) <= 1e-6


def test_a_gpu_batch_is_encoded_in_one_chunk_a_cpu_batch_in_bounded_ones():
    """The images benchmark (T=784 × 16, C=512, d=256): on a GPU, where each chunk and row block costs host time, one
    chunk and one row block; on the CPU, chunks whose intermediates stay near a fifth of the output."""
    params = random_params(512, 256, hidden=(512,)).to(torch.float32)
    plan = {device: encode._workspace_plan(params, 16, 784, 4, False, False, torch.device(device))
            for device in ("cpu", "cuda")}
    assert plan["cuda"][0] == 16 and plan["cuda"][1] >= 16 * 784
    assert plan["cpu"][0] < 16


def test_empty_sets_give_zero_vectors():
    params = random_params(6, 3).to(torch.float32)
    out = fv_vae_encode(torch.rand(3, 4, 6), params, lengths=[0, 4, 0])
    assert torch.equal(out[0], torch.zeros_like(out[0])) and torch.equal(out[2], out[0])
    assert torch.isclose(out[1].norm(), torch.tensor(1.0))
    assert fv_vae_encode(torch.rand(0, 4, 6), params).shape == (0, 6 * 4)


def test_differentiable_wrt_acts_and_params():
    params = random_params(5, 3, hidden=(4,), prenorm="map", norm_scale=2.0)
    for weight, bias, _ in params.encoder:
        weight.requires_grad_()
    params.dec_weight.requires_grad_()
    acts = torch.rand(2, 5, 3, 3, dtype=torch.float64, requires_grad=True)
    check = lambda a, w: fv_vae_encode(a, params, normalize=False)  # noqa: E731
    assert torch.autograd.gradcheck(check, (acts, params.encoder[0][0]))
    fv = fv_vae_encode(acts, params)
    fv.square().sum().backward()
    assert acts.grad is not None and torch.isfinite(acts.grad).all()
    assert params.dec_weight.grad is not None and params.dec_weight.grad.abs().sum() > 0


# ---- the official release -------------------------------------------------------------------------------

def official_extraction(frames, mat_path):
    """extract_fv_vae_frame_sequence.m transcribed to numpy, MATLAB order kept: frames (F, C, 7, 7) → raw FV."""
    from scipy.io import loadmat

    weights = loadmat(mat_path)["caffe_vae_weights"][0, 0]
    raw = 0
    for frame in frames.astype(np.float64):
        activations = frame.transpose(2, 1, 0)  # Caffe MATLAB blobs are (W, H, C)
        activations = activations / np.sqrt((activations ** 2).sum()) * float(weights["norm_scale"][0, 0])
        pooled = []
        for size, step, cells in ((2, 1, 6), (3, 2, 3), (4, 3, 2), (7, 6, 1)):
            level = np.zeros((cells, cells, frame.shape[0]))
            for w in range(cells):
                for h in range(cells):
                    level[w, h] = activations[w * step: w * step + size, h * step: h * step + size].max((0, 1))
            pooled.append(level.reshape(cells * cells, -1, order="F"))
        xt = np.concatenate(pooled)
        top = xt
        for layer in weights["encoder"][0]:
            top = top @ layer["w"][0, 0] + layer["b"].reshape(1, -1)
            top = top * (top > 0) if str(layer["act"][0]) == "ReLU" else top
        decoder = weights["decoder"][0, 0]
        uxt = top @ decoder["w"][0, 0].T + decoder["b"].reshape(1, -1)
        uxt = uxt * (uxt > 0)
        sig = weights["decoder_sigma"].reshape(-1).astype(np.float64)
        fv_mat = (((uxt - xt) / (sig * sig)) * (uxt > 0)).T @ np.hstack([top, np.ones((len(top), 1))])
        raw = raw + fv_mat.reshape(-1, order="F") / len(frames)
    return raw


@pytest.mark.parametrize("hidden", [(), (9,)])
def test_official_weights_reproduce_the_release(tmp_path, hidden):
    rng = np.random.default_rng(0)
    mat_path = tmp_path / "caffe_vae_weights_test.mat"
    write_official_mat(mat_path, 12, hidden, 5, rng)
    params = load_official_weights(mat_path)
    assert (params.prenorm, params.spp, params.norm_scale) == ("map", "official", 158.0)
    assert [relu for _, _, relu in params.encoder] == [True] * len(hidden) + [False]
    frames = rng.random((4, 12, 7, 7)).astype(np.float32)
    expected = official_extraction(frames, mat_path)
    raw = fv_vae_encode(torch.from_numpy(frames).double(), params.to(torch.float64), normalize=False)
    video = to_official_layout(raw.mean(0), 12)
    assert relative_error(video, torch.from_numpy(expected)) <= 1e-10


OFFICIAL_WEIGHTS = os.environ.get("FVK_OFFICIAL_WEIGHTS")


@pytest.mark.skipif(not OFFICIAL_WEIGHTS, reason="set FVK_OFFICIAL_WEIGHTS to a caffe_vae_weights_*.mat of the "
                    "official release (github.com/fv-vae/fv-vae, vae_models/) to check the real weights")
def test_real_official_weights_reproduce_the_release():
    params = load_official_weights(OFFICIAL_WEIGHTS)
    channels = params.channels
    frames = np.random.default_rng(1).random((3, channels, 7, 7)).astype(np.float32)
    expected = official_extraction(frames, OFFICIAL_WEIGHTS)
    raw = fv_vae_encode(torch.from_numpy(frames).double(), params.to(torch.float64), normalize=False)
    assert relative_error(to_official_layout(raw.mean(0), channels), torch.from_numpy(expected)) <= 1e-10
    fp32 = fv_vae_encode(torch.from_numpy(frames), params, normalize=False)  # the default backend, float32
    assert relative_error(to_official_layout(fp32.mean(0).double(), channels), torch.from_numpy(expected)) <= 1e-5


def test_official_weights_errors(tmp_path):
    from scipy.io import savemat

    with pytest.raises(FileNotFoundError, match="no official FV-VAE weight file"):
        load_official_weights(tmp_path / "missing.mat")
    savemat(tmp_path / "other.mat", {"weights": np.zeros(3)})
    with pytest.raises(ValueError, match=r"holds no 'caffe_vae_weights' struct \(variables: \['weights'\]\)"):
        load_official_weights(tmp_path / "other.mat")
    (tmp_path / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(200))
    with pytest.raises(ValueError, match=r"image.png' is not a MATLAB v5 \.mat file"):
        load_official_weights(tmp_path / "image.png")


def test_to_official_layout_is_column_major():
    channels, width = 3, 4
    fv = torch.arange(channels * width, dtype=torch.float32)[None]
    official = to_official_layout(fv, channels)
    grid = fv.view(channels, width)
    assert torch.equal(official[0], grid.t().reshape(-1))  # index j·C + c holds G[c, j]
    with pytest.raises(ValueError, match="multiple of C = 5"):
        to_official_layout(fv, 5)


def test_out_buffer_is_filled_in_place():
    params = random_params(6, 3).to(torch.float32)
    maps = torch.rand(4, 6, 3, 3)
    out = torch.full((4, 6 * 4), float("nan"))
    assert fv_vae_encode(maps, params, out=out) is out
    assert torch.equal(out, fv_vae_encode(maps, params))
    with pytest.raises(ValueError, match=r"out must be a torch.float32 tensor of shape \(4, 24\)"):
        fv_vae_encode(maps, params, out=torch.empty(4, 23))


@pytest.mark.parametrize("prenorm", ["descriptor", "map"])
def test_float16_never_gives_nan(prenorm):
    """1e-12 floors are 0 in float16: zero descriptors and maps and zero Fisher entries must stay finite."""
    params = random_params(6, 3, prenorm=prenorm, norm_scale=3.0).to(torch.float16)
    params.fisher[0] = 0
    maps = torch.rand(3, 6, 4, 4, dtype=torch.float16) * 300  # sums of squares beyond float16's 65504
    maps[0, :, 0, 0] = 0  # a zero descriptor, as after a ReLU
    maps[2] = 0  # an all-zero map
    for requires_grad in (False, True):
        out = fv_vae_encode(maps.clone().requires_grad_(requires_grad), params, backend="torch")
        assert torch.isfinite(out).all()
    wide = params.to(torch.float64)
    wide.fisher.clamp_(min=torch.finfo(torch.float16).tiny)  # the floor float16 can represent
    expected = fv_vae_encode(maps.double(), wide, backend="torch")
    assert relative_error(out * out.abs(), expected * expected.abs()) <= 2e-2


def compiled_encode(params):
    return torch.compile(lambda acts, lengths: fv_vae_encode(acts, params, lengths=lengths), fullgraph=True,
                         backend="aot_eager")


@pytest.mark.parametrize("shape,prenorm,spp,ragged", CASES[1:3] + CASES[-1:])
def test_traces_into_one_graph(shape, prenorm, spp, ragged):
    """Inference has no graph break under torch.compile: the op family is the only door to the kernels, and
    the value checks become in-graph assertions instead of host reads."""
    params = random_params(17, 7, hidden=(13,), prenorm=prenorm, spp=spp).to(torch.float32)
    acts = torch.rand(shape)
    lengths = torch.tensor([23, 0, 5, 11]) if ragged else None
    with torch.no_grad():
        explanation = torch._dynamo.explain(lambda a: fv_vae_encode(a, params, lengths=lengths))(acts)
        assert explanation.graph_break_count == 0, explanation.break_reasons
        expected = fv_vae_encode(acts, params, lengths=lengths)
        assert relative_error(compiled_encode(params)(acts, lengths), expected) <= 1e-6


def test_value_checks_hold_in_compiled_code():
    params = random_params(17, 7).to(torch.float32)
    encode_compiled = compiled_encode(params)
    sets = torch.rand(4, 23, 17)
    with torch.no_grad():
        with pytest.raises(RuntimeError, match=r"lengths must lie in \[0, T\] = \[0, 23\]"):
            encode_compiled(sets, torch.tensor([24, 0, 5, 11]))
        sets[2, 3, 4] = float("nan")
        with pytest.raises(RuntimeError, match="acts holds NaN or Inf"):
            encode_compiled(sets, torch.tensor([23, 0, 5, 11]))


def test_params_print_their_shapes():
    params = random_params(17, 7, hidden=(13,), prenorm="map", norm_scale=3.0)
    assert repr(params) == ("FVVAEParams(C=17, d=7, encoder=[17→13 ReLU, 13→7], fisher=(17, 8), prenorm='map', "
                            "norm_scale=3, spp=None, dtype=torch.float64, device=cpu)")


def test_torch_func_over_the_pipeline():
    """vmap over a batch of batches equals encoding each; grad w.r.t. the activations equals autograd's."""
    params = random_params(5, 3, hidden=(4,))
    acts = torch.rand(4, 3, 5, 2, 2, dtype=torch.float64)
    expected = torch.stack([fv_vae_encode(batch, params) for batch in acts])
    assert relative_error(torch.func.vmap(lambda batch: fv_vae_encode(batch, params))(acts), expected) <= 1e-12
    readout = torch.randn(3, params.dim, dtype=torch.float64)

    def loss(maps):
        return (fv_vae_encode(maps, params) * readout).sum()
    leaf = acts[0].clone().requires_grad_()
    (expected_grad,) = torch.autograd.grad(loss(leaf), leaf)
    assert relative_error(torch.func.grad(loss)(acts[0]), expected_grad) <= 1e-10


# ---- the encoder's inference GEMMs (oneDNN's fused linear where torch has it) -----------------------------------

def encoder_by_the_book(x, encoder, x_scale=None):
    hidden = x.double() if x_scale is None else x.double() * x_scale.double().unsqueeze(-1)
    for weight, bias, relu in encoder:
        hidden = hidden @ weight.double().t() + bias.double()
        hidden = hidden.relu() if relu else hidden
    return hidden


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("channel_major", [False, True])
@pytest.mark.parametrize("scaled", [False, True])
def test_the_encoder_without_autograd_matches_float64(dtype, tolerance, channel_major, scaled):
    """Every layer kind (ReLU or not, the scale folded in after the first GEMM), strided NCHW views, into out."""
    params = random_params(19, 7, hidden=(13, 11)).to(torch.float32)
    params.encoder[1] = (params.encoder[1][0], params.encoder[1][1], False)
    encoder = [(w.to(dtype), b.to(dtype), relu) for w, b, relu in params.encoder]
    x = torch.rand(3, 19, 10).transpose(1, 2) if channel_major else torch.rand(3, 10, 19)
    x = x.to(dtype)
    scale = torch.rand(3, 10).to(dtype) + 0.5 if scaled else None
    out = torch.full((3, 10, 7), float("nan"), dtype=dtype)
    with torch.no_grad():
        got = encode.encoder_forward(x, encoder, scale, out=out)
    assert got.data_ptr() == out.data_ptr()
    assert relative_error(out, encoder_by_the_book(x, encoder, scale)) <= tolerance


def test_the_encoder_takes_the_fused_linear_only_where_it_applies(monkeypatch):
    calls = []
    fused = encode._fused_linear
    monkeypatch.setattr(encode, "_fused_linear", lambda *args: calls.append(args[0].dtype) or fused(*args))
    params = random_params(9, 5, hidden=(6,))
    x = torch.rand(2, 4, 9)
    with torch.no_grad():
        for dtype in (torch.float64, torch.float32, torch.bfloat16):
            encode.encoder_forward(x.to(dtype), [(w.to(dtype), b.to(dtype), r) for w, b, r in params.encoder])
    encode.encoder_forward(x.float(), [(w.float(), b.float(), r) for w, b, r in params.encoder])  # autograd on
    expected = ([torch.float32] * 2 if encode._fused_linear_works(torch.float32) else []) + (
        [torch.bfloat16] * 2 if encode._fused_linear_works(torch.bfloat16) else [])
    assert calls == expected
    calls.clear()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # autocast's casts, which the op ignores
        assert encode.encoder_forward(x.float(), [(w.float(), b.float(), r) for w, b, r in params.encoder]).dtype \
            == torch.bfloat16
    assert calls == []


def test_a_fused_linear_that_fails_its_check_leaves_the_work_to_matmul(monkeypatch):
    encode._fused_linear_works.cache_clear()
    monkeypatch.setattr(encode, "_fused_linear", lambda *args: (_ for _ in ()).throw(RuntimeError("not here")))
    try:
        assert not encode._fused_linear_works(torch.float32) and not encode._fused_linear_works(torch.bfloat16)
        params = random_params(9, 5, hidden=(6,)).to(torch.float32)
        x = torch.rand(2, 4, 9)
        with torch.no_grad():
            got = encode.encoder_forward(x, params.encoder)
        assert relative_error(got, encoder_by_the_book(x, params.encoder)) <= 1e-5
    finally:
        encode._fused_linear_works.cache_clear()


@pytest.mark.parametrize("num_sets", [0, 3])
@pytest.mark.parametrize("channels_last", [False, True])
def test_the_spatial_pyramid_matches_nchw_pooling_in_any_layout(num_sets, channels_last):
    maps = torch.rand(num_sets, 6, 7, 7, dtype=torch.float64)
    if channels_last:
        maps = maps.contiguous(memory_format=torch.channels_last)
    levels = ((2, 1), (3, 2), (4, 3), (7, 6))
    by_level = torch.cat([F.max_pool2d(maps.contiguous(), k, s).flatten(2) for k, s in levels], 2).transpose(1, 2)
    cells = encode.official_spp(maps)
    assert cells.shape == (num_sets, 50, 6) and cells.is_contiguous() and torch.equal(cells, by_level)
    if num_sets:
        assert torch.autograd.gradcheck(encode.official_spp, (maps.clone().requires_grad_(),))


def test_the_derived_fisher_scaling_is_kept_only_while_it_is_current():
    params = random_params(6, 3).to(torch.float32)
    first = params.fisher_rsqrt
    assert params.fisher_rsqrt is first  # an encoding loop derives it once
    assert torch.equal(first, params.fisher.clamp_min(1e-12).rsqrt())
    params.fisher.mul_(4)  # in place: a new version
    assert torch.allclose(params.fisher_rsqrt, first / 2)
    params.fisher = params.fisher * 4  # another tensor
    assert torch.allclose(params.fisher_rsqrt, first / 4)
    params.fisher.requires_grad_()
    assert params.fisher_rsqrt.grad_fn is not None  # differentiable where autograd records
    with torch.inference_mode():
        inference = random_params(6, 3).to(torch.float32)
        assert torch.equal(inference.fisher_rsqrt, inference.fisher.clamp_min(1e-12).rsqrt())
    moved = params.to(torch.float64)
    assert moved.fisher_rsqrt.dtype == torch.float64


def test_the_fused_linear_check_is_not_decided_by_the_callers_settings():
    """Checked on its own dtypes outside autocast: a first call under autocast or another default dtype must not
    switch the fast path off for the process."""
    encode._fused_linear_works.cache_clear()
    previous = torch.get_default_dtype()
    try:
        torch.set_default_dtype(torch.float64)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            under_other_settings = encode._fused_linear_works(torch.float32)
        torch.set_default_dtype(previous)
        encode._fused_linear_works.cache_clear()
        assert under_other_settings == encode._fused_linear_works(torch.float32)
    finally:
        torch.set_default_dtype(previous)
        encode._fused_linear_works.cache_clear()


def test_a_dtype_the_fused_linear_refuses_leaves_bfloat16_encoding_to_matmul(monkeypatch):
    """oneDNN has no bf16 inner product on CPUs without AVX-512: the per-dtype check finds that, and bf16 encoding
    without autograd still works (emulated by refusing bf16)."""
    fused = encode._fused_linear

    def refuses_bf16(hidden, *args):
        if hidden.dtype == torch.bfloat16:
            raise RuntimeError("could not create a primitive descriptor for the inner product forward propagation")
        return fused(hidden, *args)

    encode._fused_linear_works.cache_clear()
    monkeypatch.setattr(encode, "_fused_linear", refuses_bf16)
    try:
        params = random_params(12, 5, hidden=(8,)).to(torch.bfloat16)
        with torch.no_grad():
            fv = fv_vae_encode(torch.rand(3, 12, 4, 4).bfloat16(), params)
        assert fv.dtype == torch.bfloat16 and torch.isfinite(fv.float()).all()
        assert not encode._fused_linear_works(torch.bfloat16)
    finally:
        encode._fused_linear_works.cache_clear()

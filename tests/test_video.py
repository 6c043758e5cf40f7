"""The video path on generated UCF101-style frame folders: splits, frames, per-video averaging."""
import os
import signal

import numpy as np
import pytest
import torch
from torch import nn

from fvkernels import fv_vae_encode
from fvkernels.app.video import (
    frame_batches,
    load_images,
    read_class_index,
    read_split,
    sample_frames,
    video_fisher_vectors,
    video_frame_paths,
)

from tests.helpers import random_params, relative_error

Image = pytest.importorskip("PIL.Image")


@pytest.fixture
def ucf_like(tmp_path):
    """Two classes, three videos with 3–5 frames each, split and class-index files."""
    rng = np.random.default_rng(0)
    videos = {"Jump/v_Jump_g01_c01": 3, "Jump/v_Jump_g02_c01": 5, "Swim/v_Swim_g01_c02": 4}
    for video, frames in videos.items():
        folder = tmp_path / "frames" / video
        folder.mkdir(parents=True)
        for index in range(frames):
            pixels = (rng.random((20, 24, 3)) * 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"frame_{index + 1:04d}.png")
    (tmp_path / "classInd.txt").write_text("1 Jump\n2 Swim\n")
    (tmp_path / "trainlist01.txt").write_text("Jump/v_Jump_g01_c01.avi 1\nSwim/v_Swim_g01_c02.avi 2\n")
    (tmp_path / "testlist01.txt").write_text("Jump/v_Jump_g02_c01.avi\n")
    return tmp_path


def test_splits_and_frames(ucf_like):
    classes = read_class_index(ucf_like / "classInd.txt")
    assert classes == {"Jump": 0, "Swim": 1}
    assert read_split(ucf_like / "trainlist01.txt") == [("Jump/v_Jump_g01_c01", 0), ("Swim/v_Swim_g01_c02", 1)]
    assert read_split(ucf_like / "testlist01.txt", classes) == [("Jump/v_Jump_g02_c01", 0)]
    with pytest.raises(ValueError, match="no label on the line"):
        read_split(ucf_like / "testlist01.txt")
    frames = video_frame_paths(ucf_like / "frames", "Jump/v_Jump_g02_c01")
    assert [p.name for p in frames] == [f"frame_{i:04d}.png" for i in range(1, 6)]
    assert [p.name for p in sample_frames(frames, 2)] == ["frame_0002.png", "frame_0004.png"]
    with pytest.raises(FileNotFoundError, match="no frame folder"):
        video_frame_paths(ucf_like / "frames", "Jump/v_missing")


def test_video_fv_is_mean_of_frame_fvs(ucf_like):
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.AdaptiveMaxPool2d(7))  # 7×7 maps like VGG pool5
    params = random_params(6, 3, prenorm="map", spp="official", norm_scale=5.0).to(torch.float32)
    videos = [video_frame_paths(ucf_like / "frames", v) for v, _ in read_split(ucf_like / "trainlist01.txt")]
    videos.append([])  # a video whose frames were all unreadable
    load = lambda paths: load_images(paths, (20, 24))  # noqa: E731
    fv = video_fisher_vectors(frame_batches(videos, load, backbone, frames_per_batch=2), len(videos), params)
    assert fv.shape == (3, params.dim)
    for index, frames in enumerate(videos[:2]):
        with torch.no_grad():
            raw = fv_vae_encode(backbone(load(frames)), params, normalize=False).mean(0)
        expected = raw.sign() * raw.abs().sqrt()
        expected = expected / expected.norm()
        assert relative_error(fv[index] * fv[index].abs(), expected * expected.abs()) <= 1e-5
    assert torch.equal(fv[2], torch.zeros(params.dim))


@pytest.mark.parametrize("count", [0, -1])
def test_frame_count_must_be_positive(count):
    with pytest.raises(ValueError, match=f"frames per video must be a positive number, or None for all frames; "
                                         f"got {count}"):
        sample_frames(["frame_0001.png", "frame_0002.png"], count)


@pytest.mark.parametrize("name,text,message", [
    ("classInd.txt", "1 Jump\n٢ Swim\n", r"classInd\.txt:2: '٢' is not a whole number ≥ 1 in ASCII digits; expected "
                                        r"'<index ≥ 1> <class name>'"),
    ("classInd.txt", "1 Jump\n² Swim\n", r"classInd\.txt:2: '²' is not a whole number ≥ 1"),
    ("classInd.txt", "0 Jump\n", r"classInd\.txt:1: '0' is not a whole number ≥ 1"),
    ("classInd.txt", "1 Jump Rope\n", r"classInd\.txt:1: 3 fields; expected '<index ≥ 1> <class name>', got '1 Jump "
                                      r"Rope'"),
    ("trainlist01.txt", "Jump/v_Jump_g01_c01.avi 1\nSwim/v_Swim_g01_c02.avi ١\n",
     r"trainlist01\.txt:2: '١' is not a whole number ≥ 1 in ASCII digits; expected 'Class/video\.avi \[label ≥ 1\]'"),
    ("trainlist01.txt", "Jump/v_Jump_g01_c01.avi 0\n", r"trainlist01\.txt:1: '0' is not a whole number ≥ 1"),
    ("trainlist01.txt", b"Jump/v_Jump_g01_c01.avi 1\nSwim/v_\xe9.avi 2\n",
     r"trainlist01\.txt:2: not UTF-8 text \(byte 0xe9\); the split file must be a file"),
])
def test_damaged_split_and_class_files_name_file_and_line(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ValueError, match=message):
        read_class_index(path) if name == "classInd.txt" else read_split(path)


def test_a_frame_that_is_a_fifo_is_refused_without_being_opened(ucf_like):
    folder = ucf_like / "frames" / "Jump" / "v_Jump_g01_c01"
    os.mkfifo(folder / "frame_0004.png")
    frames = video_frame_paths(ucf_like / "frames", "Jump/v_Jump_g01_c01")
    assert frames[-1].name == "frame_0004.png"
    signal.alarm(20)  # opening the FIFO would wait for a writer: fail instead of hanging
    try:
        with pytest.raises(ValueError, match=r"frame_0004\.png' is a FIFO \(named pipe\), not a regular file; only "
                                             r"image files and folders of them are read"):
            load_images(frames, (8, 8))
    finally:
        signal.alarm(0)

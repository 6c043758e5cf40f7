"""Kept for existing imports (README, DESIGN §2): the video path lives in fvkernels.app.video."""
from fvkernels.app.video import (
                                 frame_batches,
                                 load_images,
                                 read_class_index,
                                 read_split,
                                 sample_frames,
                                 video_fisher_vectors,
                                 video_frame_paths,
)

__all__ = ["frame_batches", "load_images", "read_class_index", "read_split", "sample_frames", "video_fisher_vectors",
           "video_frame_paths"]

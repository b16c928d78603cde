"""Write a tiny fake audio-visual dataset in the authors' layout, for tests and smoke runs.

The files are exactly what :mod:`mmpareto_examples.av_datasets` reads from real CREMA-D or
Kinetics-Sounds after ``preprocess_av.py``: a class list, train/test lists, one ``(T, 128)`` fbank
``.npy`` per clip and a folder of JPEG frames per clip. Frame ``k`` (0-based) of every clip is a solid
gray image of intensity ``frame_intensity(k)``, so tests can tell from the loaded pixels which frames
were sampled.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .preprocess_av import CREMAD_CLASSES


def frame_intensity(k: int) -> int:
    """Gray level (0-255) of the 0-based frame ``k`` in a fake clip (distinct for k < 12)."""
    return 10 + 20 * k


def write_fake_av_dataset(
    root: str | Path,
    classes: Sequence[str] = CREMAD_CLASSES,
    clips_per_class: int = 2,
    test_clips_per_class: int = 1,
    frames_per_clip: int = 6,
    audio_steps: int = 40,
    n_mels: int = 128,
    frame_size: int = 24,
    list_ext: str = "csv",
    write_class_list: bool = True,
    seed: int = 0,
) -> dict[str, list[tuple[str, str]]]:
    """Create ``root/{stat.csv, train.<ext>, test.<ext>, audio/*.npy, visual/<clip>/frame_*.jpg}``.

    Args:
        root: Destination directory (created).
        classes: Class names, written to ``stat.csv`` in this order.
        clips_per_class: Training clips per class.
        test_clips_per_class: Test clips per class.
        frames_per_clip: JPEG frames per clip.
        audio_steps: Time steps T of each ``(T, n_mels)`` fbank.
        n_mels: Mel bins.
        frame_size: Side length of the square frames.
        list_ext: ``"csv"`` (CREMA-D style) or ``"txt"`` (Kinetics-Sounds style) list files.
        write_class_list: Also write ``stat.csv``.
        seed: Seed of the fbank values.

    Returns:
        ``{"train": [(clip, label), ...], "test": [...]}`` as written to the lists.
    """
    from PIL import Image

    root = Path(root)
    (root / "audio").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    splits: dict[str, list[tuple[str, str]]] = {"train": [], "test": []}
    for split, per_class in (("train", clips_per_class), ("test", test_clips_per_class)):
        for c, label in enumerate(classes):
            for i in range(per_class):
                clip = f"{split}_{c:02d}_{i:02d}_{label}"
                splits[split].append((clip, label))
                np.save(
                    root / "audio" / f"{clip}.npy", rng.normal(size=(audio_steps, n_mels)).astype(np.float32)
                )
                clip_dir = root / "visual" / clip
                clip_dir.mkdir(parents=True, exist_ok=True)
                for k in range(frames_per_clip):
                    value = frame_intensity(k)
                    Image.new("RGB", (frame_size, frame_size), (value, value, value)).save(
                        clip_dir / f"frame_{k + 1:05d}.jpg", quality=95
                    )
        with open(root / f"{split}.{list_ext}", "w", newline="") as f:
            csv.writer(f).writerows(splits[split])
    if write_class_list:
        with open(root / "stat.csv", "w", newline="") as f:
            csv.writer(f).writerows([c] for c in classes)
    return splits

"""CREMA-D and Kinetics-Sounds data modules reading the authors' preprocessed layout.

Layout under ``root`` (what ``python examples/preprocess_av.py`` writes, and what the official
MMPareto / OGM-GE code reads)::

    root/
      stat.csv                 class list, one class per row (first column); its order defines label ids
      train.csv, test.csv      CREMA-D lists: rows "clip_name,label_name", no header
      train.txt, test.txt      Kinetics-Sounds lists: same comma-separated rows
      audio/<clip>.npy         log-mel fbank, float32 array of shape (T, 128) (``.pt`` tensors also read)
      visual/<clip>/frame_00001.jpg, frame_00002.jpg, ...   frames extracted from the clip

Like the official code, rows whose label is not in the class list or whose audio/frames are missing are
skipped (the number skipped is reported once as a warning).

Frame sampling (the authors' scheme): the clip's ``F`` frames are split into ``num_frames`` equal
segments of ``F // num_frames`` frames and one frame is taken per segment, uniformly at random within
the segment in training and at a fixed position (``max(seg // 2, 1)``-th frame of the segment, i.e.
its start for short segments and its centre otherwise) at test time.

Visual transforms (official): train ``RandomResizedCrop(224) + RandomHorizontalFlip + ToTensor +
Normalize(ImageNet)``; validation/test ``Resize((224, 224)) + ToTensor + Normalize(ImageNet)``.

Samples are ``{"audio": (1, T, 128), "visual": (3, num_frames, H, W), "label": ()}``, so batches
feed :class:`mmpareto_examples.models.AVClassifier` directly.
"""

from __future__ import annotations

import csv
import random
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .preprocess_av import CREMAD_CLASSES

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
AUDIO_EXTENSIONS = (".npy", ".pt")


def read_class_list(path: str | Path) -> list[str]:
    """Class names from a class-list file (``stat.csv``): the first column of every non-empty row.

    Args:
        path: The class-list file.

    Returns:
        Class names in file order; the position of a name is its label id.
    """
    with open(path, newline="") as f:
        names = [row[0].strip() for row in csv.reader(f) if row and row[0].strip()]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate class names in {path}")
    if not names:
        raise ValueError(f"no class names in {path}")
    return names


def read_clip_list(path: str | Path) -> list[tuple[str, str]]:
    """``(clip_name, label_name)`` pairs from a CSV/TXT list with comma-separated rows.

    Args:
        path: The list file (``train.csv``, ``test.txt``, ...).

    Returns:
        The pairs in file order (blank rows ignored).
    """
    rows: list[tuple[str, str]] = []
    with open(path, newline="") as f:
        for lineno, row in enumerate(csv.reader(f), start=1):
            if not row or not "".join(row).strip():
                continue
            if len(row) < 2:
                raise ValueError(f"{path}:{lineno}: expected 'clip_name,label_name', got {row!r}")
            rows.append((row[0].strip(), row[1].strip()))
    return rows


def sample_frame_indices(
    num_available: int, num_frames: int, train: bool, rng: random.Random | None = None
) -> list[int]:
    """0-based indices of the frames to load, one per equal segment (the authors' sampling).

    Args:
        num_available: Frames stored for the clip.
        num_frames: Frames to sample (the official code's ``fps`` / ``pick_num``).
        train: Random position within each segment if True, fixed position otherwise.
        rng: Source of randomness in training (default: the ``random`` module, which PyTorch seeds in
            each DataLoader worker).

    Returns:
        ``num_frames`` indices in increasing order.
    """
    if num_available < 1 or num_frames < 1:
        raise ValueError(
            f"need at least one frame to sample from and to take, got {num_available}, {num_frames}"
        )
    seg = num_available // num_frames
    if seg == 0:
        # Fewer stored frames than requested: spread the requests over what exists (repeats allowed).
        return [i * num_available // num_frames for i in range(num_frames)]
    if train:
        rng = rng or random
        return [i * seg + rng.randrange(seg) for i in range(num_frames)]
    # Official test position is the 1-based frame i*seg + max(seg//2, 1); minus one for 0-based.
    return [i * seg + max(seg // 2, 1) - 1 for i in range(num_frames)]


def visual_transform(train: bool, image_size: int = 224) -> Callable:
    """The official frame transform (ImageNet normalisation; random crop and flip only in training).

    Args:
        train: Training (augmenting) or evaluation transform.
        image_size: Output side length (224 in the paper).

    Returns:
        A torchvision transform mapping a PIL image to a ``(3, image_size, image_size)`` tensor.
    """
    from torchvision import transforms

    if train:
        steps = [transforms.RandomResizedCrop(image_size), transforms.RandomHorizontalFlip()]
    else:
        steps = [transforms.Resize((image_size, image_size))]
    return transforms.Compose(
        [*steps, transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    )


def _find_audio(audio_dir: Path, clip: str) -> Path | None:
    for ext in AUDIO_EXTENSIONS:
        candidate = audio_dir / f"{clip}{ext}"
        if candidate.is_file():
            return candidate
    return None


def _list_frames(clip_dir: Path) -> list[Path]:
    if not clip_dir.is_dir():
        return []
    return sorted(p for p in clip_dir.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)


def load_fbank(path: str | Path) -> torch.Tensor:
    """Load a stored log-mel fbank (``.npy`` array or ``.pt`` tensor) as a float32 ``(T, n_mels)`` tensor.

    Args:
        path: The feature file.

    Returns:
        The features.
    """
    path = Path(path)
    if path.suffix == ".pt":
        feats = torch.load(path, map_location="cpu", weights_only=True)
    else:
        feats = torch.from_numpy(np.load(path))
    feats = torch.as_tensor(feats, dtype=torch.float32)
    if feats.dim() == 3 and feats.shape[0] == 1:
        feats = feats[0]
    if feats.dim() != 2:
        raise ValueError(f"{path}: expected a (T, n_mels) fbank, got shape {tuple(feats.shape)}")
    return feats


class AVDataset(Dataset):
    """Audio-visual clips in the authors' preprocessed layout.

    Args:
        root: Dataset root (see the module docstring for the layout).
        list_file: The split's list, relative to ``root`` or absolute.
        class_names: Class names; a row's label id is the index of its label name.
        train: Training mode (random frame positions and augmentation) or evaluation mode.
        num_frames: Frames sampled per clip.
        image_size: Frame side length after the transform.
        audio_dir: Directory of the fbank files, relative to ``root``.
        visual_dir: Directory of the per-clip frame folders, relative to ``root``.
        audio_length: If set, crop or zero-pad every fbank to this many time steps (needed when clips
            have different lengths); the official preprocessing makes them equal.
    """

    def __init__(
        self,
        root: str | Path,
        list_file: str | Path,
        class_names: Sequence[str],
        train: bool,
        num_frames: int = 1,
        image_size: int = 224,
        audio_dir: str = "audio",
        visual_dir: str = "visual",
        audio_length: int | None = None,
    ) -> None:
        self.root = Path(root)
        self.class_names = list(class_names)
        self.class_to_idx = {name: i for i, name in enumerate(self.class_names)}
        self.train = train
        self.num_frames = num_frames
        self.audio_length = audio_length
        self.transform = visual_transform(train, image_size)
        audio_root, visual_root = self.root / audio_dir, self.root / visual_dir
        list_path = Path(list_file) if Path(list_file).is_absolute() else self.root / list_file
        if not list_path.is_file():
            raise FileNotFoundError(f"clip list not found: {list_path}")
        self.samples: list[tuple[str, Path, list[Path], int]] = []
        skipped = {"unknown label": 0, "missing audio": 0, "missing frames": 0}
        for clip, label in read_clip_list(list_path):
            if label not in self.class_to_idx:
                skipped["unknown label"] += 1
                continue
            audio = _find_audio(audio_root, clip)
            if audio is None:
                skipped["missing audio"] += 1
                continue
            frames = _list_frames(visual_root / clip)
            if not frames:
                skipped["missing frames"] += 1
                continue
            self.samples.append((clip, audio, frames, self.class_to_idx[label]))
        self.skipped = skipped
        if any(skipped.values()):
            warnings.warn(f"{list_path}: skipped rows {skipped}", stacklevel=2)
        if not self.samples:
            raise ValueError(f"{list_path}: no usable clips under {self.root} (skipped: {skipped})")

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def clips(self) -> list[str]:
        """Clip names in dataset order."""
        return [s[0] for s in self.samples]

    @property
    def labels(self) -> list[int]:
        """Label ids in dataset order."""
        return [s[3] for s in self.samples]

    def _audio(self, path: Path) -> torch.Tensor:
        feats = load_fbank(path)
        if self.audio_length is not None:
            t = feats.shape[0]
            if t >= self.audio_length:
                feats = feats[: self.audio_length]
            else:
                feats = torch.cat([feats, feats.new_zeros(self.audio_length - t, feats.shape[1])])
        return feats.unsqueeze(0)

    def _visual(self, frames: list[Path]) -> torch.Tensor:
        from PIL import Image

        picked = sample_frame_indices(len(frames), self.num_frames, self.train)
        images = []
        for i in picked:
            with Image.open(frames[i]) as img:
                images.append(self.transform(img.convert("RGB")))
        # (T, C, H, W) -> (C, T, H, W), the layout the official visual encoder unfolds.
        return torch.stack(images).permute(1, 0, 2, 3).contiguous()

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        _, audio, frames, label = self.samples[index]
        return {
            "audio": self._audio(audio),
            "visual": self._visual(frames),
            "label": torch.tensor(label, dtype=torch.long),
        }


class AVDataModule(pl.LightningDataModule):
    """Data module over the authors' audio-visual layout (base of the CREMA-D / Kinetics-Sounds modules).

    Args:
        root: Dataset root.
        num_frames: Frames sampled per clip (the official ``fps``).
        batch_size: Batch size (64 in the paper).
        num_workers: DataLoader workers.
        train_list: Training list file, relative to ``root``.
        test_list: Test list file, relative to ``root``.
        val_list: Validation list; ``None`` validates on ``test_list``, as the official code does
            (CREMA-D and Kinetics-Sounds have no separate validation split there).
        class_list: Class-list file relative to ``root``.
        default_classes: Class names used when ``class_list`` does not exist (``None``: it must exist).
        audio_dir: Fbank directory relative to ``root``.
        visual_dir: Frame directory relative to ``root``.
        image_size: Frame side length (224 in the paper).
        audio_length: Crop/pad fbanks to this many time steps (``None``: keep as stored).
    """

    def __init__(
        self,
        root: str,
        num_frames: int = 1,
        batch_size: int = 64,
        num_workers: int = 4,
        train_list: str = "train.csv",
        test_list: str = "test.csv",
        val_list: str | None = None,
        class_list: str = "stat.csv",
        default_classes: Sequence[str] | None = None,
        audio_dir: str = "audio",
        visual_dir: str = "visual",
        image_size: int = 224,
        audio_length: int | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.root = Path(root)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.class_names = self._read_classes(class_list, default_classes)
        self.num_classes = len(self.class_names)
        self._datasets: dict[str, AVDataset] = {}

    def _read_classes(self, class_list: str, default_classes: Sequence[str] | None) -> list[str]:
        path = self.root / class_list
        if path.is_file():
            return read_class_list(path)
        if default_classes is not None:
            return list(default_classes)
        raise FileNotFoundError(f"class list not found: {path}")

    def _dataset(self, split: str) -> AVDataset:
        if split not in self._datasets:
            hp = self.hparams
            list_file = {"train": hp.train_list, "val": hp.val_list or hp.test_list, "test": hp.test_list}[
                split
            ]
            self._datasets[split] = AVDataset(
                self.root,
                list_file,
                self.class_names,
                train=split == "train",
                num_frames=hp.num_frames,
                image_size=hp.image_size,
                audio_dir=hp.audio_dir,
                visual_dir=hp.visual_dir,
                audio_length=hp.audio_length,
            )
        return self._datasets[split]

    def dataset(self, split: str) -> AVDataset:
        """The dataset of ``"train"``, ``"val"`` or ``"test"`` (built on first use)."""
        return self._dataset(split)

    def setup(self, stage: str | None = None) -> None:
        wanted = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",)}
        for split in wanted.get(stage or "", ("train", "val", "test")):
            self._dataset(split)

    def _loader(self, split: str) -> DataLoader:
        train = split == "train"
        return DataLoader(
            self._dataset(split),
            batch_size=self.batch_size,
            shuffle=train,
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test")


class CremaDDataModule(AVDataModule):
    """CREMA-D (6 emotions) in the authors' layout: ``train.csv``/``test.csv``, ``audio/``, ``visual/``.

    The class order is ``stat.csv`` if present, else the official one: NEU, HAP, SAD, FEA, DIS, ANG.

    Args:
        root: Dataset root.
        num_frames: Frames sampled per clip.
        batch_size: Batch size (64 in the paper).
        num_workers: DataLoader workers.
        train_list: Training list relative to ``root``.
        test_list: Test list relative to ``root``.
        val_list: Validation list (``None``: the test list, as in the official code).
        class_list: Optional class-list file relative to ``root``.
        audio_dir: Fbank directory relative to ``root``.
        visual_dir: Frame directory relative to ``root``.
        image_size: Frame side length.
        audio_length: Crop/pad fbanks to this many time steps.
    """

    def __init__(
        self,
        root: str,
        num_frames: int = 1,
        batch_size: int = 64,
        num_workers: int = 4,
        train_list: str = "train.csv",
        test_list: str = "test.csv",
        val_list: str | None = None,
        class_list: str = "stat.csv",
        audio_dir: str = "audio",
        visual_dir: str = "visual",
        image_size: int = 224,
        audio_length: int | None = None,
    ) -> None:
        super().__init__(
            root=root,
            num_frames=num_frames,
            batch_size=batch_size,
            num_workers=num_workers,
            train_list=train_list,
            test_list=test_list,
            val_list=val_list,
            class_list=class_list,
            default_classes=CREMAD_CLASSES,
            audio_dir=audio_dir,
            visual_dir=visual_dir,
            image_size=image_size,
            audio_length=audio_length,
        )


class KineticsSoundsDataModule(AVDataModule):
    """Kinetics-Sounds in the authors' layout: ``stat.csv`` class list, ``train.txt``/``test.txt`` lists.

    Args:
        root: Dataset root.
        num_frames: Frames sampled per clip.
        batch_size: Batch size (64 in the paper).
        num_workers: DataLoader workers.
        train_list: Training list relative to ``root``.
        test_list: Test list relative to ``root``.
        val_list: Validation list (``None``: the test list, as in the official code).
        class_list: Class-list file relative to ``root`` (required).
        audio_dir: Fbank directory relative to ``root``.
        visual_dir: Frame directory relative to ``root``.
        image_size: Frame side length.
        audio_length: Crop/pad fbanks to this many time steps.
    """

    def __init__(
        self,
        root: str,
        num_frames: int = 3,
        batch_size: int = 64,
        num_workers: int = 4,
        train_list: str = "train.txt",
        test_list: str = "test.txt",
        val_list: str | None = None,
        class_list: str = "stat.csv",
        audio_dir: str = "audio",
        visual_dir: str = "visual",
        image_size: int = 224,
        audio_length: int | None = None,
    ) -> None:
        super().__init__(
            root=root,
            num_frames=num_frames,
            batch_size=batch_size,
            num_workers=num_workers,
            train_list=train_list,
            test_list=test_list,
            val_list=val_list,
            class_list=class_list,
            default_classes=None,
            audio_dir=audio_dir,
            visual_dir=visual_dir,
            image_size=image_size,
            audio_length=audio_length,
        )

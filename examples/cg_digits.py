"""CG-Digits: the CG-MNIST protocol built offline from scikit-learn's handwritten digits.

CG-MNIST (Colored-and-Gray MNIST, used in the MMPareto paper's multitask comparison) pairs a gray
digit with a monochromatic coloured digit of the same class. In the training split the colour is tied
to the class with high probability, so the coloured modality offers an easy shortcut and dominates
joint training; in validation and test the colour is random, so a model that leaned on the shortcut
fails there and the under-trained gray modality decides the outcome.

CG-Digits reproduces that protocol with the 1,797 8x8 digits that ``sklearn.datasets.load_digits``
ships inside the package (no download):

- ``gray``: the digit image, 1x8x8 in [0, 1].
- ``color``: a *different* image of the same digit class, tinted with one of ten colours
  (3x8x8). Train: the class colour with probability ``color_correlation``, else one of the other
  nine colours. Validation/test: a uniformly random colour.
- ``noisy`` (optional third modality): a third image of the same class with fixed Gaussian noise of
  standard deviation ``noise_std``, a weak but honest view used to show n > 2 encoders.

All randomness of the data (split, pairing, colours, noise) comes from ``split_seed`` and is fixed
when the data module is set up, so every training seed sees the same data.
"""

from __future__ import annotations

from collections.abc import Sequence

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

MODALITY_CHANNELS: dict[str, int] = {"gray": 1, "color": 3, "noisy": 1}
"""Input channels of each CG-Digits modality (all views are 8x8 images)."""

CLASS_NAMES: list[str] = [str(d) for d in range(10)]

# Ten well-separated RGB colours, one per class (index = class the colour is tied to in training).
PALETTE = np.array(
    [
        [1.0, 0.0, 0.0],
        [0.0, 1.0, 0.0],
        [0.0, 0.0, 1.0],
        [1.0, 1.0, 0.0],
        [1.0, 0.0, 1.0],
        [0.0, 1.0, 1.0],
        [1.0, 0.5, 0.0],
        [0.5, 0.0, 1.0],
        [0.5, 0.5, 0.5],
        [0.0, 0.5, 0.25],
    ],
    dtype=np.float32,
)


def _load_sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError('CG-Digits needs scikit-learn: pip install "mmpareto-lightning[examples]"') from err
    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)
    return images, digits.target.astype(np.int64)


def _stratified_split(
    labels: np.ndarray, val_fraction: float, test_fraction: float, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    parts: dict[str, list[np.ndarray]] = {"train": [], "val": [], "test": []}
    for cls in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        n_val = round(len(idx) * val_fraction)
        n_test = round(len(idx) * test_fraction)
        parts["val"].append(idx[:n_val])
        parts["test"].append(idx[n_val : n_val + n_test])
        parts["train"].append(idx[n_val + n_test :])
    return {name: np.sort(np.concatenate(chunks)) for name, chunks in parts.items()}


def _partner_indices(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """For each sample, another sample of the same class within the split (a derangement per class)."""
    partner = np.empty_like(labels)
    for cls in np.unique(labels):
        idx = np.flatnonzero(labels == cls)
        if len(idx) == 1:
            partner[idx] = idx
            continue
        # A random cyclic shift of a permutation never maps an element to itself.
        perm = rng.permutation(idx)
        partner[perm] = np.roll(perm, 1)
    return partner


def _split_colors(labels: np.ndarray, correlation: float, rng: np.random.Generator) -> np.ndarray:
    """Colour index per sample: the class colour with probability ``correlation``, else another one."""
    n_colors = len(PALETTE)
    tied = rng.random(len(labels)) < correlation
    # Offsets 1..n-1 guarantee the "untied" colour differs from the class colour.
    other = (labels + rng.integers(1, n_colors, size=len(labels))) % n_colors
    return np.where(tied, labels, other).astype(np.int64)


def build_cg_digits(
    modalities: Sequence[str] = ("gray", "color"),
    color_correlation: float = 0.97,
    noise_std: float = 0.5,
    split_seed: int = 0,
    val_fraction: float = 0.2,
    test_fraction: float = 0.2,
) -> dict[str, dict[str, torch.Tensor]]:
    """Build the three CG-Digits splits as tensors.

    Args:
        modalities: Views to build, any of ``"gray"``, ``"color"``, ``"noisy"`` (order kept).
        color_correlation: Probability that a training sample's colour is its class colour. Validation
            and test colours are uniformly random (chance agreement 1/10).
        noise_std: Standard deviation of the Gaussian noise of the ``noisy`` view.
        split_seed: Seed of everything random in the data (split, pairing, colours, noise).
        val_fraction: Fraction of each class used for validation.
        test_fraction: Fraction of each class used for test.

    Returns:
        ``{"train"|"val"|"test": {modality: (N, C, 8, 8) float tensor, ..., "label": (N,) long,
        "color_index": (N,) long}}``.
    """
    unknown = set(modalities) - set(MODALITY_CHANNELS)
    if unknown:
        raise ValueError(
            f"unknown CG-Digits modalities {sorted(unknown)}; choose from {list(MODALITY_CHANNELS)}"
        )
    if len(set(modalities)) != len(modalities) or not modalities:
        raise ValueError(f"modalities must be a non-empty list without repeats, got {list(modalities)}")
    if not 0.0 <= color_correlation <= 1.0:
        raise ValueError(f"color_correlation must be in [0, 1], got {color_correlation}")

    images, labels = _load_sklearn_digits()
    rng = np.random.default_rng(split_seed)
    splits = _stratified_split(labels, val_fraction, test_fraction, rng)
    out: dict[str, dict[str, torch.Tensor]] = {}
    for name in ("train", "val", "test"):
        idx = splits[name]
        y = labels[idx]
        x = images[idx]
        # A tie probability of 1/10 makes the colour uniform over all ten colours (no shortcut).
        colors = _split_colors(y, color_correlation if name == "train" else 1.0 / len(PALETTE), rng)
        color_partner = _partner_indices(y, rng)
        noisy_partner = _partner_indices(y, rng)
        noise = rng.normal(0.0, noise_std, size=x.shape).astype(np.float32)
        views = {
            "gray": x[:, None],
            "color": x[color_partner][:, None] * PALETTE[colors][:, :, None, None],
            "noisy": (x[noisy_partner] + noise)[:, None],
        }
        split = {m: torch.from_numpy(np.ascontiguousarray(views[m])) for m in modalities}
        split["label"] = torch.from_numpy(y)
        split["color_index"] = torch.from_numpy(colors)
        out[name] = split
    return out


class DictTensorDataset(Dataset):
    """A dataset over equally long tensors that yields ``{key: tensor[i]}`` dictionaries.

    Args:
        tensors: Tensors sharing their first dimension.
    """

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        lengths = {len(t) for t in tensors.values()}
        if len(lengths) != 1:
            raise ValueError(f"all tensors must have the same length, got {lengths}")
        self.tensors = tensors
        self._length = lengths.pop()

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {key: t[index] for key, t in self.tensors.items()}


class CGDigitsDataModule(pl.LightningDataModule):
    """CG-Digits data module; batches are ``{modality: (B, C, 8, 8), "label": (B,)}`` dictionaries.

    Args:
        modalities: Views to serve, any of ``"gray"``, ``"color"``, ``"noisy"``.
        batch_size: Batch size of every loader.
        color_correlation: Probability that a training colour is the class colour (the shortcut).
        noise_std: Noise of the ``noisy`` view.
        split_seed: Seed of the data itself (split, pairing, colours, noise); independent of the
            training seed so that runs with different seeds see the same data.
        val_fraction: Fraction of each class held out for validation.
        test_fraction: Fraction of each class held out for test.
        num_workers: DataLoader workers (the data is in memory; 0 is fastest).
    """

    def __init__(
        self,
        modalities: Sequence[str] = ("gray", "color"),
        batch_size: int = 64,
        color_correlation: float = 0.97,
        noise_std: float = 0.5,
        split_seed: int = 0,
        val_fraction: float = 0.2,
        test_fraction: float = 0.2,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.modalities = list(modalities)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.class_names = list(CLASS_NAMES)
        self.num_classes = len(CLASS_NAMES)
        self._splits: dict[str, DictTensorDataset] | None = None

    def setup(self, stage: str | None = None) -> None:
        if self._splits is not None:
            return
        hp = self.hparams
        data = build_cg_digits(
            modalities=self.modalities,
            color_correlation=hp.color_correlation,
            noise_std=hp.noise_std,
            split_seed=hp.split_seed,
            val_fraction=hp.val_fraction,
            test_fraction=hp.test_fraction,
        )
        # color_index is bookkeeping for analysis; the models only see modalities and the label.
        self._splits = {
            name: DictTensorDataset({k: v for k, v in split.items() if k != "color_index"})
            for name, split in data.items()
        }

    def dataset(self, split: str) -> DictTensorDataset:
        """The dataset of one split (``"train"``, ``"val"`` or ``"test"``), building the data if needed."""
        self.setup()
        assert self._splits is not None
        return self._splits[split]

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        return DataLoader(
            self.dataset(split),
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

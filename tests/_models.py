"""Tiny multimodal models and data shared by the tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from mmpareto_lightning import MMParetoModule

DIMS = (5, 7, 6, 4)
CLASSES = 3
NAMES = ("audio", "visual", "text", "depth")


class Encoder(nn.Module):
    """BatchNorm, in-place ReLU and dropout: the layers the split must get right."""

    def __init__(
        self, dim: int, width: int = 12, out: int = 8, dropout: float = 0.3, batchnorm: bool = True
    ) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(dim, width),
            nn.BatchNorm1d(width) if batchnorm else nn.Identity(),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(width, out),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class MultiModalNet(MMParetoModule):
    """n encoders, concatenation fusion head, one unimodal head per encoder.

    Args:
        n: number of modalities (2 to 4).
        extra_loss: add an "align" loss between the first two encoders' features, so those encoders
            have three objectives.
        lr, momentum: SGD settings.
        dropout, batchnorm: encoder layers (DDP equivalence tests turn both off).
    """

    def __init__(
        self,
        n: int = 2,
        extra_loss: bool = False,
        lr: float = 0.1,
        momentum: float = 0.0,
        dropout: float = 0.3,
        batchnorm: bool = True,
    ) -> None:
        super().__init__()
        self.names = list(NAMES[:n])
        self.encoders = nn.ModuleDict(
            {
                k: Encoder(d, dropout=dropout, batchnorm=batchnorm)
                for k, d in zip(self.names, DIMS, strict=False)
            }
        )
        self.head = nn.Linear(8 * n, CLASSES)
        self.uni_heads = nn.ModuleDict({k: nn.Linear(8, CLASSES) for k in self.names})
        self.extra_loss = extra_loss
        self.lr, self.momentum = lr, momentum

    def mmpareto_encoders(self) -> dict[str, nn.Module]:
        return {k: self.encoders[k] for k in self.names}

    def losses(self, batch: tuple[torch.Tensor, ...]) -> dict[str, torch.Tensor]:
        *xs, y = batch
        feats = {k: self.encoders[k](x) for k, x in zip(self.names, xs, strict=False)}
        losses = {"multimodal": F.cross_entropy(self.head(torch.cat(list(feats.values()), 1)), y)}
        for k, z in feats.items():
            losses[k] = F.cross_entropy(self.uni_heads[k](z), y)
        if self.extra_loss:
            a, b = self.names[:2]
            losses["align"] = 0.1 * (feats[a] - feats[b]).pow(2).mean()
        return losses

    def training_step(self, batch, batch_idx):
        return self.losses(batch)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum)


class Arch(MMParetoModule):
    """Two tanh encoders, concatenation head, unimodal heads, SGD with lr 1: no training_step here."""

    def __init__(self) -> None:
        super().__init__()
        self.audio = nn.Sequential(nn.Linear(5, 8), nn.Tanh())
        self.visual = nn.Sequential(nn.Linear(7, 8), nn.Tanh())
        self.head = nn.Linear(16, 3)
        self.head_audio = nn.Linear(8, 3)
        self.head_visual = nn.Linear(8, 3)

    def mmpareto_encoders(self):
        return {"audio": self.audio, "visual": self.visual}

    def losses(self, batch):
        xa, xv, y = batch
        za, zv = self.audio(xa), self.visual(xv)
        return {
            "multimodal": F.cross_entropy(self.head(torch.cat([za, zv], 1)), y),
            "audio": F.cross_entropy(self.head_audio(za), y),
            "visual": F.cross_entropy(self.head_visual(zv), y),
        }

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=1.0)


class Net(Arch):
    def training_step(self, batch, batch_idx):
        return self.losses(batch)


def make_data(n: int = 2, size: int = 32, seed: int = 0) -> TensorDataset:
    gen = torch.Generator().manual_seed(seed)
    xs = [torch.randn(size, d, generator=gen) for d in DIMS[:n]]
    y = torch.randint(0, CLASSES, (size,), generator=gen)
    return TensorDataset(*xs, y)


def make_loader(n: int = 2, size: int = 32, batch_size: int = 16, seed: int = 0) -> DataLoader:
    return DataLoader(make_data(n, size, seed), batch_size=batch_size, shuffle=False)


def trainer_kwargs(tmp_path=None, **overrides):
    """Fast, quiet CPU Trainer settings for tests."""
    kwargs = dict(
        accelerator="cpu",
        devices=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        logger=False,
        log_every_n_steps=1,
        num_sanity_val_steps=0,
    )
    kwargs.update(overrides)
    return kwargs


class ResumableLoader(DataLoader):
    """A DataLoader that Lightning can checkpoint mid-epoch: it remembers how many batches it yielded.

    Lightning restarts a plain DataLoader from its first batch when resuming mid-epoch; a loader with
    ``state_dict``/``load_state_dict`` is saved in the checkpoint and resumes where it stopped.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.yielded = 0
        self._skip = 0

    def __iter__(self):
        skip, self._skip = self._skip, 0
        self.yielded = skip
        for i, batch in enumerate(super().__iter__()):
            if i < skip:
                continue
            self.yielded += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"yielded": self.yielded}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._skip = state["yielded"]

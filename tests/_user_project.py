"""A user's own project, written into a temporary folder: their model module and their YAML.

The model is not one of ours: it lives in ``mymodels.py`` next to the config (imported by ``class_path``
from the working directory), logs its own metric names (``val_loss``, ``test_accuracy``) and the config
lists an unrelated callback (``EarlyStopping``) under ``trainer.callbacks``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

MODELS = """
import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from mmpareto_lightning import MMParetoModule


class TinyModel(MMParetoModule):
    def __init__(self, lr: float = 0.1):
        super().__init__()
        self.lr = lr
        self.enc_a = nn.Sequential(nn.Linear(5, 8), nn.Tanh())
        self.enc_b = nn.Sequential(nn.Linear(7, 8), nn.Tanh())
        self.head = nn.Linear(16, 3)
        self.head_a, self.head_b = nn.Linear(8, 3), nn.Linear(8, 3)

    def mmpareto_encoders(self):
        return {"a": self.enc_a, "b": self.enc_b}

    def forward(self, xa, xb):
        return self.head(torch.cat([self.enc_a(xa), self.enc_b(xb)], 1))

    def training_step(self, batch, batch_idx):
        xa, xb, y = batch
        za, zb = self.enc_a(xa), self.enc_b(xb)
        return {
            "multimodal": F.cross_entropy(self.head(torch.cat([za, zb], 1)), y),
            "a": F.cross_entropy(self.head_a(za), y),
            "b": F.cross_entropy(self.head_b(zb), y),
        }

    def validation_step(self, batch, batch_idx):
        xa, xb, y = batch
        self.log("val_loss", F.cross_entropy(self(xa, xb), y))

    def test_step(self, batch, batch_idx):
        xa, xb, y = batch
        self.log("test_accuracy", (self(xa, xb).argmax(1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class TinyData(pl.LightningDataModule):
    def __init__(self, size: int = 48, batch_size: int = 16):
        super().__init__()
        self.size, self.batch_size = size, batch_size

    def _loader(self, seed):
        gen = torch.Generator().manual_seed(seed)
        xa, xb = torch.randn(self.size, 5, generator=gen), torch.randn(self.size, 7, generator=gen)
        y = (xa[:, 0] > 0).long() + (xb[:, 0] > 0).long()
        return DataLoader(TensorDataset(xa, xb, y), batch_size=self.batch_size)

    def train_dataloader(self):
        return self._loader(0)

    def val_dataloader(self):
        return self._loader(1)

    def test_dataloader(self):
        return self._loader(2)
"""


def write_user_project(folder: Path) -> Path:
    """Write ``mymodels.py`` and ``my.yaml`` into ``folder``; return the config's path."""
    (folder / "mymodels.py").write_text(MODELS)
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "max_epochs": 2,
            "log_every_n_steps": 1,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "default_root_dir": "runs",
            "logger": {
                "class_path": "lightning.pytorch.loggers.CSVLogger",
                "init_args": {"save_dir": "runs"},
            },
            "callbacks": [
                {
                    "class_path": "lightning.pytorch.callbacks.EarlyStopping",
                    "init_args": {"monitor": "val_loss", "patience": 5},
                }
            ],
        },
        "model": {"class_path": "mymodels.TinyModel", "init_args": {"lr": 0.1}},
        "data": {"class_path": "mymodels.TinyData"},
    }
    path = folder / "my.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def console_script() -> Path:
    """The installed ``mmpareto-lightning`` script next to this interpreter (skip the test without it)."""
    script = Path(sys.executable).parent / "mmpareto-lightning"
    if not script.is_file():
        pytest.skip("the mmpareto-lightning console script is not installed next to this interpreter")
    return script


def run_in(folder: Path, *args: str | Path) -> subprocess.CompletedProcess:
    """Run a command in ``folder`` (one torch thread, as in the tests) and return the finished process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore::DeprecationWarning"}
    env.pop("PYTHONPATH", None)  # the folder must be found because the command puts it on sys.path
    return subprocess.run(
        [str(a) for a in args], cwd=folder, capture_output=True, text=True, env=env, timeout=600
    )

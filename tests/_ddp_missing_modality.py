"""A 2-process DDP fit in which a modality is missing on one rank (run as a script by the tests).

``python tests/_ddp_missing_modality.py STRATEGY OUT_DIR [ACCUMULATE]``: rank 1 never sees the visual
modality (from the first step on); rank 0 misses it on the third batch of every epoch, so there no rank
has it. The extra "align" loss needs both modalities, so it too exists on rank 0 only. Each rank writes
``OUT_DIR/rank<r>.pt``: its final parameters, the cumulative counters after every step and the epoch
metrics it logged; and ``OUT_DIR/steps<r>.pt`` (``_data_parallel.StepRecorder``): every optimizer step's
batches and the state after it, which the test replays. A script, not an in-process spawn, so that the
plain ``ddp`` launcher (which re-runs the command line) is the one tested, and so that the test can kill
a hung fit.
"""

from __future__ import annotations

import os
import sys

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from _data_parallel import StepRecorder
from _models import MultiModalNet, make_data, trainer_kwargs
from torch.utils.data import DataLoader

from mmpareto_lightning import MMParetoCallback

BATCH, BATCHES, EPOCHS, LR, MOMENTUM = 8, 3, 2, 0.5, 0.9


def visual_present(rank: int, batch_idx: int) -> bool:
    return rank == 0 and batch_idx != 2


def rank_losses(model: MultiModalNet, batch, rank: int, batch_idx: int) -> dict[str, torch.Tensor]:
    """The losses rank ``rank`` returns on ``batch`` (also the single-process reference's loss code)."""
    if visual_present(rank, batch_idx):
        return model.losses(batch)
    xa, _, y = batch
    za = model.encoders["audio"](xa)
    return {
        "multimodal": F.cross_entropy(model.head(torch.cat([za, torch.zeros_like(za)], 1)), y),
        "audio": F.cross_entropy(model.uni_heads["audio"](za), y),
    }


def rank_data(rank: int):
    return make_data(2, size=BATCH * BATCHES, seed=10 + rank)


def initial_model() -> MultiModalNet:
    torch.manual_seed(0)
    # No dropout (per-rank masks) and no BatchNorm (per-rank statistics): the reference replays the ranks.
    return MultiModalNet(n=2, extra_loss=True, lr=LR, momentum=MOMENTUM, dropout=0.0, batchnorm=False)


class MissingVisual(MultiModalNet):
    def training_step(self, batch, batch_idx):
        return rank_losses(self, batch, self.trainer.global_rank, batch_idx)


class Record(pl.Callback):
    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.totals: list[dict] = []
        self.epochs: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        callback = next(c for c in trainer.callbacks if isinstance(c, MMParetoCallback))
        self.totals.append({"totals": callback.totals, "skipped": callback.skipped_steps})

    def _epoch_metrics(self, trainer) -> None:
        self.epochs.append({k: float(v) for k, v in trainer.callback_metrics.items() if k.endswith("_epoch")})

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch > 0:  # the previous epoch's values are in callback_metrics by now
            self._epoch_metrics(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        self._epoch_metrics(trainer)
        state = {
            "params": {k: v.detach().clone() for k, v in pl_module.named_parameters()},
            "totals": self.totals,
            "epochs": self.epochs,
            "global_step": trainer.global_step,
        }
        torch.save(state, os.path.join(self.directory, f"rank{trainer.global_rank}.pt"))


def main(strategy: str, directory: str, accumulate: int = 1) -> None:
    model = MissingVisual(n=2, extra_loss=True, lr=LR, momentum=MOMENTUM, dropout=0.0, batchnorm=False)
    model.load_state_dict(initial_model().state_dict())
    trainer = pl.Trainer(
        max_epochs=EPOCHS,
        strategy=strategy,
        callbacks=[
            MMParetoCallback(accumulate_grad_batches=accumulate),
            Record(directory),
            StepRecorder(directory),
        ],
        **trainer_kwargs(devices=2, use_distributed_sampler=False),
    )

    class PerRank(pl.LightningDataModule):
        def train_dataloader(self):
            return DataLoader(rank_data(self.trainer.global_rank), batch_size=BATCH, shuffle=False)

    trainer.fit(model, datamodule=PerRank())


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 1)

"""torchmetrics that show what MMPareto does to each encoder during training.

Per encoder: ``MeanMetric`` for cos beta, the weights alpha of the multimodal and the unimodal gradient
and the rescale factor; ``SumMetric`` for the steps with a gradient conflict and the Pareto-stationary
steps. The values come from gradients that are already averaged across processes, so every rank holds
the same numbers: the metrics do not sync again (``sync_on_compute=False``), which would multiply the
counts by the world size.

The training losses are ``MeanMetric`` too: their step values are the rank's own batch (no collective in
the step) and their epoch means are averaged across ranks once, when the epoch ends.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn
from torchmetrics import MeanMetric, Metric, SumMetric

from mmpareto_lightning.rule import RuleStats

__all__ = ["METRIC_NAMES", "MMParetoMetrics"]

METRIC_NAMES: tuple[str, ...] = (
    "cos_beta",
    "alpha_multimodal",
    "alpha_unimodal",
    "rescale",
    "conflicts",
    "stationary",
)


def _mean() -> MeanMetric:
    return MeanMetric(nan_strategy="disable", sync_on_compute=False)


def _sum() -> SumMetric:
    return SumMetric(nan_strategy="disable", sync_on_compute=False)


class MMParetoMetrics(nn.Module):
    """The MMPareto metrics of a set of encoders.

    Args:
        encoders: encoder names.
        prefix: logging namespace; metric keys are ``f"{prefix}/{encoder}/{name}"``.

    Example::

        metrics = MMParetoMetrics(["audio", "visual"])
        for key, metric in metrics.update(stats).items():
            lightning_module.log(key, metric, on_step=True, on_epoch=True)
    """

    def __init__(self, encoders: Sequence[str], prefix: str = "mmpareto") -> None:
        super().__init__()
        self.prefix = prefix
        self.per_encoder = nn.ModuleDict(
            {
                name: nn.ModuleDict(
                    {
                        "cos_beta": _mean(),
                        "alpha_multimodal": _mean(),
                        "alpha_unimodal": _mean(),
                        "rescale": _mean(),
                        "conflicts": _sum(),
                        "stationary": _sum(),
                    }
                )
                for name in encoders
            }
        )
        # Created on the first step, when the loss names are known.
        self.losses = nn.ModuleDict()

    def update_losses(self, losses: Mapping[str, Tensor], prefix: str = "train") -> dict[str, Metric]:
        """Add one step's losses (and their sum); returns ``f"{prefix}/loss_<name>"`` -> metric."""
        values = dict(losses)
        values[""] = torch.stack([v.reshape(()) for v in losses.values()]).sum()
        logged: dict[str, Metric] = {}
        for name, value in values.items():
            key = f"loss_{name}" if name else "loss"
            if key not in self.losses:
                self.losses[key] = MeanMetric(nan_strategy="disable").to(value.device)
            finite = torch.isfinite(value)
            self.losses[key](torch.where(finite, value.float(), 0.0), finite.float())
            logged[f"{prefix}/{key}"] = self.losses[key]
        return logged

    def update(self, stats: Mapping[str, RuleStats], valid: Tensor | None = None) -> dict[str, Metric]:
        """Add one step's statistics; returns key -> metric, ready for ``LightningModule.log``.

        Args:
            stats: encoder -> :class:`RuleStats` of the step.
            valid: 0-d bool tensor; a step whose update was skipped (non-finite values) enters with zero
                weight instead of poisoning the means.
        """
        logged: dict[str, Metric] = {}
        for name, s in stats.items():
            metrics = self.per_encoder[name]
            ok = s.finite if valid is None else s.finite & valid
            weight = ok.to(torch.float32)
            values = {
                "cos_beta": s.cos_beta,
                "alpha_multimodal": s.alphas[0],
                "alpha_unimodal": s.alphas[1],
                "rescale": s.rescale,
            }
            for key, value in values.items():
                value = torch.where(ok, value.to(torch.float32), 0.0)
                metrics[key](value, weight)
            metrics["conflicts"]((s.conflict & ok).to(torch.float32))
            metrics["stationary"]((s.stationary & ok).to(torch.float32))
            for key in METRIC_NAMES:
                logged[f"{self.prefix}/{name}/{key}"] = metrics[key]
        return logged

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
    """The MMPareto metrics of a set of encoders, and the training losses.

    Every step adds its values with ``update`` (no ``forward``: computing a per-batch value each step
    would double the work); :meth:`step_values` gives the step's plain tensors for the logger on the
    steps Lightning writes logs, and :meth:`epoch_metrics` the metric objects to log at epoch end.

    Args:
        encoders: encoder names.
        prefix: logging namespace of the rule's metrics: ``f"{prefix}/{encoder}/{name}"``.
        loss_prefix: logging namespace of the losses: ``f"{loss_prefix}/loss_{name}"``.

    Example::

        metrics = MMParetoMetrics(["audio", "visual"])
        metrics.update(stats)                              # every step
        lightning_module.log_dict(metrics.step_values(stats))  # on logging steps
        for key, metric in metrics.epoch_metrics().items():   # at epoch end
            lightning_module.log(key, metric, on_step=False, on_epoch=True)
    """

    def __init__(self, encoders: Sequence[str], prefix: str = "mmpareto", loss_prefix: str = "train") -> None:
        super().__init__()
        self.prefix = prefix
        self.loss_prefix = loss_prefix
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

    @staticmethod
    def _with_total(losses: Mapping[str, Tensor]) -> dict[str, Tensor]:
        values = {f"loss_{k}": v.detach().reshape(()) for k, v in losses.items()}
        values["loss"] = torch.stack(list(values.values())).sum()
        return values

    def update_losses(self, losses: Mapping[str, Tensor]) -> bool:
        """Add one step's losses and their sum. Returns whether new loss metrics were created."""
        created = False
        for key, value in self._with_total(losses).items():
            if key not in self.losses:
                # Default sync_on_compute: the epoch mean of a rank-local loss is averaged across ranks.
                self.losses[key] = MeanMetric(nan_strategy="disable").to(value.device)
                created = True
            finite = torch.isfinite(value)
            self.losses[key].update(torch.where(finite, value.float(), 0.0), finite.float())
        return created

    def loss_step_values(self, losses: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``f"{loss_prefix}/loss_<name>_step"`` -> this step's (rank-local) loss."""
        return {f"{self.loss_prefix}/{k}_step": v for k, v in self._with_total(losses).items()}

    def update(self, stats: Mapping[str, RuleStats], valid: Tensor | None = None) -> None:
        """Add one step's statistics.

        Args:
            stats: encoder -> :class:`RuleStats` of the step.
            valid: 0-d bool tensor; a step whose update was skipped (non-finite values) enters with zero
                weight instead of poisoning the means.
        """
        for name, s in stats.items():
            metrics = self.per_encoder[name]
            ok = s.finite if valid is None else s.finite & valid
            weight = ok.to(torch.float32)
            for key, value in self._means(s).items():
                metrics[key].update(torch.where(ok, value, 0.0), weight)
            metrics["conflicts"].update((s.conflict & ok).to(torch.float32))
            metrics["stationary"].update((s.stationary & ok).to(torch.float32))

    @staticmethod
    def _means(s: RuleStats) -> dict[str, Tensor]:
        return {
            "cos_beta": s.cos_beta.to(torch.float32),
            "alpha_multimodal": s.alphas[0].to(torch.float32),
            "alpha_unimodal": s.alphas[1].to(torch.float32),
            "rescale": s.rescale.to(torch.float32),
        }

    def step_values(self, stats: Mapping[str, RuleStats]) -> dict[str, Tensor]:
        """``f"{prefix}/<encoder>/<name>_step"`` -> this step's value, as 0-d tensors on the device."""
        values: dict[str, Tensor] = {}
        for name, s in stats.items():
            step = {**self._means(s), "conflicts": s.conflict.float(), "stationary": s.stationary.float()}
            for key in METRIC_NAMES:
                values[f"{self.prefix}/{name}/{key}_step"] = step[key]
        return values

    def epoch_metrics(self) -> dict[str, Metric]:
        """``"<key>_epoch"`` -> metric (epoch means of the rule's values and losses, epoch counts)."""
        out: dict[str, Metric] = {}
        for name, metrics in self.per_encoder.items():
            for key in METRIC_NAMES:
                out[f"{self.prefix}/{name}/{key}_epoch"] = metrics[key]
        for key, metric in self.losses.items():
            out[f"{self.loss_prefix}/{key}_epoch"] = metric
        return out

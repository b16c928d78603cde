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

    Every step adds its values to one running-sum tensor per encoder (a single device op: updating a
    dozen torchmetrics objects per step would cost more CPU time than the rule itself). At epoch end
    :meth:`epoch_metrics` folds the sums into the torchmetrics objects, which Lightning computes, syncs
    where needed, logs and resets; a weighted mean of weighted means is the same mean.
    :meth:`step_values` gives a step's plain tensors for the steps Lightning writes logs.

    Args:
        encoders: encoder names.
        prefix: logging namespace of the rule's metrics: ``f"{prefix}/{encoder}/{name}"``.
        loss_prefix: logging namespace of the losses: ``f"{loss_prefix}/loss_{name}"``.

    Example::

        metrics = MMParetoMetrics(["audio", "visual"])
        metrics.update(stats)                                  # every step
        lightning_module.log_dict(metrics.step_values(stats))  # on logging steps
        for key, metric in metrics.epoch_metrics().items():    # at epoch end
            lightning_module.log(key, metric, on_step=False, on_epoch=True)
    """

    _MEANS = ("cos_beta", "alpha_multimodal", "alpha_unimodal", "rescale")

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
        # encoder -> [sum w*cos, sum w*alpha_m, sum w*alpha_u, sum w*rescale, sum w, conflicts, stationary]
        self._running: dict[str, Tensor] = {}
        self._loss_names: list[str] = []
        self._loss_running: Tensor | None = None  # (2, L): sum of finite losses, count of finite ones

    @staticmethod
    def loss_values(losses: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``"loss_<name>"`` -> detached scalar loss, plus ``"loss"``: their sum."""
        values = {f"loss_{k}": v.detach().reshape(()) for k, v in losses.items()}
        values["loss"] = torch.stack(list(values.values())).sum()
        return values

    def update_losses(self, values: Mapping[str, Tensor]) -> bool:
        """Add one step's :meth:`loss_values`. Returns whether new loss metrics were created."""
        names = list(values)
        created = False
        if names != self._loss_names:
            self._flush_losses()
            self._loss_names = names
            for key, value in values.items():
                if key not in self.losses:
                    # Default sync_on_compute: the epoch mean of a rank-local loss is averaged across ranks.
                    self.losses[key] = MeanMetric(nan_strategy="disable").to(value.device)
                    created = True
        stacked = torch.stack(list(values.values())).float()
        finite = torch.isfinite(stacked)
        step = torch.stack([torch.where(finite, stacked, 0.0), finite.float()])
        self._loss_running = step if self._loss_running is None else self._loss_running + step
        return created

    def loss_step_values(self, values: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``f"{loss_prefix}/loss_<name>_step"`` -> the step's rank-local loss (from :meth:`loss_values`)."""
        return {f"{self.loss_prefix}/{k}_step": v for k, v in values.items()}

    def update(self, stats: Mapping[str, RuleStats], valid: Tensor | None = None) -> None:
        """Add one step's statistics.

        Args:
            stats: encoder -> :class:`RuleStats` of the step.
            valid: 0-d bool tensor; a step whose update was skipped (non-finite values) enters with zero
                weight instead of poisoning the means.
        """
        for name, s in stats.items():
            ok = s.finite if valid is None else s.finite & valid
            weight = ok.to(torch.float32)
            means = [torch.where(ok, v, 0.0) * weight for v in self._means(s).values()]
            step = torch.stack([*means, weight, (s.conflict & ok).float(), (s.stationary & ok).float()])
            running = self._running.get(name)
            self._running[name] = step if running is None else running.add_(step)

    @classmethod
    def _means(cls, s: RuleStats) -> dict[str, Tensor]:
        values = (s.cos_beta, s.alphas[0], s.alphas[1], s.rescale)
        return {k: v.to(torch.float32) for k, v in zip(cls._MEANS, values, strict=True)}

    def step_values(self, stats: Mapping[str, RuleStats]) -> dict[str, Tensor]:
        """``f"{prefix}/<encoder>/<name>_step"`` -> this step's value, as 0-d tensors on the device."""
        values: dict[str, Tensor] = {}
        for name, s in stats.items():
            step = {**self._means(s), "conflicts": s.conflict.float(), "stationary": s.stationary.float()}
            for key in METRIC_NAMES:
                values[f"{self.prefix}/{name}/{key}_step"] = step[key]
        return values

    def _flush_losses(self) -> None:
        if self._loss_running is None:
            return
        sums, counts = self._loss_running
        for i, key in enumerate(self._loss_names):
            self.losses[key].update(sums[i] / counts[i].clamp_min(1), counts[i])
        self._loss_running = None

    def flush(self) -> None:
        """Fold the running sums of the epoch into the torchmetrics objects."""
        for name, running in self._running.items():
            metrics = self.per_encoder[name]
            weight = running[4]
            for i, key in enumerate(self._MEANS):
                metrics[key].update(running[i] / weight.clamp_min(1), weight)
            metrics["conflicts"].update(running[5])
            metrics["stationary"].update(running[6])
        self._running = {}
        self._flush_losses()

    def epoch_metrics(self) -> dict[str, Metric]:
        """``"<key>_epoch"`` -> metric (epoch means of the rule's values and losses, epoch counts)."""
        self.flush()
        out: dict[str, Metric] = {}
        for name, metrics in self.per_encoder.items():
            for key in METRIC_NAMES:
                out[f"{self.prefix}/{name}/{key}_epoch"] = metrics[key]
        for key, metric in self.losses.items():
            out[f"{self.loss_prefix}/{key}_epoch"] = metric
        return out

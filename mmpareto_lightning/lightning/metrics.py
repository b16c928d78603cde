"""torchmetrics that show what MMPareto does to each encoder during training.

Per encoder: ``MeanMetric`` for cos beta, the weight alpha of every objective, the rescale factor and
the conflict rate; ``SumMetric`` for the steps with a gradient conflict and the Pareto-stationary
steps. The values come from gradients that are already averaged across processes, so every rank holds
the same numbers: the metrics do not sync again (``sync_on_compute=False``), which would multiply the
counts by the world size.

The training losses are ``MeanMetric`` too: their step values are the rank's own batch (no collective in
the step) and their epoch means are averaged across ranks once, when the epoch ends.

Every key lives under one namespace (``mmpareto/`` by default), so nothing the plugin logs can overwrite
a key the user logs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn
from torchmetrics import MeanMetric, Metric, SumMetric

from mmpareto_lightning.rule import RuleStats

__all__ = ["MMParetoMetrics", "alpha_keys"]


def _mean() -> MeanMetric:
    return MeanMetric(nan_strategy="disable", sync_on_compute=False)


def _sum() -> SumMetric:
    return SumMetric(nan_strategy="disable", sync_on_compute=False)


def alpha_keys(objectives: Sequence[str]) -> list[str]:
    """Metric names of the weights of an encoder's objectives (multimodal first, unimodal second).

    The first two are named by their role; further objectives (other losses that reach the encoder) by
    their loss name.
    """
    keys = ["alpha_multimodal", "alpha_unimodal"]
    for name in objectives[2:]:
        key = f"alpha_{name}"
        keys.append(key if key not in keys else f"alpha_loss_{name}")
    return keys


class _EncoderMetrics(nn.Module):
    """The metrics of one encoder; the alpha metrics follow the encoder's objectives."""

    def __init__(self) -> None:
        super().__init__()
        self.means = nn.ModuleDict({"cos_beta": _mean(), "rescale": _mean(), "conflict_rate": _mean()})
        self._alpha_list = nn.ModuleList()
        self.alphas: dict[str, MeanMetric] = {}  # keyed by loss names, which a ModuleDict may refuse
        self.sums = nn.ModuleDict({"conflicts": _sum(), "stationary": _sum()})
        self.alpha_names: list[str] = []
        # [sum w*cos, sum w*rescale, sum w*alpha_0 .. sum w*alpha_{K-1}, sum w, conflicts, stationary]
        self.running: Tensor | None = None


class MMParetoMetrics(nn.Module):
    """The MMPareto metrics of a set of encoders, and the training losses.

    Every step adds its values to one running-sum tensor per encoder (a single device op: updating a
    dozen torchmetrics objects per step would cost more CPU time than the rule itself). At epoch end
    :meth:`epoch_metrics` folds the sums into the torchmetrics objects, which Lightning computes, syncs
    where needed, logs and resets; a weighted mean of weighted means is the same mean.
    :meth:`step_values` gives a step's plain tensors for the steps Lightning writes logs.

    Args:
        encoders: encoder names.
        prefix: logging namespace: ``f"{prefix}/{encoder}/{name}"`` for the rule's metrics and
            ``f"{prefix}/loss_{name}"`` for the losses.

    Example::

        metrics = MMParetoMetrics(["audio", "visual"])
        metrics.set_objectives("audio", ["multimodal", "audio"])  # when the objectives are known
        metrics.update(stats)                                      # every step
        lightning_module.log_dict(metrics.step_values(stats))      # on logging steps
        for key, metric in metrics.epoch_metrics().items():        # at epoch end
            lightning_module.log(key, metric, on_step=False, on_epoch=True)
    """

    def __init__(self, encoders: Sequence[str], prefix: str = "mmpareto") -> None:
        super().__init__()
        self.prefix = prefix
        # Lists, not ModuleDicts: encoder and loss names are free-form ("a.b", "type", "training").
        self.encoder_names = list(encoders)
        self._encoder_metrics = nn.ModuleList([_EncoderMetrics() for _ in encoders])
        self.per_encoder: dict[str, _EncoderMetrics] = dict(
            zip(self.encoder_names, self._encoder_metrics, strict=True)  # type: ignore[arg-type]
        )
        # Created on the first step, when the loss names are known.
        self._loss_metrics = nn.ModuleList()
        self.losses: dict[str, MeanMetric] = {}
        self._loss_names: list[str] = []
        self._loss_running: Tensor | None = None  # (2, L): sum of finite losses, count of finite ones

    # ------------------------------------------------------------------ losses
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
                    self._loss_metrics.append(self.losses[key])
                    created = True
        stacked = torch.stack(list(values.values())).float()
        finite = torch.isfinite(stacked)
        step = torch.stack([torch.where(finite, stacked, 0.0), finite.float()])
        self._loss_running = step if self._loss_running is None else self._loss_running + step
        return created

    def loss_step_values(self, values: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``f"{prefix}/loss_<name>_step"`` -> the step's rank-local loss (from :meth:`loss_values`)."""
        return {f"{self.prefix}/{k}_step": v for k, v in values.items()}

    def _flush_losses(self) -> None:
        if self._loss_running is None:
            return
        sums, counts = self._loss_running
        for i, key in enumerate(self._loss_names):
            self.losses[key].update(sums[i] / counts[i].clamp_min(1), counts[i])
        self._loss_running = None

    # ------------------------------------------------------------------ the rule's statistics
    def set_objectives(self, encoder: str, objectives: Sequence[str]) -> bool:
        """Name the objectives whose weights ``encoder`` logs. Returns whether new metrics were created.

        Args:
            encoder: the encoder's name.
            objectives: the loss names of its objectives, multimodal first and unimodal second.
        """
        metrics = self.per_encoder[encoder]
        names = alpha_keys(objectives)
        if names == metrics.alpha_names:
            return False
        self._flush_encoder(metrics)
        metrics.alpha_names = names
        created = False
        device = metrics.sums["conflicts"].sum_value.device  # type: ignore[union-attr]
        for key in names:
            if key not in metrics.alphas:
                metrics.alphas[key] = _mean().to(device)
                metrics._alpha_list.append(metrics.alphas[key])
                created = True
        return created

    def update(self, stats: Mapping[str, RuleStats], valid: Tensor | None = None) -> None:
        """Add one step's statistics.

        Args:
            stats: encoder -> :class:`RuleStats` of the step (encoders absent this step are left out).
            valid: 0-d bool tensor; a step whose update was skipped (non-finite values) enters with zero
                weight instead of poisoning the means.
        """
        for name, s in stats.items():
            ok = s.finite if valid is None else s.finite & valid
            weight = ok.to(torch.float32)
            means = torch.cat([s.cos_beta.reshape(1), s.rescale.reshape(1), s.alphas.reshape(-1)]).float()
            step = torch.cat(
                [
                    torch.where(ok, means, 0.0) * weight,
                    torch.stack([weight, (s.conflict & ok).float(), (s.stationary & ok).float()]),
                ]
            )
            metrics = self.per_encoder[name]
            if metrics.running is not None and metrics.running.shape != step.shape:
                self._flush_encoder(metrics)
            metrics.running = step if metrics.running is None else metrics.running.add_(step)

    def step_values(self, stats: Mapping[str, RuleStats]) -> dict[str, Tensor]:
        """``f"{prefix}/<encoder>/<name>_step"`` -> this step's value, as 0-d tensors on the device."""
        values: dict[str, Tensor] = {}
        for name, s in stats.items():
            metrics = self.per_encoder[name]
            base = f"{self.prefix}/{name}/"
            values[base + "cos_beta_step"] = s.cos_beta.float()
            for key, alpha in zip(metrics.alpha_names, s.alphas.float().unbind(), strict=True):
                values[base + f"{key}_step"] = alpha
            values[base + "rescale_step"] = s.rescale.float()
            values[base + "conflicts_step"] = s.conflict.float()
            values[base + "stationary_step"] = s.stationary.float()
        return values

    def _flush_encoder(self, metrics: _EncoderMetrics) -> None:
        running = metrics.running
        if running is None:
            return
        k = len(running) - 5
        weight, conflicts, stationary = running[-3], running[-2], running[-1]
        safe = weight.clamp_min(1)
        metrics.means["cos_beta"].update(running[0] / safe, weight)
        metrics.means["rescale"].update(running[1] / safe, weight)
        metrics.means["conflict_rate"].update(conflicts / safe, weight)
        for i, key in enumerate(metrics.alpha_names[:k]):
            metrics.alphas[key].update(running[2 + i] / safe, weight)
        metrics.sums["conflicts"].update(conflicts)
        metrics.sums["stationary"].update(stationary)
        metrics.running = None

    def flush(self) -> None:
        """Fold the running sums of the epoch into the torchmetrics objects."""
        for metrics in self.per_encoder.values():
            self._flush_encoder(metrics)
        self._flush_losses()

    def epoch_metrics(self) -> dict[str, Metric]:
        """``"<key>_epoch"`` -> metric (epoch means of the rule's values and losses, epoch counts)."""
        self.flush()
        out: dict[str, Metric] = {}
        for name, metrics in self.per_encoder.items():
            base = f"{self.prefix}/{name}/"
            out[base + "cos_beta_epoch"] = metrics.means["cos_beta"]
            for key in metrics.alpha_names:
                out[base + f"{key}_epoch"] = metrics.alphas[key]
            out[base + "rescale_epoch"] = metrics.means["rescale"]
            out[base + "conflicts_epoch"] = metrics.sums["conflicts"]
            out[base + "stationary_epoch"] = metrics.sums["stationary"]
            out[base + "conflict_rate_epoch"] = metrics.means["conflict_rate"]
        for key, metric in self.losses.items():
            out[f"{self.prefix}/{key}_epoch"] = metric
        return out

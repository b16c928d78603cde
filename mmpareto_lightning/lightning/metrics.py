"""torchmetrics that show what MMPareto does to each encoder during training.

Per encoder: ``MeanMetric`` for cos beta, the weight alpha of every objective, the rescale factor and
the conflict rate; ``SumMetric`` for the steps with a gradient conflict and the Pareto-stationary
steps. The values come from gradients that are already averaged across processes, so every rank holds
the same numbers: the metrics do not sync again (``sync_on_compute=False``), which would multiply the
counts by the world size.

The training losses are ``MeanMetric`` too: their step values are the rank's own batch (no collective in
the step) and their epoch means are averaged across ranks once, when the epoch ends, by one exchange of
every rank's per-loss sums and counts (:meth:`MMParetoMetrics.epoch_metrics`). Ranks may have seen
different losses (a modality missing on one rank): the exchange gives every rank the same loss metrics
with the same values, so they log the same keys, and no torchmetrics collective runs (those are one per
metric state, and they hang or abort when the ranks hold different metrics).

Every key lives under one namespace (``mmpareto/`` by default), so nothing the plugin logs can overwrite
a key the user logs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics import MeanMetric, Metric, SumMetric

from mmpareto_lightning.rule import RuleStats

__all__ = ["MMParetoMetrics", "alpha_keys"]


def _mean() -> MeanMetric:
    return MeanMetric(nan_strategy="disable", sync_on_compute=False)


def _loss_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64


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
        # Created at the end of the first epoch that saw the loss (on any rank).
        self._loss_metrics = nn.ModuleList()
        self.losses: dict[str, MeanMetric] = {}
        self._loss_names: list[str] = []
        self._loss_running: Tensor | None = None  # (2, L): sum of finite losses, count of finite ones
        # The current optimizer step's batches (names, (2, L)): they enter the sums with the step's
        # weight, 0 for a skipped step, once the step is decided (close_loss_window).
        self._loss_window: list[tuple[list[str], Tensor]] = []
        self._epoch_losses: dict[str, Tensor] = {}  # name -> (2,): the epoch's sum and count so far

    # ------------------------------------------------------------------ losses
    @staticmethod
    def loss_values(losses: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``"loss_<name>"`` -> detached scalar loss, plus ``"loss"``: their sum."""
        values = {f"loss_{k}": v.detach().reshape(()) for k, v in losses.items()}
        values["loss"] = torch.stack(list(values.values())).sum()
        return values

    def update_losses(self, values: Mapping[str, Tensor]) -> None:
        """Hold one batch's :meth:`loss_values` until its optimizer step is decided (device ops only:
        nothing is read back). Sums are float64 (float32 on MPS): a float64 model's finite losses beyond
        float32's range must not read as non-finite."""
        stacked = torch.stack(list(values.values()))
        stacked = stacked.to(_loss_dtype(stacked.device))
        finite = torch.isfinite(stacked)
        step = torch.stack([torch.where(finite, stacked, 0.0), finite.to(stacked.dtype)])
        self._loss_window.append((list(values), step))

    def close_loss_window(self, valid: Tensor | None = None) -> None:
        """The optimizer step of the held batches is decided: they enter the epoch's means with weight
        ``valid`` (0-d bool tensor; ``False`` for a skipped step, as the rule's statistics do)."""
        for names, step in self._loss_window:
            if names != self._loss_names:
                self._flush_losses()
                self._loss_names = names
            if valid is not None:
                step = step * valid.to(step.dtype)
            self._loss_running = step if self._loss_running is None else self._loss_running + step
        self._loss_window = []

    def loss_step_values(self, values: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``f"{prefix}/loss_<name>_step"`` -> the step's rank-local loss (from :meth:`loss_values`)."""
        return {f"{self.prefix}/{k}_step": v for k, v in values.items()}

    def _flush_losses(self) -> None:
        if self._loss_running is None:
            return
        for i, key in enumerate(self._loss_names):
            column = self._loss_running[:, i]
            earlier = self._epoch_losses.get(key)
            self._epoch_losses[key] = column if earlier is None else earlier + column
        self._loss_running = None

    def _epoch_loss_metrics(self, gather: Callable[[Any], list[Any]] | None) -> None:
        """Fold the epoch's loss sums into the loss metrics: this rank's, or with ``gather`` (every rank's
        value of its argument, in rank order) the sums and counts of all ranks, the same on every rank."""
        self.close_loss_window()  # (accumulation windows end with the epoch: normally nothing is left)
        self._flush_losses()
        local, self._epoch_losses = self._epoch_losses, {}
        if gather is None:
            totals = {key: (t[0], t[1]) for key, t in local.items()}
        else:
            # The epoch's one host read and one exchange; float64 sums in rank order, so every rank
            # computes the same values.
            sums = torch.stack(list(local.values())).double().tolist() if local else []
            merged: dict[str, list[float]] = {}
            for ranks_losses in gather(dict(zip(local, sums, strict=True))):
                for key, (total, count) in ranks_losses.items():
                    acc = merged.setdefault(key, [0.0, 0.0])
                    acc[0] += total
                    acc[1] += count
            device = self._device()
            kind = {"dtype": _loss_dtype(device), "device": device}
            totals = {k: (torch.tensor(v, **kind), torch.tensor(c, **kind)) for k, (v, c) in merged.items()}
        for key, (total, count) in totals.items():
            if key not in self.losses:
                self.losses[key] = _mean().to(self._device())
                self.losses[key].set_dtype(_loss_dtype(self._device()))
                self._loss_metrics.append(self.losses[key])
            self.losses[key].update(total / count.clamp_min(1), count)

    def _device(self) -> torch.device:
        return self._encoder_metrics[0].sums["conflicts"].sum_value.device  # type: ignore[union-attr,index]

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
        device = self._device()
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
        """Fold the running sums of the rule's statistics into the torchmetrics objects."""
        for metrics in self.per_encoder.values():
            self._flush_encoder(metrics)

    def reset(self) -> None:
        """Drop the epoch's values without logging them (``log_on_epoch=False``)."""
        self.flush()
        self._loss_window = []
        self._flush_losses()
        self._epoch_losses = {}
        for metric in self.modules():
            if isinstance(metric, Metric):
                metric.reset()

    def epoch_metrics(self, gather: Callable[[Any], list[Any]] | None = None) -> dict[str, Metric]:
        """``"<key>_epoch"`` -> metric (epoch means of the rule's values and losses, epoch counts).

        Args:
            gather: data parallel: returns every rank's value of its argument, in rank order (e.g.
                :meth:`~mmpareto_lightning.distributed.HostExchange.gather`). The loss means are then
                taken over all ranks' steps, once per epoch; the rule's values already are global.
        """
        self.flush()
        self._epoch_loss_metrics(gather)
        out: dict[str, Metric] = {}
        for name, metrics in self.per_encoder.items():
            base = f"{self.prefix}/{name}/"
            out[base + "cos_beta_epoch"] = metrics.means["cos_beta"]
            # Every objective's weight met this epoch, also one that reached the encoder only on some steps
            # (its mean is over those steps); the caller logs the metrics that were updated.
            for key, alpha in metrics.alphas.items():
                out[base + f"{key}_epoch"] = alpha
            out[base + "rescale_epoch"] = metrics.means["rescale"]
            out[base + "conflicts_epoch"] = metrics.sums["conflicts"]
            out[base + "stationary_epoch"] = metrics.sums["stationary"]
            out[base + "conflict_rate_epoch"] = metrics.means["conflict_rate"]
        for key, metric in self.losses.items():
            out[f"{self.prefix}/{key}_epoch"] = metric
        return out

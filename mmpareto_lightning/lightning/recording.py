"""What the callback records beside the metrics: the cumulative counts kept in checkpoints, the message of
a skipped step, and when Lightning writes step logs."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import lightning.pytorch as pl
import torch
from torch import Tensor

from mmpareto_lightning.rule import RuleStats

__all__ = ["Totals", "is_logging_step", "monitored_keys", "plugin_key", "skipped_step_message"]


class Totals:
    """Per encoder, the cumulative conflict and Pareto-stationary counts, and the skipped-step counter:
    device tensors (logging a Python number would copy it to the device every step), kept in
    checkpoints through :meth:`state` and :meth:`load`."""

    def __init__(self) -> None:
        self.counts: dict[str, Tensor] = {}
        self.loaded: dict[str, dict[str, int]] = {}
        self.skipped = torch.zeros(())

    def start(self, encoders: Iterable[str], skipped_steps: int, device: torch.device) -> None:
        """A fit begins: the counts continue from a loaded checkpoint's, if any."""
        self.counts = {}
        for name in encoders:
            loaded = self.loaded.get(name, {})
            counts = [loaded.get("conflicts", 0), loaded.get("stationary", 0)]
            self.counts[name] = torch.tensor(counts, dtype=torch.float32, device=device)
        self.skipped = torch.tensor(float(skipped_steps), device=device)

    def to(self, device: torch.device) -> None:
        self.counts = {k: v.to(device) for k, v in self.counts.items()}
        self.skipped = self.skipped.to(device)

    def add(self, stats: Mapping[str, RuleStats], valid: Tensor | None) -> None:
        """Count the step's conflicts and stationary encoders (not those of a skipped step)."""
        for name, s in stats.items():
            ok = s.finite if valid is None else s.finite & valid
            self.counts[name] += torch.stack([s.conflict & ok, s.stationary & ok]).to(torch.float32)

    def values(self) -> dict[str, Tensor]:
        """The logged keys: ``mmpareto/<e>/conflicts_total``, ``stationary_total``, ``skipped_steps``."""
        values: dict[str, Tensor] = {}
        for name, totals in self.counts.items():
            values[f"mmpareto/{name}/conflicts_total"] = totals[0]
            values[f"mmpareto/{name}/stationary_total"] = totals[1]
        values["mmpareto/skipped_steps"] = self.skipped
        return values

    def state(self) -> dict[str, dict[str, int]]:
        """The counts as Python numbers (reads the device)."""
        counts = {
            name: {"conflicts": int(t[0].item()), "stationary": int(t[1].item())}
            for name, t in self.counts.items()
        }
        return counts or self.loaded

    def load(self, totals: Mapping[str, Mapping[str, int]], skipped_steps: int) -> None:
        self.loaded = {k: dict(v) for k, v in totals.items()}
        self.skipped.fill_(float(skipped_steps))
        for name, t in self.counts.items():
            loaded = self.loaded.get(name, {})
            t.copy_(torch.tensor([loaded.get("conflicts", 0), loaded.get("stationary", 0)], dtype=t.dtype))


def skipped_step_message(step: int, bad_losses: list[str], stats: Mapping[str, RuleStats]) -> str:
    """Why the optimizer step ``step`` was skipped: the non-finite losses, the encoders whose gradients
    were not finite, and those whose integrated gradient would not fit the dtype (reads the device)."""
    bad_encoders = [name for name, s in stats.items() if not bool(s.finite)]
    too_large = [name for name, s in stats.items() if bool(s.finite) and not bool(s.fits)]
    beyond = (
        f"; the integrated gradient of {too_large} does not fit the gradients' dtype (finite inputs, "
        "but the rescaled step would exceed its range: lower the learning rate or the loss scale)"
        if too_large
        else ""
    )
    return (
        f"MMPareto: non-finite values at global step {step}: loss(es) "
        f"{bad_losses or 'none (all losses finite)'}; encoder gradients of {bad_encoders or 'no encoder'} "
        f"(or a head's gradient) not finite{beyond}. The optimizer step was skipped (it counts as a step, "
        "as a GradScaler's skipped step does) and the parameters are untouched."
    )


def monitored_keys(trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[str]:
    """The metric keys that callbacks (``monitor`` attributes: ModelCheckpoint, EarlyStopping, ...) and
    LR schedulers (ReduceLROnPlateau monitors) read during the fit."""
    keys = [getattr(c, "monitor", None) for c in trainer.callbacks]
    keys += [config.monitor for config in trainer.lr_scheduler_configs]
    keys += [k.get("monitor") for k in getattr(pl_module, "_mmpareto_scheduler_keys", {}).values()]
    return [k for k in keys if isinstance(k, str)]


def is_logging_step(trainer: pl.Trainer) -> bool:
    """Whether Lightning writes logs this step (``log_every_n_steps``): step values are logged only then."""
    connector = getattr(trainer, "_logger_connector", None)
    return bool(getattr(connector, "should_update_logs", True) or trainer.fast_dev_run)


def plugin_key(name: str, encoders: Iterable[str]) -> bool:
    """Whether a logged key lies in the plugin's own key space: ``mmpareto/loss*``,
    ``mmpareto/skipped_steps`` and ``mmpareto/<encoder>/*`` (a user's key there would be overwritten by,
    or overwrite, the plugin's value of the same name; Lightning adds ``_step`` / ``_epoch`` suffixes)."""
    if not name.startswith("mmpareto/"):
        return False
    rest = name[len("mmpareto/") :]
    return (
        rest.startswith("loss")
        or rest.startswith("skipped_steps")
        or any(rest.startswith(f"{encoder}/") for encoder in encoders)
    )

"""The runs of ``mmpareto-lightning compare``: one config, several strategies and seeds, files written.

Each (strategy, seed) run is the same LightningCLI config as ``mmpareto-lightning fit``; only the
``mmpareto:`` section (strategy, and gamma for the step-size control) and the seed change. The model is
trained, then tested with its final weights (no checkpoint selection). The strategies, in table order:

- ``multimodal_only``: one joint loss (encoders get the multimodal gradient only);
- ``uniform``: the summed losses;
- ``uniform_gamma``: the summed losses scaled by MMPareto's gamma (1.5 in the authors' code): the
  step-size control, since the official gamma enlarges every encoder step, conflict or not;
- ``pareto``: conventional MGDA;
- ``mmpareto``: MMPareto.

Written under ``output_dir``: ``results.md`` (mean ± std per strategy, and the paired differences of
MMPareto minus each other strategy with a 95 % t interval), ``results.csv``, ``differences.csv``,
``runs.csv``, ``training_dynamics.png`` (the figure of ``mmpareto-lightning plot``, one line per
strategy) and each run's CSVLogger output under ``runs/<strategy>/seed_<k>/``.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmpareto_lightning.cli.lightning_cli import (
    INSTALL_HINT,
    MMPARETO_KEY,
    build_cli,
    duplicate_callback_message,
    listed_mmpareto_callbacks,
)
from mmpareto_lightning.cli.logs import drop_non_finite, encoder_dynamics, read_metrics_csv, warn_non_finite
from mmpareto_lightning.cli.report import (
    CompareResult,
    RunResult,
    default_metrics,
    machine,
    warn_missing,
    write_report,
)

__all__ = [
    "DEFAULT_STRATEGIES",
    "STRATEGY_LABELS",
    "default_config_path",
    "load_config",
    "make_run_config",
    "run_compare",
    "run_one",
    "strategy_args",
]

STRATEGY_LABELS: dict[str, str] = {
    "multimodal_only": "one joint loss",
    "uniform": "uniform",
    "uniform_gamma": "uniform \u00d7gamma",
    "pareto": "conventional Pareto",
    "mmpareto": "MMPareto",
}
"""The strategies ``compare`` knows, in table order, with their display names."""

DEFAULT_STRATEGIES: tuple[str, ...] = tuple(STRATEGY_LABELS)


def default_config_path() -> Path:
    """The shipped CG-Digits config (``mmpareto_examples/configs/cg_digits.yaml``)."""
    try:
        from mmpareto_examples import CONFIG_DIR
    except ImportError as err:
        raise ImportError(
            "the default comparison uses the bundled examples (package mmpareto_examples); install the "
            f"project ({INSTALL_HINT}) or pass --config"
        ) from err
    return CONFIG_DIR / "cg_digits.yaml"


def load_config(path: str | Path) -> dict[str, Any]:
    """A LightningCLI YAML as a dict (a config nested under ``fit:`` is unwrapped)."""
    import yaml

    with open(path) as f:
        config = yaml.safe_load(f) or {}
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a mapping at the top level")
    if set(config) == {"fit"}:
        config = config["fit"]
    return config


def set_dotted(config: dict[str, Any], key: str, value: Any) -> None:
    """Set ``a.b.c`` in a nested dict, creating the mappings on the way."""
    node = config
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ValueError(f"cannot set {key!r}: {part!r} is not a mapping in the config")
    node[parts[-1]] = value


def strategy_args(base: Mapping[str, Any], callback_args: Mapping[str, Any] | None = None) -> dict[str, dict]:
    """The ``mmpareto:`` arguments that define each strategy, on top of the config and ``callback_args``.

    ``uniform_gamma`` takes the gamma that MMPareto itself applies under the same arguments (1.5 with the
    default per-tensor rescale, 1.0 with ``rescale=per_encoder``).
    """
    from mmpareto_lightning.rule.integrate import RuleConfig

    shared = {**(base.get(MMPARETO_KEY) or {}), **(callback_args or {})}
    gamma = RuleConfig(
        strategy="mmpareto", rescale=shared.get("rescale", "per_tensor"), gamma=shared.get("gamma")
    ).effective_gamma
    return {
        "multimodal_only": {"strategy": "multimodal_only"},
        "uniform": {"strategy": "uniform"},
        "uniform_gamma": {"strategy": "uniform", "gamma": gamma},
        "pareto": {"strategy": "pareto"},
        "mmpareto": {"strategy": "mmpareto"},
    }


def make_run_config(
    base: Mapping[str, Any],
    strategy_arguments: Mapping[str, Any],
    seed: int,
    log_root: Path,
    name: str,
    callback_args: Mapping[str, Any] | None = None,
    trainer_args: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The LightningCLI config of one run: ``base`` with the strategy, seed, logger and limits set.

    Args:
        base: Parsed YAML config (``trainer``/``model``/``data``/``mmpareto`` sections, as for ``fit``).
        strategy_arguments: ``mmpareto:`` arguments of the strategy (they win over the others).
        seed: Seed for ``seed_everything``.
        log_root: CSVLogger directory; the run logs to ``log_root/<name>/seed_<seed>``.
        name: The strategy's key, for the log directory.
        callback_args: ``mmpareto:`` arguments for every run (e.g. ``rescale``).
        trainer_args: Trainer arguments overriding the config (e.g. ``max_epochs``).

    Raises:
        ValueError: the config lists MMParetoCallback under ``trainer.callbacks``.
    """
    config = copy.deepcopy(dict(base))
    config["seed_everything"] = seed
    trainer = config.get("trainer") or {}
    config["trainer"] = trainer
    listed = listed_mmpareto_callbacks(trainer.get("callbacks"))
    if listed:
        raise ValueError(duplicate_callback_message(listed))
    callbacks = trainer.get("callbacks") or []
    callbacks = [callbacks] if isinstance(callbacks, dict) else list(callbacks)
    # Test metrics of the final weights: a checkpoint callback would only cost time and disk.
    trainer["callbacks"] = [
        c for c in callbacks if str((c or {}).get("class_path", "")).split(".")[-1] != "ModelCheckpoint"
    ]
    # Per-step values are what the figure and the conflict rate are computed from.
    config[MMPARETO_KEY] = {
        **(config.get(MMPARETO_KEY) or {}),
        **(callback_args or {}),
        **strategy_arguments,
        "log_on_step": True,
    }
    trainer.update(
        {
            "logger": {
                "class_path": "lightning.pytorch.loggers.CSVLogger",
                "init_args": {"save_dir": str(log_root), "name": name, "version": f"seed_{seed}"},
            },
            "log_every_n_steps": 1,
            "enable_checkpointing": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            # Every run validates each epoch anyway; the pre-training sanity pass would only cost time.
            "num_sanity_val_steps": 0,
            "default_root_dir": str(log_root),
        }
    )
    trainer.update(trainer_args or {})
    return config


@contextlib.contextmanager
def _quiet_lightning() -> Iterator[None]:
    """Silence Lightning's per-run banners and the data-loader advice during many short runs."""
    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric", "lightning")]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*log_every_n_steps.*")
        warnings.filterwarnings("ignore", message=".*GPU available but not used.*")
        warnings.filterwarnings("ignore", message=".*treespec, LeafSpec.*")
        for lg in loggers:
            lg.setLevel(logging.WARNING)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels, strict=True):
                lg.setLevel(level)


def run_one(config: dict[str, Any]) -> tuple[dict[str, float], Path]:
    """Fit and test one config through the ``mmpareto-lightning`` LightningCLI.

    Returns:
        Every test metric (full keys) and the logger's directory.
    """
    import torch

    deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        cli = build_cli(config, run=False, save_config_callback=None)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        results = cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)
    finally:
        # Trainer(deterministic=True) flips a process-wide switch that later code must not inherit.
        torch.use_deterministic_algorithms(deterministic)
    metrics = {k: float(v) for k, v in (results[0] if results else {}).items()}
    return metrics, Path(cli.trainer.logger.log_dir)


@dataclass
class _Plan:
    """What a comparison runs, resolved from the arguments of :func:`run_compare`."""

    config_path: Path
    base: dict[str, Any]
    strategies: list[str]
    labels: dict[str, str]
    args: dict[str, dict[str, Any]]
    seeds: list[int]
    trainer_args: dict[str, Any]
    callback_args: dict[str, Any]
    metrics: list[str] | None
    raw: bool
    notes: list[str]

    def run_config(self, strategy: str, seed: int, log_root: Path) -> dict[str, Any]:
        return make_run_config(
            self.base, self.args[strategy], seed, log_root, strategy, self.callback_args, self.trainer_args
        )


def _plan(
    config: str | Path | None,
    strategies: Sequence[str] | None,
    seeds: Sequence[int],
    metrics: Sequence[str] | None,
    raw: bool,
    trainer_args: Mapping[str, Any] | None,
    callback_args: Mapping[str, Any] | None,
    overrides: Mapping[str, Any] | None,
) -> _Plan:
    if not seeds:
        raise ValueError("need at least one seed")
    config_path = Path(config) if config is not None else default_config_path()
    base = load_config(config_path)
    for key, value in (overrides or {}).items():
        set_dotted(base, key, value)
    args = strategy_args(base, callback_args)
    notes = []
    if strategies is None:
        chosen = list(DEFAULT_STRATEGIES)
        gamma = args["uniform_gamma"]["gamma"]
        uniforms_own = {**(base.get(MMPARETO_KEY) or {}), **(callback_args or {})}.get("gamma") or 1.0
        # With the same gamma the control is the uniform baseline itself: running it again only costs time.
        if math.isclose(gamma, uniforms_own):
            chosen.remove("uniform_gamma")
            notes.append(
                f"uniform \u00d7gamma left out: MMPareto's gamma ({gamma:g}) is the uniform baseline's."
            )
    else:
        chosen = list(strategies)
    unknown = [s for s in chosen if s not in STRATEGY_LABELS]
    if unknown:
        raise ValueError(f"unknown strategies {unknown}; choose from {list(STRATEGY_LABELS)}")
    if not chosen:
        raise ValueError("need at least one strategy")
    labels = {s: STRATEGY_LABELS[s] for s in chosen}
    if "uniform_gamma" in labels:
        labels["uniform_gamma"] = f"uniform \u00d7{args['uniform_gamma']['gamma']:g}"
    return _Plan(
        config_path=config_path,
        base=base,
        strategies=chosen,
        labels=labels,
        args=args,
        seeds=list(seeds),
        trainer_args={"deterministic": True, **(trainer_args or {})},
        callback_args=dict(callback_args or {}),
        metrics=list(metrics) if metrics else None,
        raw=raw,
        notes=notes,
    )


def run_compare(
    config: str | Path | None = None,
    strategies: Sequence[str] | None = None,
    seeds: Sequence[int] = (0, 1, 2),
    output_dir: str | Path = "compare_out",
    metrics: Sequence[str] | None = None,
    raw: bool = False,
    trainer_args: Mapping[str, Any] | None = None,
    callback_args: Mapping[str, Any] | None = None,
    overrides: Mapping[str, Any] | None = None,
    num_threads: int | None = 1,
    progress: bool = True,
    command: str | None = None,
) -> CompareResult:
    """Train every strategy with every seed, then write the tables, the CSVs and the figure.

    Args:
        config: LightningCLI YAML (default: the shipped CG-Digits config).
        strategies: Keys of :data:`STRATEGY_LABELS`, in table order (default: all; ``uniform_gamma`` is
            left out when MMPareto's gamma is the uniform baseline's).
        seeds: Seeds; each strategy runs once per seed, and differences are paired by seed.
        output_dir: Where results and run logs go.
        metrics: Test metric keys for the table (default: :func:`default_metrics`).
        raw: Show every metric as logged (default: fractions in percent).
        trainer_args: Trainer arguments overriding the config (``max_epochs``, ``limit_train_batches``, ...).
        callback_args: ``mmpareto:`` arguments for every run (``rescale``, ``gamma``, ...).
        overrides: Dotted config keys to set, e.g. ``{"model.init_args.lr": 0.02}``.
        num_threads: torch intra-op threads during the runs (``None``: leave torch's setting). One thread
            is fastest for the small CG-Digits models and does not collapse when another process shares
            the cores (two-thread OpenMP regions then spin against each other).
        progress: Show a progress bar over the runs.
        command: The command line to record in ``results.md``.
    """
    plan = _plan(config, strategies, seeds, metrics, raw, trainer_args, callback_args, overrides)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    log_root = out / "runs"
    plan.run_config(plan.strategies[0], plan.seeds[0], log_root)  # a bad config fails now, not after a run
    jobs = [(s, seed) for s in plan.strategies for seed in plan.seeds]
    try:
        from tqdm.auto import tqdm
    except ImportError:  # progress is a nicety; the comparison itself does not need tqdm
        tqdm = None  # type: ignore[assignment]
    bar = tqdm(total=len(jobs), desc="compare", unit="run", disable=not progress) if tqdm else None

    import torch

    threads_before = torch.get_num_threads()
    if num_threads:
        torch.set_num_threads(num_threads)
    runs: list[RunResult] = []
    warned: set[str] = set()
    start = time.perf_counter()
    try:
        with _quiet_lightning():
            for strategy, seed in jobs:
                if bar is not None:
                    bar.set_postfix_str(f"{plan.labels[strategy]}, seed {seed}")
                t0 = time.perf_counter()
                test_metrics, log_dir = run_one(plan.run_config(strategy, seed, log_root))
                scalars, skipped = drop_non_finite(read_metrics_csv(log_dir / "metrics.csv"))
                warn_non_finite(skipped, f"{plan.labels[strategy]} seed {seed}, {log_dir / 'metrics.csv'}")
                dynamics = encoder_dynamics(scalars)
                took = time.perf_counter() - t0
                runs.append(RunResult(strategy, seed, test_metrics, dynamics, log_dir, took, skipped))
                if len(runs) == 1:  # say it now, not after the last run
                    warn_missing(runs, plan.metrics or default_metrics(runs), warned)
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()
        torch.set_num_threads(threads_before)
    seconds = time.perf_counter() - start
    epochs = plan.trainer_args.get("max_epochs", (plan.base.get("trainer") or {}).get("max_epochs"))
    notes = [
        *([f"Command: `{command}`"] if command else []),
        f"Config: `{plan.config_path}`; seeds: {', '.join(map(str, plan.seeds))}; max_epochs: {epochs}; "
        "test metrics of the final weights (no checkpoint selection).",
        *plan.notes,
        *([f"mmpareto: arguments of every run: {plan.callback_args}."] if plan.callback_args else []),
        f"Machine: {machine()}; torch threads: {num_threads or threads_before}.",
        f"Wall time: {seconds / 60:.1f} min for {len(runs)} runs.",
    ]
    return write_report(
        runs, plan.strategies, plan.labels, plan.seeds, out, seconds, plan.metrics, plan.raw, notes, warned
    )

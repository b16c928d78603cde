"""The ``mmpareto-lightning`` command: LightningCLI sub-commands, ``compare`` and ``plot``.

Examples::

    mmpareto-lightning fit --config examples/configs/cg_digits.yaml
    mmpareto-lightning fit --config my.yaml --mmpareto.strategy=pareto
    mmpareto-lightning test --config examples/configs/cg_digits.yaml --ckpt_path path/to.ckpt
    mmpareto-lightning plot runs/cg_digits --output dynamics.png
    mmpareto-lightning compare --output-dir compare_out

``fit``/``validate``/``test``/``predict`` are :class:`~.lightning_cli.MMParetoCLI`: model
and data by ``class_path``, the MMPareto callback from the top-level ``mmpareto:`` section. Like
``python -m``, the command puts the current working directory first on ``sys.path``, so a config's
``class_path: mymodels.MyModel`` finds ``mymodels.py`` in the folder the command runs from.
jsonargparse is an optional dependency (extra ``cli`` or ``examples``), matplotlib too (``plot`` and
``compare``'s figure).

Nothing in the package imports this module: it sits on top (cli -> compare -> report -> summary, plotting,
logs; cli -> lightning_cli).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mmpareto_lightning.cli.lightning_cli import MMParetoCLI, build_cli, require_jsonargparse

__all__ = ["MMParetoCLI", "build_cli", "compare_main", "main", "plot_main"]


def _parse_assignment(text: str) -> tuple[str, Any]:
    import yaml

    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, raw = text.split("=", 1)
    return key.strip(), yaml.safe_load(raw)


def _number(text: str) -> float:
    value = float(text)
    return int(value) if value.is_integer() and value > 1 else value


def compare_parser() -> argparse.ArgumentParser:
    """The argument parser of ``mmpareto-lightning compare``."""
    from mmpareto_lightning.cli.compare import STRATEGY_LABELS

    parser = argparse.ArgumentParser(
        prog="mmpareto-lightning compare",
        description=(
            "Train one config with one joint loss, uniform, uniform scaled by MMPareto's gamma (the "
            "step-size control), conventional Pareto and MMPareto over several seeds; write results.md "
            "(mean +- std, and MMPareto minus each strategy per seed with a 95%% t interval), results.csv, "
            "differences.csv, runs.csv and training_dynamics.png."
        ),
    )
    parser.add_argument("--config", type=Path, default=None, help="LightningCLI YAML (default: CG-Digits)")
    parser.add_argument(
        "--strategies",
        nargs="+",
        default=None,
        choices=list(STRATEGY_LABELS),
        metavar="S",
        help=f"strategies, in table order (default: all of {', '.join(STRATEGY_LABELS)}; uniform_gamma is "
        "left out when MMPareto's gamma is 1)",
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="seeds (default: 0 1 2)")
    parser.add_argument(
        "--metrics",
        nargs="+",
        default=None,
        metavar="KEY",
        help="test metrics for the table, any key the model logs at test time (default: test/acc "
        "test/macro_f1 test/acc_<encoder>, the example models' keys)",
    )
    parser.add_argument(
        "--raw", action="store_true", help="show metrics as logged (default: values in [0, 1] in percent)"
    )
    parser.add_argument("--output-dir", type=Path, default=Path("compare_out"), help="default: compare_out")
    parser.add_argument("--max-epochs", type=int, default=None, help="override trainer.max_epochs")
    parser.add_argument("--limit-train-batches", type=_number, default=None, help="int (batches) or fraction")
    parser.add_argument("--limit-val-batches", type=_number, default=None, help="int (batches) or fraction")
    parser.add_argument("--limit-test-batches", type=_number, default=None, help="int (batches) or fraction")
    parser.add_argument("--accelerator", default=None, help="override trainer.accelerator (cpu, gpu, auto)")
    parser.add_argument(
        "--callback-arg",
        action="append",
        default=[],
        type=_parse_assignment,
        metavar="KEY=VALUE",
        help="an mmpareto: (MMParetoCallback) argument for every run, e.g. rescale=per_encoder (repeatable)",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        type=_parse_assignment,
        metavar="KEY=VALUE",
        dest="overrides",
        help="set a dotted config key, e.g. model.init_args.lr=0.02 (repeatable)",
    )
    parser.add_argument(
        "--num-threads", type=int, default=1, help="torch intra-op threads (default 1; 0: torch's default)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def compare_main(argv: Sequence[str]) -> Any:
    """``mmpareto-lightning compare``: run, print the tables, list the files. Returns the CompareResult."""
    args = compare_parser().parse_args(list(argv))
    require_jsonargparse("`mmpareto-lightning compare`")
    from mmpareto_lightning.cli.compare import run_compare

    trainer_args = {
        key: value
        for key, value in (
            ("max_epochs", args.max_epochs),
            ("limit_train_batches", args.limit_train_batches),
            ("limit_val_batches", args.limit_val_batches),
            ("limit_test_batches", args.limit_test_batches),
            ("accelerator", args.accelerator),
        )
        if value is not None
    }
    result = run_compare(
        config=args.config,
        strategies=args.strategies,
        seeds=args.seeds,
        output_dir=args.output_dir,
        metrics=args.metrics,
        raw=args.raw,
        trainer_args=trainer_args,
        callback_args=dict(args.callback_arg),
        overrides=dict(args.overrides),
        num_threads=args.num_threads or None,
        progress=not args.no_progress,
        command=shlex.join(["mmpareto-lightning", "compare", *argv]),
    )
    print(result.table)
    if result.differences:
        print("\nMMPareto minus each strategy, per seed: mean [95% t interval]\n")
        print(result.differences)
    print(f"\n{len(result.runs)} runs in {result.seconds / 60:.1f} min; wrote:")
    for path in result.files.values():
        print(f"  {path}")
    return result


def plot_parser() -> argparse.ArgumentParser:
    """The argument parser of ``mmpareto-lightning plot``."""
    parser = argparse.ArgumentParser(
        prog="mmpareto-lightning plot",
        description=(
            "Plot a finished run's training dynamics per encoder: cos beta with the zero line, the rolling "
            "conflict rate, the weights alpha, the rescale factor and the Pareto-stationary steps. Reads "
            "CSVLogger's metrics.csv, or TensorBoard event files when tensorboard is installed."
        ),
    )
    parser.add_argument(
        "run_dir",
        type=Path,
        metavar="RUN_DIR",
        help="the run's log directory, or a folder above it (then its newest run is plotted)",
    )
    parser.add_argument(
        "--output", type=Path, default=None, help="PNG to write (default: RUN/training_dynamics.png)"
    )
    parser.add_argument(
        "--window", type=int, default=0, help="rolling window in logged steps (default: ~1/20 of the run)"
    )
    return parser


def _describe(settings: dict[str, Any]) -> str:
    """``strategy=..., rescale=..., gamma=...`` of a run's ``mmpareto:`` section, gamma as applied."""
    from mmpareto_lightning.rule.integrate import RuleConfig

    text = f"strategy={settings.get('strategy', 'mmpareto')}, rescale={settings.get('rescale', 'per_tensor')}"
    try:
        rule = RuleConfig(
            strategy=settings.get("strategy", "mmpareto"),
            rescale=settings.get("rescale", "per_tensor"),
            gamma=settings.get("gamma"),
        )
    except (TypeError, ValueError):  # a title decoration: an odd config must not stop the plot
        return text
    default = " (default)" if settings.get("gamma") is None else ""
    return f"{text}, gamma={rule.effective_gamma:g}{default}"


def plot_main(argv: Sequence[str]) -> Path:
    """``mmpareto-lightning plot``: draw one run's training dynamics. Returns the PNG's path."""
    from mmpareto_lightning.cli.logs import (
        drop_non_finite,
        encoder_dynamics,
        find_runs,
        read_run_config,
        read_scalars,
        warn_non_finite,
    )
    from mmpareto_lightning.cli.plotting import plot_dynamics

    args = plot_parser().parse_args(list(argv))
    try:
        found = find_runs(args.run_dir)
    except FileNotFoundError as err:
        raise SystemExit(f"mmpareto-lightning plot: {err}") from None
    run = found[0]
    if len(found) > 1:
        print(
            f"{len(found)} runs under {args.run_dir}; plotting the newest: {run} (or pass a run's directory)"
        )
    scalars, skipped = drop_non_finite(read_scalars(run))
    warn_non_finite(skipped, f"mmpareto-lightning plot, {run}")
    dynamics = encoder_dynamics(scalars)
    if not dynamics:
        raise SystemExit(
            f"mmpareto-lightning plot: {run} has no step-level MMPareto metrics "
            "(mmpareto/<encoder>/cos_beta_step): was it trained with MMParetoCallback(log_on_step=True)?"
        )
    title = str(run)
    settings = read_run_config(run)  # the mmpareto: section LightningCLI saved with the run
    if settings:
        title += "\n" + _describe(settings)
    output = args.output or run / "training_dynamics.png"
    plot_dynamics({"this run": [dynamics]}, output, title=title, window=args.window)
    print(f"wrote {output}")
    return output


def main(args: Sequence[str] | None = None) -> None:
    """Entry point of the ``mmpareto-lightning`` console script.

    Args:
        args: Arguments without the program name (default ``sys.argv[1:]``). ``compare ...`` runs the
            strategy comparison, ``plot ...`` draws a finished run's dynamics; anything else goes to
            LightningCLI (``fit``, ``validate``, ``test``, ``predict``).
    """
    # A console script's sys.path lacks the working directory that `python -m` and `python script.py`
    # put first; without it `class_path: mymodels.MyModel` cannot find ./mymodels.py.
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    argv = list(sys.argv[1:] if args is None else args)
    if argv and argv[0] == "compare":
        compare_main(argv[1:])
        return
    if argv and argv[0] == "plot":
        plot_main(argv[1:])
        return
    build_cli(None if args is None else argv)


if __name__ == "__main__":
    main()

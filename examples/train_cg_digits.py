"""Train and test the CG-Digits example in plain Python (no LightningCLI), e.g.::

    python examples/train_cg_digits.py                        # MMPareto, gray + colour views
    python examples/train_cg_digits.py --strategy uniform     # the summed-loss baseline
    python examples/train_cg_digits.py --modalities gray color noisy --max-epochs 5

Prints the test metrics of the final weights: top-1 accuracy and macro-F1 of the fusion head and the
accuracy of each unimodal head.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from collections.abc import Sequence
from pathlib import Path


def _import_examples() -> None:
    """Make ``mmpareto_examples`` importable when the project is not installed (source checkout)."""
    try:
        import mmpareto_examples  # noqa: F401
    except ModuleNotFoundError:
        here = Path(__file__).resolve().parent
        # examples/ is the package directory of mmpareto_examples; register it under that name.
        spec = importlib.util.spec_from_file_location(
            "mmpareto_examples", here / "__init__.py", submodule_search_locations=[str(here)]
        )
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules["mmpareto_examples"] = module
        spec.loader.exec_module(module)
    try:
        import mmpareto_lightning  # noqa: F401
    except ModuleNotFoundError:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    """Train on CG-Digits with the chosen strategy and return the test metrics.

    Args:
        argv: Command-line arguments (default ``sys.argv[1:]``).

    Returns:
        Test metrics keyed like ``test/acc``, ``test/macro_f1``, ``test/acc_<modality>``.
    """
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--strategy", default="mmpareto", choices=["mmpareto", "pareto", "uniform", "multimodal_only"]
    )
    parser.add_argument("--rescale", default="per_tensor", choices=["per_tensor", "per_encoder"])
    parser.add_argument(
        "--gamma", type=float, default=None, help="final scale (default: 1.5 per_tensor, 1 else)"
    )
    parser.add_argument(
        "--modalities", nargs="+", default=["gray", "color"], choices=["gray", "color", "noisy"]
    )
    parser.add_argument("--max-epochs", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--color-correlation", type=float, default=0.97)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--limit-train-batches", type=float, default=1.0)
    parser.add_argument("--fast-dev-run", action="store_true", help="one batch of each stage, no logging")
    parser.add_argument("--output-dir", default="runs/train_cg_digits")
    args = parser.parse_args(argv)

    _import_examples()
    import lightning.pytorch as pl
    from mmpareto_examples.cg_digits import CGDigitsDataModule
    from mmpareto_examples.models import CGDigitsClassifier

    from mmpareto_lightning import MMParetoCallback

    pl.seed_everything(args.seed, workers=True)
    data = CGDigitsDataModule(
        modalities=args.modalities, batch_size=args.batch_size, color_correlation=args.color_correlation
    )
    model = CGDigitsClassifier(modalities=args.modalities, lr=args.lr)
    callback = MMParetoCallback(strategy=args.strategy, rescale=args.rescale, gamma=args.gamma)
    limit = int(args.limit_train_batches) if args.limit_train_batches > 1 else args.limit_train_batches
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=args.max_epochs,
        callbacks=[callback],
        default_root_dir=args.output_dir,
        fast_dev_run=args.fast_dev_run,
        limit_train_batches=limit,
        log_every_n_steps=5,
    )
    trainer.fit(model, datamodule=data)
    results = trainer.test(model, datamodule=data)
    metrics = {k: float(v) for k, v in results[0].items()}
    print(", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
    return metrics


if __name__ == "__main__":
    main()

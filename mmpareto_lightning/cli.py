"""The ``mmpareto-lightning`` command: LightningCLI (fit/validate/test/predict) plus ``compare``.

Examples::

    mmpareto-lightning fit --config examples/configs/cg_digits.yaml
    mmpareto-lightning fit --config cg_digits.yaml --trainer.callbacks.init_args.strategy=pareto
    mmpareto-lightning test --config examples/configs/cg_digits.yaml --ckpt_path path/to.ckpt
    mmpareto-lightning compare --output-dir compare_out

Model and data are chosen in subclass mode (``model.class_path`` / ``data.class_path``), and the
:class:`~mmpareto_lightning.MMParetoCallback` is configured like any callback under
``trainer.callbacks`` (``class_path: mmpareto_lightning.MMParetoCallback`` with ``init_args``).
jsonargparse is an optional dependency (extra ``cli`` or ``examples``).
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Sequence
from typing import Any

from lightning.pytorch.cli import LightningCLI

from mmpareto_lightning.compare import _INSTALL_HINT

__all__ = ["MMParetoCLI", "build_cli", "main"]


_DESCRIPTION = (
    "Train, validate, test or predict with MMPareto (LightningCLI; pick model and data with class_path, "
    "configure mmpareto_lightning.MMParetoCallback under trainer.callbacks). "
    "Run `mmpareto-lightning compare --help` for the strategy comparison."
)


def _require_jsonargparse(what: str = "the mmpareto-lightning command") -> None:
    try:
        import jsonargparse  # noqa: F401
    except ImportError as err:
        raise ImportError(f"{what} needs jsonargparse: {_INSTALL_HINT}") from err


class MMParetoCLI(LightningCLI):
    """LightningCLI whose help names the ``compare`` sub-command and the MMPareto callback.

    Defined at module level so that ``ddp_spawn`` can pickle the Trainer that refers to it.
    """

    def init_parser(self, **kwargs: Any):
        kwargs.setdefault("description", _DESCRIPTION)
        return super().init_parser(**kwargs)


def build_cli(args: Sequence[str] | dict[str, Any] | None = None, run: bool = True, **kwargs: Any) -> Any:
    """Create the LightningCLI used by ``mmpareto-lightning`` (subclass mode for model and data).

    Args:
        args: Command-line arguments (list), or a structured config (dict) as LightningCLI accepts;
            ``None`` reads ``sys.argv``.
        run: Run the sub-command (``fit`` etc.); ``False`` only instantiates model, data and trainer
            from a config without a sub-command.
        **kwargs: Extra keyword arguments for :class:`lightning.pytorch.cli.LightningCLI`.

    Returns:
        The :class:`lightning.pytorch.cli.LightningCLI` instance.
    """
    _require_jsonargparse()
    options: dict[str, Any] = {
        "subclass_mode_model": True,
        "subclass_mode_data": True,
        # Re-running into the same log directory must not fail because config.yaml exists.
        "save_config_kwargs": {"overwrite": True},
    }
    options.update(kwargs)
    with warnings.catch_warnings():
        # Lightning 2.6 calls jsonargparse APIs that jsonargparse >= 4.49 deprecates; users cannot act on it.
        warnings.filterwarnings("ignore", message=r"(?s).*deprecated in v4\.", category=DeprecationWarning)
        warnings.filterwarnings(
            "ignore", message=r"(?s).*JsonargparseDeprecationWarning", category=DeprecationWarning
        )
        # Explicit `args` (compare, tests, notebooks) are deliberate, whatever sys.argv holds.
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
        return MMParetoCLI(None, None, args=args, run=run, **options)


def main(args: Sequence[str] | None = None) -> None:
    """Entry point of the ``mmpareto-lightning`` console script.

    Args:
        args: Arguments without the program name (default ``sys.argv[1:]``). ``compare ...`` runs the
            strategy comparison; anything else goes to LightningCLI (``fit``, ``validate``, ``test``,
            ``predict``).
    """
    argv = list(sys.argv[1:] if args is None else args)
    if argv and argv[0] == "compare":
        from mmpareto_lightning.compare import main as compare_main

        compare_main(argv[1:])
        return
    build_cli(None if args is None else argv)


if __name__ == "__main__":
    main()

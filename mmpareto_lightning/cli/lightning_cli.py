"""The LightningCLI behind ``mmpareto-lightning fit|validate|test|predict``, and MMPareto for your own.

:class:`MMParetoCLI` always adds exactly one :class:`~mmpareto_lightning.MMParetoCallback`, configured
from a top-level ``mmpareto:`` section whose options are read from the callback's signature (LightningCLI's
``add_lightning_class_args``). So ``--mmpareto.strategy=pareto`` (or any other callback argument) reaches
the callback whatever ``trainer.callbacks`` holds, and the ``config.yaml`` saved with each run records it.
A config that also lists the callback under ``trainer.callbacks`` is refused with the fix.

To give your own LightningCLI script the same section, add one line (:func:`add_mmpareto_arguments`)::

    class MyCLI(LightningCLI):
        def add_arguments_to_parser(self, parser):
            parser.add_lightning_class_args(MMParetoCallback, "mmpareto")

jsonargparse is an optional dependency (extra ``cli`` or ``examples``); this module imports without it.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Sequence
from typing import Any

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_info

from mmpareto_lightning.lightning import MMParetoCallback

__all__ = [
    "INSTALL_HINT",
    "MMPARETO_KEY",
    "MMParetoCLI",
    "add_mmpareto_arguments",
    "build_cli",
    "listed_mmpareto_callbacks",
    "require_jsonargparse",
]

INSTALL_HINT = 'pip install "mmpareto-lightning[examples]"'
"""How to get the optional command-line dependencies (jsonargparse, scikit-learn, matplotlib, ...)."""

MMPARETO_KEY = "mmpareto"
"""The config section (and ``--mmpareto.*`` options) that configures the callback."""

_DESCRIPTION = (
    "Train, validate, test or predict with MMPareto (LightningCLI: pick model and data with class_path; "
    "configure the MMPareto callback in the top-level `mmpareto:` section, e.g. "
    "--mmpareto.strategy=pareto). "
    "`mmpareto-lightning compare --help`: the strategy comparison; "
    "`mmpareto-lightning plot --help`: plot a finished run's training dynamics."
)


def require_jsonargparse(what: str = "the mmpareto-lightning command") -> None:
    """Raise an ImportError that names the extra to install when jsonargparse is missing."""
    try:
        import jsonargparse  # noqa: F401
    except ImportError as err:
        raise ImportError(f"{what} needs jsonargparse: {INSTALL_HINT}") from err


def add_mmpareto_arguments(parser: LightningArgumentParser, key: str = MMPARETO_KEY) -> None:
    """Add every :class:`~mmpareto_lightning.MMParetoCallback` argument under ``key``.

    LightningCLI then instantiates the callback from that section and appends it to the Trainer's
    callbacks (the mechanism of ``add_lightning_class_args`` for a Callback class). Arguments the callback
    gains later appear automatically: they are read from its signature.
    """
    parser.add_lightning_class_args(MMParetoCallback, key)


def _resolves_to_mmpareto_callback(class_path: str) -> bool:
    module, _, name = class_path.rpartition(".")
    try:
        obj = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        # Unimportable paths are jsonargparse's to report; only the name can be judged here.
        return name == MMParetoCallback.__name__
    return isinstance(obj, type) and issubclass(obj, MMParetoCallback)


def listed_mmpareto_callbacks(callbacks: Any) -> list[str]:
    """The class paths in a ``trainer.callbacks`` config value that are MMParetoCallback (or subclasses).

    Args:
        callbacks: The value as parsed (jsonargparse Namespaces) or as read from YAML (dicts): a list of
            ``{class_path, init_args}`` entries, one such entry, or ``None``.
    """
    if callbacks is None:
        return []
    items = callbacks if isinstance(callbacks, (list, tuple)) else [callbacks]
    found = []
    for item in items:
        if isinstance(item, MMParetoCallback):
            found.append(type(item).__qualname__)
            continue
        class_path = item.get("class_path") if hasattr(item, "get") else None
        if isinstance(class_path, str) and _resolves_to_mmpareto_callback(class_path):
            found.append(class_path)
    return found


def duplicate_callback_message(class_paths: Sequence[str]) -> str:
    """The error for a config that lists the callback under ``trainer.callbacks`` as well."""
    return (
        f"{', '.join(class_paths)} is listed under trainer.callbacks, but mmpareto-lightning always adds "
        f"exactly one MMParetoCallback, configured from the top-level `{MMPARETO_KEY}:` section. Remove it "
        f"from trainer.callbacks and move its init_args to that section, e.g.\n"
        f"  {MMPARETO_KEY}:\n    strategy: mmpareto\n    rescale: per_tensor\n"
        f"and on the command line write --{MMPARETO_KEY}.strategy=pareto "
        "(not --trainer.callbacks.init_args.strategy=pareto)."
    )


class MMParetoCLI(LightningCLI):
    """LightningCLI with a top-level ``mmpareto:`` section that configures the one MMParetoCallback.

    Subclass it like LightningCLI (``add_arguments_to_parser`` stays yours: the section is added with the
    core arguments). Defined at module level so that ``ddp_spawn`` can pickle the Trainer that refers to it.
    """

    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        kwargs.setdefault("description", _DESCRIPTION)
        return super().init_parser(**kwargs)

    def add_core_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        super().add_core_arguments_to_parser(parser)
        add_mmpareto_arguments(parser)

    def before_instantiate_classes(self) -> None:
        config = self.config.get(str(self.subcommand), self.config) if self.subcommand else self.config
        trainer = config.get("trainer") or {}
        listed = listed_mmpareto_callbacks(trainer.get("callbacks"))
        if listed:
            # A parser error (usage + message, exit code 2), like any other bad option.
            self._parser(self.subcommand).error(duplicate_callback_message(listed))

    def after_fit(self) -> None:
        logger = self.trainer.logger
        if logger is not None and self.trainer.is_global_zero and getattr(logger, "log_dir", None):
            rank_zero_info(f"Plot the training dynamics: mmpareto-lightning plot {logger.log_dir}")


def build_cli(args: Sequence[str] | dict[str, Any] | None = None, run: bool = True, **kwargs: Any) -> Any:
    """Create the LightningCLI used by ``mmpareto-lightning`` (subclass mode for model and data).

    Args:
        args: Command-line arguments (list), or a structured config (dict) as LightningCLI accepts;
            ``None`` reads ``sys.argv``.
        run: Run the sub-command (``fit`` etc.); ``False`` only instantiates model, data and trainer
            from a config without a sub-command.
        **kwargs: Extra keyword arguments for :class:`lightning.pytorch.cli.LightningCLI`.

    Returns:
        The :class:`MMParetoCLI` instance.
    """
    require_jsonargparse()
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

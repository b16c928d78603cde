"""The command-line tools: ``mmpareto-lightning fit/validate/test/predict`` (:mod:`.lightning_cli`),
``compare`` (:mod:`.compare`, :mod:`.report`, :mod:`.summary`) and ``plot`` (:mod:`.plotting`,
:mod:`.logs`); :mod:`.main` dispatches between them."""

from mmpareto_lightning.cli.main import MMParetoCLI, build_cli, compare_main, main, plot_main

__all__ = ["MMParetoCLI", "build_cli", "compare_main", "main", "plot_main"]

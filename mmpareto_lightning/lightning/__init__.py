"""The Lightning layer: the module mixin, the callback, its metrics and the optimizer bookkeeping.

:mod:`.module` (``MMParetoModule``: named losses out of ``training_step``), :mod:`.callback`
(``MMParetoCallback``: the update per step), :mod:`.fit_checks` (what a fit must satisfy when it starts),
:mod:`.stepping` (accumulation, clipping, skipped steps, schedulers in manual optimization),
:mod:`.sharding` (which sharded strategies are served, and the checks of a model sharded with FSDP2) and
:mod:`.metrics` (what gets logged).
"""

from mmpareto_lightning.lightning.callback import MMParetoCallback
from mmpareto_lightning.lightning.metrics import MMParetoMetrics
from mmpareto_lightning.lightning.module import MMParetoModule

__all__ = ["MMParetoCallback", "MMParetoMetrics", "MMParetoModule"]

"""Step-time benchmark: uniform step vs our MMPareto step vs the authors' procedure.

Run ``python benchmarks/step_time.py`` (``--help`` for the flags). One process, one run, the methods
interleaved round by round so that a noisy shared machine slows them all alike:

* ``uniform``: the plain multitask baseline, ``sum(losses).backward()``, one backward.
* ``mmpareto``: our step with the framework-free :class:`~mmpareto_lightning.MMParetoEngine`
  (capture -> backward -> integrate): one forward, the ordinary backward of the summed loss plus one
  extra encoder VJP, the rule as tensor ops without host synchronisation.
* ``authors``: a faithful re-creation of the official ``code/MMPareto.py`` training step (one retained
  backward per loss with per-tensor clones, host-side decisions, a fourth backward, the per-tensor
  rescale with gamma 1.5).

Modules, one concept each:

* :mod:`.models`: the networks (small CNN, wide MLP, ResNet-18 and its narrow version, BERT) and the
  fixed batch.
* :mod:`.methods`: the three timed steps.
* :mod:`.check`: the correctness pre-check that runs before anything is timed.
* :mod:`.timing`: interleaved timing, per-round ratios, the per-phase breakdown.
* :mod:`.lightning_path`: the same steps through a ``Trainer`` (and the callback's parts), side by side.
* :mod:`.opcount`: ATen operators dispatched per step (deterministic host work), plain and via a Trainer.
* :mod:`.kernels`: CUDA kernels launched per call (``torch.profiler``).
* :mod:`.memory`: peak memory of a step (CUDA allocator, or PyTorch's ``MemTracker`` on CPU).
* :mod:`.report`: Markdown tables.
* :mod:`.runs`: the main and the scaling measurements (pre-check, timing, memory).
* :mod:`.profiling`: ``--profile``, where a step through the Trainer spends its time.
* :mod:`.cli`: the flags and the order of the measurements.
"""

from .cli import main

__all__ = ["main"]

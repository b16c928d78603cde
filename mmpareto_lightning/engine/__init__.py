"""Per-loss encoder gradients from one forward pass, and the engine that applies the rule to them.

Plain PyTorch (no Lightning): :mod:`.capture` records the encoders' outputs behind a fresh autograd
boundary, :mod:`.splitting` takes every loss's exact gradient on every encoder (one extra encoder
backward), :mod:`.sharded_split` its passes for encoders sharded with FSDP2, :mod:`.safeguards` refuses
the graphs where that split would be wrong, and :mod:`.engine` joins the split and the rule for a
hand-written training loop.
"""

from mmpareto_lightning.engine.engine import MMParetoEngine
from mmpareto_lightning.engine.safeguards import GradientSplittingError
from mmpareto_lightning.engine.splitting import EncoderObjectives, GradientSplitter

__all__ = ["EncoderObjectives", "GradientSplitter", "GradientSplittingError", "MMParetoEngine"]

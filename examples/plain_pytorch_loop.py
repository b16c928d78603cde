"""MMPareto in a hand-written PyTorch training loop, without Lightning.

Two modalities of synthetic data (a strong, noisy "audio" view and a weak "visual" view of the same
label), two MLP encoders, a concatenation fusion head and one unimodal head per encoder. The only
MMPareto-specific lines are the three marked ``# MMPareto``.

Run: ``python examples/plain_pytorch_loop.py --steps 200``
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn

from mmpareto_lightning import MMParetoEngine, RuleConfig


class TwoModalityNet(nn.Module):
    def __init__(self, audio_dim: int = 16, visual_dim: int = 16, classes: int = 4, width: int = 32) -> None:
        super().__init__()
        self.audio = nn.Sequential(nn.Linear(audio_dim, width), nn.ReLU(), nn.Linear(width, width))
        self.visual = nn.Sequential(nn.Linear(visual_dim, width), nn.ReLU(), nn.Linear(width, width))
        self.head = nn.Linear(2 * width, classes)
        self.head_audio = nn.Linear(width, classes)
        self.head_visual = nn.Linear(width, classes)

    def losses(
        self, audio: torch.Tensor, visual: torch.Tensor, label: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        za, zv = self.audio(audio), self.visual(visual)
        return {
            "multimodal": F.cross_entropy(self.head(torch.cat([za, zv], dim=1)), label),
            "audio": F.cross_entropy(self.head_audio(za), label),
            "visual": F.cross_entropy(self.head_visual(zv), label),
        }


def synthetic_batch(batch_size: int, generator: torch.Generator, classes: int = 4, dim: int = 16):
    label = torch.randint(0, classes, (batch_size,), generator=generator)
    prototypes = torch.eye(classes, dim)
    audio = 2.0 * prototypes[label] + torch.randn(batch_size, dim, generator=generator)
    visual = 0.5 * prototypes[label] + torch.randn(batch_size, dim, generator=generator)
    return audio, visual, label


def train(
    steps: int = 200, batch_size: int = 64, strategy: str = "mmpareto", seed: int = 0
) -> dict[str, float]:
    """Train and return the final losses and the conflict rate of each encoder."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = TwoModalityNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    engine = MMParetoEngine(
        {"audio": model.audio, "visual": model.visual}, RuleConfig(strategy=strategy)
    )  # MMPareto
    conflicts = {"audio": torch.zeros(()), "visual": torch.zeros(())}
    losses: dict[str, torch.Tensor] = {}
    for _ in range(steps):
        audio, visual, label = synthetic_batch(batch_size, generator)
        optimizer.zero_grad(set_to_none=True)
        with engine.capture():  # MMPareto: records the encoder outputs
            losses = model.losses(audio, visual, label)
        engine.backward(losses)  # MMPareto: per-loss encoder gradients + the ordinary backward
        stats = engine.integrate()  # MMPareto: the rule, written into .grad
        optimizer.step()
        for name, s in stats.items():
            conflicts[name] += s.conflict.float()  # stays on the device: no host sync per step
    result = {f"loss_{k}": float(v.detach()) for k, v in losses.items()}
    result.update({f"conflict_rate_{k}": float(v) / steps for k, v in conflicts.items()})
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument(
        "--strategy", default="mmpareto", choices=["mmpareto", "pareto", "uniform", "multimodal_only"]
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for key, value in train(args.steps, args.batch_size, args.strategy, args.seed).items():
        print(f"{key}: {value:.4f}")


if __name__ == "__main__":
    main()

"""The benchmarked networks: MMPareto's multitask layout around three kinds of encoder.

* ``small-cnn``: Conv-BN-ReLU encoders on small images, the compute-heavy CPU regime.
* ``wide-mlp``: two wide MLP encoders (audio 256 -> 2048 -> 2048 -> 512, visual 384 -> 2048 -> 2048 ->
  512, about 5.8M parameters each) at batch 8, the parameter-heavy regime: little compute per parameter,
  so every pass over the gradients shows.
* ``resnet18``: ResNet-18 encoders at CREMA-D shapes (audio 1x257x188 fbank, visual 3x224x224), the
  paper's setting.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

MULTIMODAL = "multimodal"
LABEL = "label"
NUM_CLASSES = 6  # CREMA-D's six emotions
ENCODER_NAMES = ("audio", "visual", "visual2", "visual3", "visual4", "visual5")
MODELS = ("small-cnn", "wide-mlp", "resnet18")
MLP_INPUT_DIMS = {"audio": 256, "visual": 384}  # extra encoders of the scaling table take the visual size


def default_batch_size(kind: str) -> int:
    """The issue's batch of each regime: 8 for the parameter-heavy MLPs, 64 (CREMA-D's) otherwise."""
    return 8 if kind == "wide-mlp" else 64


class SmallCNN(nn.Module):
    """Conv-BN-ReLU x3 with a max-pool and global average pooling: ``(B, C, H, W) -> (B, feature_dim)``.

    BatchNorm is included on purpose: its affine parameters are encoder parameters (as in ResNet-18) and
    its running statistics must be updated by exactly one forward per step.
    """

    def __init__(self, in_channels: int, width: int = 32, feature_dim: int = 64) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, 2 * width, 3, padding=1, bias=False),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * width, feature_dim, 3, padding=1, bias=False),
            nn.BatchNorm2d(feature_dim),
            nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def wide_mlp_encoder(in_features: int, width: int = 2048, feature_dim: int = 512) -> nn.Module:
    """``in -> width -> width -> feature_dim`` with ReLU: a parameter-heavy, compute-light encoder."""
    return nn.Sequential(
        nn.Linear(in_features, width),
        nn.ReLU(),
        nn.Linear(width, width),
        nn.ReLU(),
        nn.Linear(width, feature_dim),
        nn.ReLU(),
    )


def resnet18_encoder(in_channels: int) -> nn.Module:
    """ResNet-18 trunk from scratch with ``in_channels`` inputs and 512 pooled features (the paper's)."""
    from torchvision.models import resnet18

    net = resnet18(weights=None)
    if in_channels != 3:
        # The audio encoder takes a one-channel log-mel spectrogram, as in the official model.
        net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    net.fc = nn.Identity()
    return net


class MultiEncoderNet(nn.Module):
    """MMPareto's multitask layout: per-modality encoders, concat fusion head, one unimodal head each."""

    def __init__(self, encoders: Mapping[str, nn.Module], feature_dim: int, num_classes: int = NUM_CLASSES):
        super().__init__()
        self.encoders = nn.ModuleDict(dict(encoders))
        self.fusion_head = nn.Linear(feature_dim * len(encoders), num_classes)
        self.unimodal_heads = nn.ModuleDict({n: nn.Linear(feature_dim, num_classes) for n in encoders})

    def losses(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``{"multimodal": ..., <encoder>: ...}``; each encoder module is called once (hooks see it)."""
        features = {n: enc(batch[n]) for n, enc in self.encoders.items()}
        target = batch[LABEL]
        fused = self.fusion_head(torch.cat(list(features.values()), dim=1))
        out = {MULTIMODAL: F.cross_entropy(fused, target)}
        for n, z in features.items():
            out[n] = F.cross_entropy(self.unimodal_heads[n](z), target)
        return out

    def encoder_params(self) -> dict[str, list[nn.Parameter]]:
        return {n: [p for p in enc.parameters() if p.requires_grad] for n, enc in self.encoders.items()}

    def head_params(self) -> list[nn.Parameter]:
        return [*self.fusion_head.parameters(), *self.unimodal_heads.parameters()]


@dataclass(frozen=True)
class ModelSpec:
    """Which encoders and inputs a run uses.

    Args:
        kind: one of :data:`MODELS`.
        image_size: side of the small CNN's square inputs (``resnet18`` uses the CREMA-D shapes).
        width: first convolution width of the small CNN.
        mlp_width: hidden width of the wide MLP (2048 in the issue's regime; tests use a few units).
        mlp_features: output features of the wide MLP (512, ResNet-18's).
    """

    kind: str = "small-cnn"
    image_size: int = 16
    width: int = 16
    mlp_width: int = 2048
    mlp_features: int = 512

    def input_shape(self, name: str) -> tuple[int, ...]:
        if self.kind == "resnet18":
            return (1, 257, 188) if name == "audio" else (3, 224, 224)
        if self.kind == "wide-mlp":
            return (MLP_INPUT_DIMS.get(name, MLP_INPUT_DIMS["visual"]),)
        return (1 if name == "audio" else 3, self.image_size, self.image_size)

    def build(self, n_encoders: int) -> MultiEncoderNet:
        if not 2 <= n_encoders <= len(ENCODER_NAMES):
            raise ValueError(f"Between 2 and {len(ENCODER_NAMES)} encoders are supported, got {n_encoders}.")
        names = ENCODER_NAMES[:n_encoders]
        if self.kind == "resnet18":
            return MultiEncoderNet({n: resnet18_encoder(self.input_shape(n)[0]) for n in names}, 512)
        if self.kind == "wide-mlp":
            encoders = {
                n: wide_mlp_encoder(self.input_shape(n)[0], self.mlp_width, self.mlp_features) for n in names
            }
            return MultiEncoderNet(encoders, self.mlp_features)
        if self.kind == "small-cnn":
            feature = 2 * self.width
            encoders = {n: SmallCNN(self.input_shape(n)[0], self.width, feature) for n in names}
            return MultiEncoderNet(encoders, feature)
        raise ValueError(f"Unknown model {self.kind!r}; choose one of {MODELS}.")

    def describe(self, n_encoders: int) -> str:
        """Encoder names and input shapes, e.g. ``audio 1x16x16, visual 3x16x16``."""
        return ", ".join(f"{n} {'x'.join(map(str, self.input_shape(n)))}" for n in ENCODER_NAMES[:n_encoders])


def make_batch(
    spec: ModelSpec, names: Sequence[str], batch_size: int, device: torch.device, seed: int
) -> dict[str, Tensor]:
    """One fixed random batch (reused every step: the benchmark times compute, not data loading)."""
    gen = torch.Generator().manual_seed(seed + 1)
    batch = {n: torch.randn(batch_size, *spec.input_shape(n), generator=gen) for n in names}
    batch[LABEL] = torch.randint(0, NUM_CLASSES, (batch_size,), generator=gen)
    return {k: v.to(device) for k, v in batch.items()}


def build_network_and_batch(
    spec: ModelSpec, n_encoders: int, batch_size: int, device: torch.device, seed: int
) -> tuple[MultiEncoderNet, dict[str, Tensor]]:
    """The seeded initial network (every method copies it) and the fixed batch of one measurement."""
    torch.manual_seed(seed)
    base = spec.build(n_encoders).to(device)
    return base, make_batch(spec, list(base.encoders), batch_size, device, seed)


def make_optimizer(net: nn.Module) -> torch.optim.Optimizer:
    # The paper's CREMA-D optimizer.
    return torch.optim.SGD(net.parameters(), lr=2e-3, momentum=0.9, weight_decay=1e-4)

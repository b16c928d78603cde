"""The benchmarked networks: MMPareto's multitask layout around three kinds of encoder.

* ``small-cnn``: Conv-BN-ReLU encoders on small images, the compute-heavy CPU regime.
* ``wide-mlp``: two wide MLP encoders (audio 256 -> 2048 -> 2048 -> 512, visual 384 -> 2048 -> 2048 ->
  512, about 5.8M parameters each) at batch 8, the parameter-heavy regime: little compute per parameter,
  so every pass over the gradients shows.
* ``resnet18``: ResNet-18 encoders at CREMA-D shapes (audio 1x257x188 fbank, visual 3x224x224), the
  paper's setting.
* ``resnet18-tiny``: the host-bound regime: ResNet-18's layout (torchvision's, ``fc`` included: 62
  parameter tensors per encoder) with every width divided by 16, on 16x16 inputs at batch 2: almost no
  arithmetic, so a step costs what the host spends dispatching operators.
* ``bert``: the fine-tuning regime: two transformers ``BertModel(BertConfig())`` encoders (12 layers,
  hidden 768, random weights, the config's dropout 0.1) on random token ids with an attention mask of
  ones, sequence length 128, batch 8; the heads read the pooled [CLS] feature. ``--bert-layers``,
  ``--bert-hidden``, ``--bert-vocab`` and ``--seq-len`` shrink it for tests.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

MULTIMODAL = "multimodal"
LABEL = "label"
NUM_CLASSES = 6  # CREMA-D's six emotions
ENCODER_NAMES = ("audio", "visual", "visual2", "visual3", "visual4", "visual5")
TEXT_ENCODER_NAMES = ("text1", "text2", "text3", "text4", "text5", "text6")
MODELS = ("small-cnn", "wide-mlp", "resnet18", "resnet18-tiny", "bert")
MLP_INPUT_DIMS = {"audio": 256, "visual": 384}  # extra encoders of the scaling table take the visual size
DEFAULT_BATCH_SIZES = {"wide-mlp": 8, "bert": 8, "resnet18-tiny": 2}
TINY_RESNET_DIVISOR = 16  # ResNet-18's widths 64..512 become 4..32


def default_batch_size(kind: str) -> int:
    """The issue's batch of each regime: 8 for the MLPs and BERT, 2 host-bound, 64 (CREMA-D's) otherwise."""
    return DEFAULT_BATCH_SIZES.get(kind, 64)


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


class NarrowResNet18(nn.Module):
    """torchvision's ResNet-18 layout with every width divided by ``divisor``, ``fc`` included.

    The same modules in the same order as ``torchvision.models.resnet18(num_classes=out_features)``
    (62 parameter tensors: 20 convolutions, 20 BatchNorms, 3 of them in the downsampling paths, and
    ``fc``) and the same initialisation; only the channel counts shrink. ``(B, C, H, W) -> (B, out)``.
    """

    def __init__(self, in_channels: int, divisor: int = TINY_RESNET_DIVISOR, out_features: int | None = None):
        super().__init__()
        from torchvision.models.resnet import BasicBlock

        widths = [64 // divisor, 128 // divisor, 256 // divisor, 512 // divisor]
        if widths[0] < 1:
            raise ValueError(f"divisor {divisor} leaves no channel in ResNet-18's first stage (64 channels).")
        self.conv1 = nn.Conv2d(in_channels, widths[0], kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        layers: list[nn.Module] = []
        inplanes = widths[0]
        for i, planes in enumerate(widths):
            stride = 1 if i == 0 else 2
            downsample = None
            if stride != 1 or inplanes != planes:
                downsample = nn.Sequential(
                    nn.Conv2d(inplanes, planes, kernel_size=1, stride=stride, bias=False),
                    nn.BatchNorm2d(planes),
                )
            # BasicBlock checks base_width == 64 (the width of its own template), not the block's width.
            layers.append(
                nn.Sequential(BasicBlock(inplanes, planes, stride, downsample), BasicBlock(planes, planes))
            )
            inplanes = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.out_features = out_features or widths[-1]
        self.fc = nn.Linear(widths[-1], self.out_features)
        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def bert_config(layers: int = 12, hidden: int = 768, vocab: int = 30522, seq_len: int = 128) -> Any:
    """``BertConfig()`` itself at the defaults; otherwise its layout scaled (64-wide heads, 4x MLP)."""
    from transformers import BertConfig

    defaults = BertConfig()
    overrides: dict[str, int] = {}
    if (layers, hidden, vocab) != (defaults.num_hidden_layers, defaults.hidden_size, defaults.vocab_size):
        overrides = {
            "num_hidden_layers": layers,
            "hidden_size": hidden,
            "num_attention_heads": hidden // 64 if hidden % 64 == 0 else 1,
            "intermediate_size": 4 * hidden,
            "vocab_size": vocab,
        }
    if seq_len > defaults.max_position_embeddings:
        overrides["max_position_embeddings"] = seq_len
    return BertConfig(**overrides)


class BertEncoder(nn.Module):
    """transformers' ``BertModel`` on packed token inputs: ``(B, 2, L)`` int64 (ids, attention mask).

    Returns the pooled [CLS] feature ``(B, hidden)`` (the pooler's dense + tanh over the first token, as
    ``BertForSequenceClassification`` reads it). With the default arguments the config is exactly
    ``BertConfig()``: 12 layers, hidden 768, 12 heads, intermediate 3072, vocabulary 30522, dropout 0.1.
    """

    def __init__(self, layers: int = 12, hidden: int = 768, vocab: int = 30522, seq_len: int = 128) -> None:
        super().__init__()
        from transformers import BertModel

        self.bert = BertModel(bert_config(layers, hidden, vocab, seq_len))
        self.hidden = hidden

    def forward(self, tokens: Tensor) -> Tensor:
        return self.bert(input_ids=tokens[:, 0], attention_mask=tokens[:, 1]).pooler_output


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
        bert_layers, bert_hidden, bert_vocab: the BERT encoders' depth, width and vocabulary (defaults:
            ``BertConfig()``'s 12, 768 and 30522).
        seq_len: tokens per BERT input (128).
    """

    kind: str = "small-cnn"
    image_size: int = 16
    width: int = 16
    mlp_width: int = 2048
    mlp_features: int = 512
    bert_layers: int = 12
    bert_hidden: int = 768
    bert_vocab: int = 30522
    seq_len: int = 128

    def names(self, n_encoders: int) -> tuple[str, ...]:
        """The encoders' names (and their losses'): modalities for the CNNs and MLPs, text for BERT."""
        names = TEXT_ENCODER_NAMES if self.kind == "bert" else ENCODER_NAMES
        if not 2 <= n_encoders <= len(names):
            raise ValueError(f"Between 2 and {len(names)} encoders are supported, got {n_encoders}.")
        return names[:n_encoders]

    def input_shape(self, name: str) -> tuple[int, ...]:
        if self.kind == "resnet18":
            return (1, 257, 188) if name == "audio" else (3, 224, 224)
        if self.kind == "wide-mlp":
            return (MLP_INPUT_DIMS.get(name, MLP_INPUT_DIMS["visual"]),)
        if self.kind == "bert":
            return (2, self.seq_len)  # token ids and attention mask, packed
        return (1 if name == "audio" else 3, self.image_size, self.image_size)

    def make_input(self, name: str, batch_size: int, gen: torch.Generator) -> Tensor:
        """One encoder's input: Gaussian images or features, or random token ids with a mask of ones."""
        if self.kind == "bert":
            ids = torch.randint(0, self.bert_vocab, (batch_size, self.seq_len), generator=gen)
            return torch.stack([ids, torch.ones_like(ids)], dim=1)
        return torch.randn(batch_size, *self.input_shape(name), generator=gen)

    def build(self, n_encoders: int) -> MultiEncoderNet:
        names = self.names(n_encoders)
        if self.kind == "resnet18-tiny":
            encoders = {n: NarrowResNet18(self.input_shape(n)[0]) for n in names}
            return MultiEncoderNet(encoders, encoders[names[0]].out_features)
        if self.kind == "bert":
            bert = {
                n: BertEncoder(self.bert_layers, self.bert_hidden, self.bert_vocab, self.seq_len)
                for n in names
            }
            return MultiEncoderNet(bert, self.bert_hidden)
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
        if self.kind == "bert":
            return (
                f"{', '.join(self.names(n_encoders))}: BERT {self.bert_layers} layers, "
                f"hidden {self.bert_hidden}, vocabulary {self.bert_vocab}; token ids + attention mask of "
                f"ones, sequence {self.seq_len}"
            )
        return ", ".join(f"{n} {'x'.join(map(str, self.input_shape(n)))}" for n in self.names(n_encoders))


def make_batch(
    spec: ModelSpec, names: Sequence[str], batch_size: int, device: torch.device, seed: int
) -> dict[str, Tensor]:
    """One fixed random batch (reused every step: the benchmark times compute, not data loading)."""
    gen = torch.Generator().manual_seed(seed + 1)
    batch = {n: spec.make_input(n, batch_size, gen) for n in names}
    batch[LABEL] = torch.randint(0, NUM_CLASSES, (batch_size,), generator=gen)
    return {k: v.to(device) for k, v in batch.items()}


def build_network_and_batch(
    spec: ModelSpec, n_encoders: int, batch_size: int, device: torch.device, seed: int
) -> tuple[MultiEncoderNet, dict[str, Tensor]]:
    """The seeded initial network (every method copies it) and the fixed batch of one measurement.

    The network is initialised on ``device`` directly (BERT-base's 220M parameters initialise in
    milliseconds on a GPU, seconds on a CPU).
    """
    torch.manual_seed(seed)
    with device:
        base = spec.build(n_encoders).to(device)
    return base, make_batch(spec, list(base.encoders), batch_size, device, seed)


def make_optimizer(net: nn.Module) -> torch.optim.Optimizer:
    # The paper's CREMA-D optimizer.
    return torch.optim.SGD(net.parameters(), lr=2e-3, momentum=0.9, weight_decay=1e-4)

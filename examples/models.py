"""Lightning models for the examples: late-fusion classifiers with one unimodal head per encoder.

Every model follows the MMPareto multitask layout: one encoder per modality, a concatenation fusion
head trained with the multimodal loss, and a linear unimodal head per encoder trained with that
modality's own loss. ``training_step`` only returns the named losses; the
:class:`mmpareto_lightning.MMParetoCallback` decides how they become encoder gradients.

- :class:`CGDigitsClassifier`: small CNN encoders for the 8x8 CG-Digits views (two or three).
- :class:`AVClassifier`: the paper's CREMA-D / Kinetics-Sounds model, two ResNet-18 encoders trained
  from scratch (audio log-mel fbank with one input channel; visual frames folded into the batch).

Metrics (torchmetrics, logged for ``val`` and ``test``): ``<stage>/acc`` (top-1 of the fusion head),
``<stage>/macro_f1`` (fusion head), ``<stage>/acc_<modality>`` (each unimodal head) and
``<stage>/loss`` (multimodal cross-entropy).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from mmpareto_lightning import MMParetoModule

from .cg_digits import MODALITY_CHANNELS

MULTIMODAL_KEY = "multimodal"
LABEL_KEY = "label"


class MultimodalClassifier(MMParetoModule):
    """Base class: per-modality encoders, concat fusion head, unimodal heads, SGD and metrics.

    Subclasses build their encoders and call :meth:`build_heads` at the end of ``__init__``.
    Batches are dictionaries ``{modality: input tensor, "label": (B,) long tensor}``.

    Args:
        num_classes: Number of classes.
        lr: SGD learning rate (constant, as in the paper).
        momentum: SGD momentum.
        weight_decay: SGD weight decay.
    """

    def __init__(self, num_classes: int, lr: float, momentum: float, weight_decay: float) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.lr = lr
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.modalities: list[str] = []

    def build_heads(self, encoders: Mapping[str, nn.Module], feature_dims: Mapping[str, int]) -> None:
        """Register the encoders, the fusion and unimodal heads, and the val/test metrics.

        Args:
            encoders: Modality name -> encoder producing ``(B, feature_dims[name])`` features.
            feature_dims: Modality name -> feature width of that encoder.
        """
        if MULTIMODAL_KEY in encoders or LABEL_KEY in encoders:
            raise ValueError(f"modality names {MULTIMODAL_KEY!r} and {LABEL_KEY!r} are reserved")
        self.modalities = list(encoders)
        self.encoders = nn.ModuleDict(dict(encoders))
        self.fusion_head = nn.Linear(sum(feature_dims[m] for m in self.modalities), self.num_classes)
        self.unimodal_heads = nn.ModuleDict(
            {m: nn.Linear(feature_dims[m], self.num_classes) for m in self.modalities}
        )
        # One collection per stage: torchmetrics keeps per-stage state, and Lightning needs metric
        # objects that are attributes of the module to log them with their epoch reduction.
        self.val_metrics = self._make_metrics()
        self.test_metrics = self._make_metrics()

    def _make_metrics(self) -> nn.ModuleDict:
        n = self.num_classes
        metrics: dict[str, nn.Module] = {
            "acc": MulticlassAccuracy(num_classes=n, average="micro"),
            "macro_f1": MulticlassF1Score(num_classes=n, average="macro"),
        }
        for m in self.modalities:
            metrics[f"acc_{m}"] = MulticlassAccuracy(num_classes=n, average="micro")
        return nn.ModuleDict(metrics)

    def setup(self, stage: str) -> None:
        # A class list with more names than the heads have outputs would fail deep inside cross-entropy.
        datamodule = getattr(self.trainer, "datamodule", None)
        expected = getattr(datamodule, "num_classes", None)
        if isinstance(expected, int) and expected != self.num_classes:
            raise ValueError(
                f"the data has {expected} classes but {type(self).__name__} was built with "
                f"num_classes={self.num_classes}; set model.init_args.num_classes={expected}"
            )

    def mmpareto_encoders(self) -> dict[str, nn.Module]:
        """Encoders that receive the MMPareto update, keyed like their unimodal losses."""
        return {m: self.encoders[m] for m in self.modalities}

    def forward(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Logits of the fusion head (key ``"multimodal"``) and of each unimodal head (modality keys)."""
        # Calling the encoder modules (not their internals) lets the library's forward hooks see
        # every encoder output, and each loss reaches an encoder only through that output.
        features = {m: self.encoders[m](batch[m]) for m in self.modalities}
        logits = {MULTIMODAL_KEY: self.fusion_head(torch.cat([features[m] for m in self.modalities], dim=1))}
        for m in self.modalities:
            logits[m] = self.unimodal_heads[m](features[m])
        return logits

    def training_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        logits = self(batch)
        target = batch[LABEL_KEY]
        return {name: F.cross_entropy(out, target) for name, out in logits.items()}

    def _eval_step(self, batch: Mapping[str, torch.Tensor], stage: str) -> None:
        logits = self(batch)
        target = batch[LABEL_KEY]
        metrics = self.val_metrics if stage == "val" else self.test_metrics
        batch_size = target.shape[0]
        for name, metric in metrics.items():
            # acc and macro_f1 score the fusion head; acc_<modality> scores that unimodal head.
            source = name.removeprefix("acc_") if name.startswith("acc_") else MULTIMODAL_KEY
            metric.update(logits[source], target)
            self.log(f"{stage}/{name}", metric, on_step=False, on_epoch=True, batch_size=batch_size)
        self.log(f"{stage}/loss", F.cross_entropy(logits[MULTIMODAL_KEY], target), batch_size=batch_size)

    def validation_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def predict_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        logits = self(batch)
        out = {"pred": logits[MULTIMODAL_KEY].argmax(dim=1), "probs": logits[MULTIMODAL_KEY].softmax(dim=1)}
        out.update({f"pred_{m}": logits[m].argmax(dim=1) for m in self.modalities})
        if LABEL_KEY in batch:
            out[LABEL_KEY] = batch[LABEL_KEY]
        return out

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(
            self.parameters(), lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay
        )


class SmallCNNEncoder(nn.Module):
    """Three-layer CNN for 8x8 inputs: ``(B, C, 8, 8) -> (B, feature_dim)``.

    Args:
        in_channels: Input channels.
        hidden_channels: Width of the first convolution (the second is twice as wide).
        feature_dim: Output feature width.
    """

    def __init__(self, in_channels: int, hidden_channels: int = 32, feature_dim: int = 64) -> None:
        super().__init__()
        h = hidden_channels
        # BatchNorm is included on purpose: its affine parameters belong to the encoder and its
        # running statistics must be updated once per step by the MMPareto update.
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, h, 3, padding=1),
            nn.BatchNorm2d(h),
            nn.ReLU(),
            nn.Conv2d(h, 2 * h, 3, padding=1),
            nn.BatchNorm2d(2 * h),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * h, feature_dim, 3, padding=1),
            nn.BatchNorm2d(feature_dim),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.feature_dim = feature_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class CGDigitsClassifier(MultimodalClassifier):
    """Late-fusion classifier for CG-Digits with one small CNN encoder per view.

    Args:
        modalities: CG-Digits views, any of ``"gray"``, ``"color"``, ``"noisy"`` (two or three).
        num_classes: Number of classes (10 digits).
        hidden_channels: Width of the encoders' first convolution.
        feature_dim: Feature width of each encoder.
        lr: SGD learning rate.
        momentum: SGD momentum.
        weight_decay: SGD weight decay.
    """

    def __init__(
        self,
        modalities: Sequence[str] = ("gray", "color"),
        num_classes: int = 10,
        hidden_channels: int = 32,
        feature_dim: int = 64,
        lr: float = 0.01,
        momentum: float = 0.9,
        weight_decay: float = 1e-4,
    ) -> None:
        super().__init__(num_classes=num_classes, lr=lr, momentum=momentum, weight_decay=weight_decay)
        self.save_hyperparameters()
        unknown = [m for m in modalities if m not in MODALITY_CHANNELS]
        if unknown:
            raise ValueError(f"unknown CG-Digits modalities {unknown}; choose from {list(MODALITY_CHANNELS)}")
        encoders = {
            m: SmallCNNEncoder(MODALITY_CHANNELS[m], hidden_channels, feature_dim) for m in modalities
        }
        self.build_heads(encoders, {m: feature_dim for m in modalities})


def _resnet18_trunk(in_channels: int) -> nn.Sequential:
    """torchvision ResNet-18 from scratch without its average pool and fc, for ``in_channels`` inputs."""
    from torchvision.models import resnet18

    net = resnet18(weights=None)
    if in_channels != 3:
        net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
    return nn.Sequential(
        net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3, net.layer4
    )


class ResNet18AudioEncoder(nn.Module):
    """Audio encoder: log-mel fbank ``(B, 1, T, 128)`` -> ResNet-18 (1 input channel) -> ``(B, 512)``.

    Args:
        in_channels: Input channels of the spectrogram (1 for a log-mel fbank).
    """

    feature_dim = 512

    def __init__(self, in_channels: int = 1) -> None:
        super().__init__()
        self.trunk = _resnet18_trunk(in_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 3:  # (B, T, F) without the channel axis
            x = x.unsqueeze(1)
        return torch.flatten(F.adaptive_avg_pool2d(self.trunk(x), 1), 1)


class ResNet18VisualEncoder(nn.Module):
    """Visual encoder: frames ``(B, C, T, H, W)`` folded into the batch, ResNet-18, pooled over T, h, w.

    ``(B, C, T, H, W) -> (B*T, C, H, W) -> ResNet-18 -> (B*T, 512, h, w) -> (B, 512, T, h, w)
    -> adaptive average pool -> (B, 512)``, as in the authors' code.

    Args:
        in_channels: Channels per frame (3 for RGB).
    """

    feature_dim = 512

    def __init__(self, in_channels: int = 3) -> None:
        super().__init__()
        self.trunk = _resnet18_trunk(in_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape
        frames = x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)
        feats = self.trunk(frames)
        _, d, fh, fw = feats.shape
        feats = feats.view(b, t, d, fh, fw).permute(0, 2, 1, 3, 4)
        return torch.flatten(F.adaptive_avg_pool3d(feats, 1), 1)


class AVClassifier(MultimodalClassifier):
    """The paper's audio-visual model: two ResNet-18 encoders from scratch, concat fusion, unimodal heads.

    Fusion head ``Linear(1024, num_classes)``, unimodal heads ``Linear(512, num_classes)``. Defaults are
    the paper's CREMA-D hyperparameters (SGD lr 2e-3, momentum 0.9, weight decay 1e-4, constant lr).

    Args:
        num_classes: Number of classes (CREMA-D: 6, Kinetics-Sounds: 31 in the authors' split).
        lr: SGD learning rate.
        momentum: SGD momentum.
        weight_decay: SGD weight decay.
    """

    def __init__(
        self, num_classes: int = 6, lr: float = 2e-3, momentum: float = 0.9, weight_decay: float = 1e-4
    ) -> None:
        super().__init__(num_classes=num_classes, lr=lr, momentum=momentum, weight_decay=weight_decay)
        self.save_hyperparameters()
        encoders = {"audio": ResNet18AudioEncoder(1), "visual": ResNet18VisualEncoder(3)}
        self.build_heads(encoders, {m: 512 for m in encoders})

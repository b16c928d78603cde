"""Example models: shapes, the paper's ResNet-18 layout, and training with MMParetoCallback."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from _bounds import U32, assert_within, gamma
from torch import nn

pytest.importorskip("sklearn")

from mmpareto_examples.av_datasets import CremaDDataModule
from mmpareto_examples.cg_digits import CGDigitsDataModule
from mmpareto_examples.fake_data import write_fake_av_dataset
from mmpareto_examples.models import (
    AVClassifier,
    CGDigitsClassifier,
    ResNet18AudioEncoder,
    ResNet18VisualEncoder,
)

from mmpareto_lightning import MMParetoCallback, MMParetoModule


def _trainer(tmp_path, callbacks, **kwargs) -> pl.Trainer:
    options = dict(
        accelerator="cpu",
        max_epochs=1,
        limit_train_batches=3,
        limit_val_batches=2,
        limit_test_batches=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        log_every_n_steps=1,
    )
    options.update(kwargs)
    return pl.Trainer(callbacks=callbacks, **options)


def _snapshot(module: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def _changed(module: nn.Module, before: list[torch.Tensor]) -> bool:
    return any(not torch.equal(p, b) for p, b in zip(module.parameters(), before, strict=True))


def test_cg_digits_model_layout_and_logits():
    model = CGDigitsClassifier(modalities=["gray", "color", "noisy"], feature_dim=32)
    assert isinstance(model, MMParetoModule) and not model.automatic_optimization
    assert list(model.mmpareto_encoders()) == ["gray", "color", "noisy"]
    assert model.fusion_head.in_features == 96 and model.fusion_head.out_features == 10
    batch = {
        "gray": torch.rand(5, 1, 8, 8),
        "color": torch.rand(5, 3, 8, 8),
        "noisy": torch.randn(5, 1, 8, 8),
    }
    logits = model(batch)
    assert set(logits) == {"multimodal", "gray", "color", "noisy"}
    assert all(v.shape == (5, 10) for v in logits.values())
    # A unimodal head depends on its own modality only.
    changed = dict(batch, color=torch.rand(5, 3, 8, 8))
    model.eval()
    a, b = model(batch), model(changed)
    assert torch.equal(a["gray"], b["gray"]) and not torch.equal(a["color"], b["color"])
    assert not torch.equal(a["multimodal"], b["multimodal"])


def test_cg_digits_model_rejects_unknown_modalities():
    with pytest.raises(ValueError, match="unknown CG-Digits modalities"):
        CGDigitsClassifier(modalities=["gray", "depth"])


def test_cg_digits_training_updates_every_encoder_and_logs_metrics(tmp_path):
    pl.seed_everything(0)
    model = CGDigitsClassifier(modalities=["gray", "color"], hidden_channels=8, feature_dim=16)
    data = CGDigitsDataModule(modalities=["gray", "color"], batch_size=32)
    before = {name: _snapshot(enc) for name, enc in model.mmpareto_encoders().items()}
    heads_before = _snapshot(model.unimodal_heads)
    trainer = _trainer(tmp_path, [MMParetoCallback(strategy="mmpareto")])
    trainer.fit(model, datamodule=data)
    assert trainer.global_step == 3
    for name, enc in model.mmpareto_encoders().items():
        assert _changed(enc, before[name]), name
    assert _changed(model.unimodal_heads, heads_before)
    metrics = trainer.callback_metrics
    for key in ("val/acc", "val/macro_f1", "val/acc_gray", "val/acc_color", "val/loss"):
        assert key in metrics and torch.isfinite(metrics[key])
    assert 0.0 <= float(metrics["val/acc"]) <= 1.0
    for key in (
        "mmpareto/gray/cos_beta_step",
        "mmpareto/color/alpha_multimodal_step",
        "mmpareto/loss_multimodal_step",
    ):
        assert key in metrics
    results = trainer.test(model, datamodule=data, verbose=False)[0]
    assert set(results) >= {"test/acc", "test/macro_f1", "test/acc_gray", "test/acc_color"}


def test_metrics_are_the_paper_columns(tmp_path):
    """val/acc is top-1 of the fusion head, acc_<m> that of the unimodal head, macro_f1 the macro F1."""
    pl.seed_everything(0)
    model = CGDigitsClassifier(modalities=["gray", "color"], hidden_channels=8, feature_dim=16)
    data = CGDigitsDataModule(modalities=["gray", "color"], batch_size=64)
    trainer = _trainer(tmp_path, [MMParetoCallback()], limit_test_batches=1.0)
    results = trainer.test(model, datamodule=data, verbose=False)[0]
    # The reference runs the model on the test loop's own batches: the same operations on the same
    # numbers give the same logits bit for bit (one full-set forward could round differently and flip a
    # near tie), so the counts below are the metrics' own, and what is left is float32 arithmetic.
    model.eval()
    logits, losses, sizes = {"multimodal": [], "gray": []}, [], []
    with torch.inference_mode():
        for batch in data.test_dataloader():
            out = model(batch)
            for key in logits:
                logits[key].append(out[key])
            losses.append(F.cross_entropy(out["multimodal"], batch["label"]).item())
            sizes.append(len(batch["label"]))
    y = data.dataset("test").tensors["label"]
    n = len(y)
    pred = torch.cat(logits["multimodal"]).argmax(1)
    # Accuracy: an exact count over n, divided once in float32.
    correct = int((pred == y).sum())
    assert_within(results["test/acc"], correct / n, U32 * correct / n, "test/acc")
    correct_gray = int((torch.cat(logits["gray"]).argmax(1) == y).sum())
    assert_within(results["test/acc_gray"], correct_gray / n, U32 * correct_gray / n, "test/acc_gray")
    # Macro F1: per class 2 tp / (2 tp + fp + fn) from exact counts (one float32 division), each divided
    # by the number of classes (one more) and the ten added in float32: gamma(11) of their sum.
    assert set(y.tolist()) == set(range(10))  # every class counts in the macro mean
    f1s = []
    for c in range(10):
        tp = int(((pred == c) & (y == c)).sum())
        fp = int(((pred == c) & (y != c)).sum())
        fn = int(((pred != c) & (y == c)).sum())
        f1s.append(2 * tp / (2 * tp + fp + fn))
    assert_within(results["test/macro_f1"], sum(f1s) / 10, gamma(11) * sum(f1s) / 10, "test/macro_f1")
    # The loss: Lightning's batch-size-weighted mean of the per-batch losses (float32 numbers computed by
    # the same operations here): each times its batch size, added, divided: m + 1 roundings.
    weighted = [loss * size for loss, size in zip(losses, sizes, strict=True)]
    bound = gamma(len(losses) + 1) * sum(abs(w) for w in weighted) / n
    assert_within(results["test/loss"], math.fsum(weighted) / n, bound, "test/loss")


def test_three_modalities_give_three_mmpareto_encoders(tmp_path):
    pl.seed_everything(1)
    mods = ["gray", "color", "noisy"]
    model = CGDigitsClassifier(modalities=mods, hidden_channels=8, feature_dim=16)
    trainer = _trainer(tmp_path, [MMParetoCallback()], limit_train_batches=2, limit_val_batches=1)
    trainer.fit(model, datamodule=CGDigitsDataModule(modalities=mods, batch_size=32))
    for m in mods:
        assert f"mmpareto/{m}/cos_beta_step" in trainer.callback_metrics
        assert f"val/acc_{m}" in trainer.callback_metrics


def test_resnet18_audio_encoder_matches_the_paper():
    enc = ResNet18AudioEncoder()
    first = enc.trunk[0]
    assert isinstance(first, nn.Conv2d) and first.in_channels == 1 and first.out_channels == 64
    assert not any(isinstance(m, nn.Linear) for m in enc.modules())  # fc dropped
    n_params = sum(p.numel() for p in enc.parameters())
    # torchvision ResNet-18 has 11,689,512 parameters; minus fc (513,000) and 2 of conv1's 3 input channels.
    assert n_params == 11_689_512 - 513_000 - 2 * 64 * 7 * 7
    out = enc(torch.randn(2, 1, 64, 128))
    assert out.shape == (2, 512)


def test_resnet18_visual_encoder_folds_frames_and_pools_over_time():
    torch.manual_seed(0)
    enc = ResNet18VisualEncoder().eval()
    b, t = 2, 3
    x = torch.randn(b, 3, t, 64, 64)  # (B, C, T, H, W)
    with torch.no_grad():
        out = enc(x)
        # The frames, clip by clip, built here independently of the encoder's reshape: the trunk on this
        # batch runs the same operations on the same numbers as inside the encoder (bit for bit, if the
        # folding is right), so what is left to compare is the pooling.
        frames = torch.stack([x[i, :, f] for i in range(b) for f in range(t)])
        feats = enc.trunk(frames).double()
    assert out.shape == (2, 512)
    # Pooling over (T, h, w) is the mean over frames of per-frame pooled features: both are the exact mean
    # of the same T h w float32 numbers per clip and channel. The encoder's float32 average pool sums them
    # (any order) and divides: gamma(T h w) of the sum of their magnitudes, over T h w.
    per_clip = feats.reshape(b, t, *feats.shape[1:]).transpose(1, 2).flatten(2)  # (B, 512, T h w)
    count = per_clip.shape[-1]
    bound = gamma(count) * per_clip.abs().sum(-1) / count
    assert_within(out.double().numpy(), per_clip.mean(-1).numpy(), bound.numpy(), "pooled features")
    # Frames of one clip never mix with another clip's: changing clip 0 leaves clip 1's features bitwise
    # unchanged (the same operations on the same numbers: images of a batch are computed independently).
    other = x.clone()
    other[0] = torch.randn_like(other[0])
    with torch.no_grad():
        changed = enc(other)
    assert torch.equal(changed[1], out[1]) and not torch.equal(changed[0], out[0])


def test_av_classifier_heads():
    model = AVClassifier(num_classes=6)
    assert model.fusion_head.in_features == 1024 and model.fusion_head.out_features == 6
    assert all(h.in_features == 512 and h.out_features == 6 for h in model.unimodal_heads.values())
    assert (model.lr, model.momentum, model.weight_decay) == (2e-3, 0.9, 1e-4)
    opt = model.configure_optimizers()
    assert isinstance(opt, torch.optim.SGD)
    assert (
        opt.defaults["lr"] == 2e-3
        and opt.defaults["momentum"] == 0.9
        and opt.defaults["weight_decay"] == 1e-4
    )


def test_av_classifier_trains_on_the_fake_layout(tmp_path):
    pl.seed_everything(0)
    root = tmp_path / "cremad"
    write_fake_av_dataset(root, classes=["NEU", "HAP", "SAD"], clips_per_class=2, frames_per_clip=4)
    data = CremaDDataModule(str(root), num_frames=2, batch_size=3, num_workers=0, image_size=32)
    model = AVClassifier(num_classes=3)
    before = {name: _snapshot(enc) for name, enc in model.mmpareto_encoders().items()}
    trainer = _trainer(tmp_path, [MMParetoCallback()], limit_train_batches=2, limit_val_batches=1)
    trainer.fit(model, datamodule=data)
    assert trainer.global_step == 2
    for name, enc in model.mmpareto_encoders().items():
        assert _changed(enc, before[name]), name
    for key in ("val/acc", "val/acc_audio", "val/acc_visual", "mmpareto/audio/cos_beta_step"):
        assert key in trainer.callback_metrics


def test_num_classes_mismatch_is_reported(tmp_path):
    root = tmp_path / "cremad"
    write_fake_av_dataset(root, classes=["NEU", "HAP", "SAD"], clips_per_class=1)
    data = CremaDDataModule(str(root), batch_size=2, num_workers=0, image_size=32)
    with pytest.raises(ValueError, match="num_classes=3"):
        _trainer(tmp_path, [MMParetoCallback()]).fit(AVClassifier(num_classes=6), datamodule=data)

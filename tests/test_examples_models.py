"""Example models: shapes, the paper's ResNet-18 layout, and training with MMParetoCallback."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
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
    model.eval()
    test = data.dataset("test").tensors
    with torch.no_grad():
        logits = model(test)
    y = test["label"]
    pred = logits["multimodal"].argmax(1)
    assert results["test/acc"] == pytest.approx((pred == y).float().mean().item(), abs=1e-6)
    assert results["test/acc_gray"] == pytest.approx(
        (logits["gray"].argmax(1) == y).float().mean().item(), abs=1e-6
    )
    f1s = []
    for c in range(10):
        tp = ((pred == c) & (y == c)).sum().item()
        fp = ((pred == c) & (y != c)).sum().item()
        fn = ((pred != c) & (y == c)).sum().item()
        f1s.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    assert results["test/macro_f1"] == pytest.approx(sum(f1s) / 10, abs=1e-5)
    assert results["test/loss"] == pytest.approx(F.cross_entropy(logits["multimodal"], y).item(), rel=1e-4)


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
    x = torch.randn(2, 3, 3, 64, 64)  # (B, C, T, H, W)
    with torch.no_grad():
        out = enc(x)
        # Equal-size frames: pooling over (T, h, w) is the mean over frames of per-frame pooled features.
        per_frame = torch.stack(
            [F.adaptive_avg_pool2d(enc.trunk(x[:, :, t]), 1).flatten(1) for t in range(3)], dim=1
        )
    assert out.shape == (2, 512)
    torch.testing.assert_close(out, per_frame.mean(dim=1), rtol=1e-4, atol=1e-5)
    # Frames of one clip never mix with another clip's.
    with torch.no_grad():
        single = enc(x[1:])
    torch.testing.assert_close(single[0], out[1], rtol=1e-4, atol=1e-5)


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

"""Third-party encoders as a new user would plug them in: a tiny HuggingFace BERT and tiny timm models.

Every optimizer step is checked against plain ``torch.autograd.grad`` (``_exact.expected_deltas``): the
parameter update must be the MMPareto rule applied to the per-loss gradients, with ordinary Lightning
callbacks beside ours, and in the plain-PyTorch engine loop.
"""

from __future__ import annotations

import copy
import csv

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from _exact import assert_moved_by, expected_deltas
from _models import trainer_kwargs
from lightning.pytorch.callbacks import (
    BaseFinetuning,
    EarlyStopping,
    LearningRateMonitor,
    ModelCheckpoint,
)
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from mmpareto_lightning import MMParetoCallback, MMParetoEngine, MMParetoModule, RuleConfig

transformers = pytest.importorskip("transformers")
timm = pytest.importorskip("timm")

CLASSES, VOCAB, SEQ, IMG = 3, 100, 8, 32


def tiny_bert(dropout: float = 0.0, **overrides) -> nn.Module:
    config = transformers.BertConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        vocab_size=VOCAB,
        max_position_embeddings=SEQ,
        type_vocab_size=2,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
        **overrides,
    )
    return transformers.BertModel(config)


def tiny_resnet() -> nn.Module:
    # resnet18's layout (BasicBlocks, BatchNorm) with narrow channels: 44k parameters, 16 features.
    return timm.create_model(
        "resnet18", pretrained=False, num_classes=0, channels=(8, 16, 16, 16), stem_width=8
    )


def tiny_vit() -> nn.Module:
    # num_classes=0 and global_pool="" make the ViT return its tokens (class token first).
    return timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=IMG,
        patch_size=8,
        embed_dim=32,
        depth=2,
        num_heads=2,
        num_classes=0,
        global_pool="",
    )


def make_loader(size: int = 8, batch_size: int = 4, seed: int = 0) -> DataLoader:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (size, SEQ), generator=gen)
    lengths = torch.randint(3, SEQ + 1, (size,), generator=gen)
    mask = (torch.arange(SEQ)[None] < lengths[:, None]).long()  # right padding
    ids = ids * mask
    token_types = (torch.arange(SEQ)[None] >= (lengths[:, None] // 2)).long() * mask  # two segments
    images = torch.randn(size, 3, IMG, IMG, generator=gen)
    y = torch.randint(0, CLASSES, (size,), generator=gen)
    return DataLoader(TensorDataset(ids, mask, token_types, images, y), batch_size=batch_size)


class TextImageNet(MMParetoModule):
    """BERT text encoder + timm image encoder, concatenation fusion head, one unimodal head each.

    Args:
        image: "resnet" (pooled features) or "vit" (tokens: the heads use the class token and the mean).
        swap: the text unimodal head uses the masked token mean and fusion the pooler output (instead of
            the other way round).
        tuple_output: call BERT with ``return_dict=False`` (a tuple instead of a ``ModelOutput``).
    """

    def __init__(
        self, image: str = "resnet", swap: bool = False, tuple_output: bool = False, dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.text = tiny_bert(dropout)
        self.image = tiny_resnet() if image == "resnet" else tiny_vit()
        self.vit = image == "vit"
        img_dim = 64 if self.vit else 16
        self.head = nn.Sequential(nn.Linear(32 + img_dim, 16), nn.ReLU(), nn.Linear(16, CLASSES))
        self.head_text = nn.Linear(32, CLASSES)
        self.head_image = nn.Linear(32 if self.vit else 16, CLASSES)
        self.swap, self.tuple_output = swap, tuple_output
        self.lr = 1.0

    def mmpareto_encoders(self):
        return {"text": self.text, "image": self.image}

    def text_features(self, ids, mask, token_types):
        out = self.text(
            input_ids=ids,
            attention_mask=mask,
            token_type_ids=token_types,
            return_dict=not self.tuple_output,
        )
        tokens, pooled = out if self.tuple_output else (out.last_hidden_state, out.pooler_output)
        weights = mask.unsqueeze(-1).to(tokens.dtype)
        mean = (tokens * weights).sum(1) / weights.sum(1)
        return (pooled, mean) if self.swap else (mean, pooled)  # (fusion, unimodal)

    def image_features(self, images):
        z = self.image(images)
        if self.vit:  # tokens: class token for the unimodal head, [class, mean of patches] for fusion
            return torch.cat([z[:, 0], z[:, 1:].mean(1)], 1), z[:, 0]
        return z, z

    def losses(self, batch):
        ids, mask, token_types, images, y = batch
        text_fused, text_own = self.text_features(ids, mask, token_types)
        image_fused, image_own = self.image_features(images)
        return {
            "multimodal": F.cross_entropy(self.head(torch.cat([text_fused, image_fused], 1)), y),
            "text": F.cross_entropy(self.head_text(text_own), y),
            "image": F.cross_entropy(self.head_image(image_own), y),
        }

    def training_step(self, batch, batch_idx):
        return self.losses(batch)

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=self.lr)


def _encoders(model):
    return model.mmpareto_encoders()


class StepChecker(pl.Callback):
    """Checks every optimizer step against plain autograd: plain SGD (no momentum), any learning rates.

    The expected update of a parameter is ``lr`` of its parameter group (read before the step) times the
    rule's delta; BatchNorm statistics must move as after one forward. With ``seed``, the step and the
    reference draw the same dropout masks.
    """

    def __init__(self, strategy: str = "mmpareto", seed: int | None = None, loss_fn=None) -> None:
        self.strategy, self.seed = strategy, seed
        self.loss_fn = loss_fn or (lambda model, batch: model.losses(batch))
        self.checked = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.before = copy.deepcopy(pl_module)
        deltas = expected_deltas(
            pl_module, _encoders, lambda m: self.loss_fn(m, batch), strategy=self.strategy, seed=self.seed
        )
        lr = {id(p): g["lr"] for g in trainer.optimizers[0].param_groups for p in g["params"]}
        self.expected = deltas.scaled({n: lr.get(id(p), 0.0) for n, p in pl_module.named_parameters()})
        # Buffers (BatchNorm statistics) after one training-mode forward of the batch.
        ref = copy.deepcopy(pl_module)
        with torch.no_grad():
            self.loss_fn(ref, batch)
        self.buffers = {n: b.clone() for n, b in ref.named_buffers()}
        if self.seed is not None:
            torch.manual_seed(self.seed)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        assert_moved_by(pl_module, self.before, self.expected)
        for name, buffer in pl_module.named_buffers():
            torch.testing.assert_close(buffer, self.buffers[name], msg=name)
        self.checked += 1


def _fit(model, steps: int = 2, callbacks=(), strategy: str = "mmpareto", loader=None, **kwargs):
    trainer = pl.Trainer(
        max_steps=steps,
        callbacks=[MMParetoCallback(strategy=strategy), *callbacks],
        **trainer_kwargs(**kwargs),
    )
    trainer.fit(model, loader if loader is not None else make_loader())
    return trainer


# ---------------------------------------------------------------- BERT + ResNet, BERT + ViT
@pytest.mark.parametrize(
    ("strategy", "image", "swap", "tuple_output"),
    [
        ("mmpareto", "resnet", True, True),
        ("multimodal_only", "resnet", False, False),
        ("mmpareto", "vit", False, False),
        ("multimodal_only", "vit", True, True),
    ],
)
def test_bert_with_timm_encoder_is_exact(strategy: str, image: str, swap: bool, tuple_output: bool) -> None:
    torch.manual_seed(0)
    model = TextImageNet(image=image, swap=swap, tuple_output=tuple_output)
    checker = StepChecker(strategy=strategy)
    trainer = _fit(model, steps=2, callbacks=[checker], strategy=strategy)
    assert checker.checked == 2 and trainer.global_step == 2
    conflicts = sum(float(v) for k, v in trainer.callback_metrics.items() if k.endswith("conflicts_total"))
    if strategy == "mmpareto":
        assert conflicts > 0  # these seeds run the rule's conflict branch (min-norm direction, rescale)


def test_dropout_masks_reproduced_by_seeding_is_exact() -> None:
    torch.manual_seed(0)
    checker = StepChecker(seed=1234)
    _fit(TextImageNet(dropout=0.2), steps=2, callbacks=[checker])
    assert checker.checked == 2


def test_bert_outputs_from_intermediate_layers_are_exact() -> None:
    # `hidden_states[-1]` is the very tensor `last_hidden_state` is, `hidden_states[1]` an earlier layer's.
    class HiddenStates(TextImageNet):
        def text_features(self, ids, mask, token_types):
            out = self.text(
                input_ids=ids, attention_mask=mask, token_type_ids=token_types, output_hidden_states=True
            )
            fused = out.hidden_states[1][:, 0] + out.last_hidden_state[:, 0] + out.hidden_states[-1][:, 1]
            return fused, out.pooler_output

    torch.manual_seed(0)
    checker = StepChecker()
    _fit(HiddenStates(), steps=1, callbacks=[checker])
    assert checker.checked == 1


def test_calling_forward_features_instead_of_the_module_is_a_clear_error() -> None:
    class ForwardFeatures(TextImageNet):
        def image_features(self, images):
            tokens = self.image.forward_features(images)  # bypasses the module's forward hooks
            return torch.cat([tokens[:, 0], tokens[:, 1:].mean(1)], 1), tokens[:, 0]

    with pytest.raises(MisconfigurationException, match="Call the encoder module itself"):
        _fit(ForwardFeatures(image="vit"), steps=1)


def test_trainable_module_upstream_of_an_encoder_is_refused_or_exact() -> None:
    class InnerEncoder(TextImageNet):
        def mmpareto_encoders(self):
            return {"text": self.text.encoder, "image": self.image}  # embeddings: outside, trainable

    torch.manual_seed(0)
    checker = StepChecker()
    try:
        _fit(InnerEncoder(), steps=1, callbacks=[checker])
    except MisconfigurationException:
        return  # refused: fine
    assert checker.checked == 1


def test_encoder_parameters_no_loss_reaches_are_left_alone() -> None:
    class TokensOnly(TextImageNet):
        def text_features(self, ids, mask, token_types):
            tokens = self.text(input_ids=ids, attention_mask=mask, token_type_ids=token_types)
            tokens = tokens.last_hidden_state
            return tokens.mean(1), tokens[:, 0]  # pooler_output unused

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-3, weight_decay=0.1)

    torch.manual_seed(0)
    model = TokensOnly()
    pooler = copy.deepcopy(model.text.pooler)
    _fit(model, steps=1)
    assert torch.equal(model.text.pooler.dense.weight, pooler.dense.weight)


# ---------------------------------------------------------------- ordinary Lightning callbacks beside ours
class FreezeEmbeddingsFirstEpoch(BaseFinetuning):
    def freeze_before_training(self, pl_module) -> None:
        self.freeze(pl_module.text.embeddings)

    def finetune_function(self, pl_module, current_epoch, optimizer) -> None:
        if current_epoch == 1:
            self.unfreeze_and_add_param_group(pl_module.text.embeddings, optimizer, initial_denom_lr=4.0)


class Validated(TextImageNet):
    def validation_step(self, batch, batch_idx):
        losses = self.training_step(batch, batch_idx)  # the plain losses outside the training loop
        self.log("val/loss", sum(losses.values()))

    def configure_optimizers(self):
        optimizer = torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=1.0)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
        return {"optimizer": optimizer, "lr_scheduler": scheduler}


def test_lightning_callbacks_beside_ours_stay_exact(tmp_path) -> None:
    torch.manual_seed(0)
    model = Validated()
    embeddings_before = copy.deepcopy(model.text.embeddings)
    checker = StepChecker()
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val/loss", save_top_k=1, save_last=True)
    # min_delta so large that no epoch after the first improves: stops after epoch 1 (of 3).
    early_stopping = EarlyStopping(monitor="val/loss", patience=1, min_delta=1e9)
    trainer = pl.Trainer(
        max_epochs=3,
        callbacks=[
            MMParetoCallback(),
            FreezeEmbeddingsFirstEpoch(),
            checkpoint,
            early_stopping,
            LearningRateMonitor(logging_interval="step"),
            checker,
        ],
        **trainer_kwargs(enable_checkpointing=True, logger=CSVLogger(tmp_path, name="csv")),
    )
    trainer.fit(model, make_loader(), make_loader(size=4, seed=1))

    assert trainer.current_epoch == 2 and early_stopping.stopped_epoch == 1
    assert checker.checked == trainer.global_step == 4  # 2 epochs x 2 batches, each one exact
    # Frozen for the first epoch (the checker saw no movement then), trained in the second.
    assert not torch.equal(
        model.text.embeddings.word_embeddings.weight, embeddings_before.word_embeddings.weight
    )
    ckpt = torch.load(checkpoint.best_model_path, weights_only=False)
    assert any(key.startswith("MMParetoCallback") for key in ckpt["callbacks"])
    assert (tmp_path / "ckpt" / "last.ckpt").exists()

    with open(trainer.logger.experiment.metrics_file_path) as f:
        rows = list(csv.DictReader(f))
    columns = set(rows[0])
    assert {"val/loss", "mmpareto/loss_step", "mmpareto/text/cos_beta_step", "lr-SGD"} <= columns
    # LearningRateMonitor renames the first group "lr-SGD/pg1" once the embeddings' group is added.
    lrs = {key: [float(r[key]) for r in rows if r.get(key)] for key in ("lr-SGD", "lr-SGD/pg1", "lr-SGD/pg2")}
    assert lrs == {"lr-SGD": [1.0, 1.0], "lr-SGD/pg1": [0.5, 0.5], "lr-SGD/pg2": [0.125, 0.125]}


# ---------------------------------------------------------------- precision, accumulation, clipping
def test_bf16_mixed_is_exact() -> None:
    def autocast_losses(model, batch):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model.losses(batch)

    torch.manual_seed(0)
    checker = StepChecker(loss_fn=autocast_losses)
    _fit(TextImageNet(), steps=2, callbacks=[checker], precision="bf16-mixed")
    assert checker.checked == 2


class WindowChecker(pl.Callback):
    """Checks accumulation windows of ``n`` batches: one step with the rule applied to the window's summed
    per-loss gradients (each batch's losses divided by ``n``), then clipped by total norm."""

    def __init__(self, n: int, clip: float | None) -> None:
        self.n, self.clip = n, clip
        self.checked = 0
        self.batches: list = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx % self.n == 0:
            self.before, self.batches = copy.deepcopy(pl_module), []
        self.batches.append(batch)
        self.params = [p.detach().clone() for p in pl_module.parameters()]
        if len(self.batches) < self.n:
            return
        batches = list(self.batches)

        def window_losses(model):
            per_batch = [model.losses(b) for b in batches]
            return {k: sum(losses[k] for losses in per_batch) / self.n for k in per_batch[0]}

        expected = expected_deltas(self.before, _encoders, window_losses)
        if self.clip is not None:
            expected, coef = expected.clipped(self.clip)
            assert coef < 0.5  # clipping is active
        self.expected = expected

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if len(self.batches) < self.n:  # inside the window: nothing moves
            for p, old in zip(pl_module.parameters(), self.params, strict=True):
                assert torch.equal(p, old)
            return
        assert_moved_by(pl_module, self.before, self.expected)
        self.checked += 1


def test_trainer_accumulation_and_clipping_are_exact() -> None:
    torch.manual_seed(0)
    checker = WindowChecker(n=2, clip=1.0)
    trainer = _fit(
        TextImageNet(),
        steps=2,
        callbacks=[checker],
        loader=make_loader(size=16),
        accumulate_grad_batches=2,
        gradient_clip_val=1.0,
    )
    assert checker.checked == trainer.global_step == 2


def test_manual_backward_inside_training_step_is_refused_or_harmless() -> None:
    class StrayBackward(TextImageNet):
        def training_step(self, batch, batch_idx):
            losses = self.losses(batch)
            self.manual_backward(losses["multimodal"], retain_graph=True)
            return losses

    torch.manual_seed(0)
    checker = WindowChecker(n=2, clip=None)
    try:
        _fit(StrayBackward(), steps=1, callbacks=[checker], accumulate_grad_batches=2)
    except MisconfigurationException:
        return  # refused: fine
    assert checker.checked == 1


# ---------------------------------------------------------------- activation checkpointing
def hf_checkpointing(model: nn.Module, use_reentrant: bool | None = None) -> None:
    """transformers' activation checkpointing (``gradient_checkpointing_enable`` before 5.x's rename)."""
    kwargs = None if use_reentrant is None else {"use_reentrant": use_reentrant}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


@pytest.mark.parametrize("use_reentrant", [None, False])
def test_hf_and_timm_gradient_checkpointing_is_exact_or_refused(use_reentrant: bool | None) -> None:
    torch.manual_seed(0)
    model = TextImageNet(image="vit")  # no BatchNorm: see the BatchNorm test below
    hf_checkpointing(model.text, use_reentrant)  # None: the installed transformers' default
    model.image.set_grad_checkpointing(True)  # timm's default: use_reentrant=False
    checker = StepChecker()
    try:
        _fit(model, steps=2, callbacks=[checker])
    except MisconfigurationException as err:
        # Older transformers checkpoint with use_reentrant=True by default: refused, naming the fix.
        assert use_reentrant is None and "use_reentrant=False" in str(err)
        return
    assert checker.checked == 2


@pytest.mark.parametrize("which", ["text", "image"])
def test_reentrant_checkpointing_is_refused(which: str, monkeypatch) -> None:
    torch.manual_seed(0)
    model = TextImageNet(image="vit")
    if which == "text":
        hf_checkpointing(model.text, use_reentrant=True)
    else:
        monkeypatch.setattr(timm.layers.config, "_USE_REENTRANT_CKPT", True)  # timm.layers.set_reentrant_ckpt
        model.image.set_grad_checkpointing(True)
    with pytest.raises(MisconfigurationException, match="use_reentrant=False"):
        _fit(model, steps=1)


def test_reentrant_checkpointing_enabled_mid_fit_is_refused_or_exact() -> None:
    class EnableAtSecondStep(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if trainer.global_step == 1:
                hf_checkpointing(pl_module.text, use_reentrant=True)

    class FreezeEmbeddings(BaseFinetuning):
        def freeze_before_training(self, pl_module) -> None:
            self.freeze(pl_module.text.embeddings)

        def finetune_function(self, pl_module, current_epoch, optimizer) -> None:
            pass

    torch.manual_seed(0)
    # The checker runs first (plain autograd, checkpointing still off on the second step's reference).
    checker = StepChecker()
    try:
        _fit(TextImageNet(), steps=2, callbacks=[FreezeEmbeddings(), checker, EnableAtSecondStep()])
    except MisconfigurationException:
        return  # refused: fine
    assert checker.checked == 2


def test_batchnorm_statistics_under_checkpointing_match_plain_autograd() -> None:
    torch.manual_seed(0)
    model = TextImageNet()
    model.image.set_grad_checkpointing(True)
    plain = copy.deepcopy(model)
    batch = next(iter(make_loader()))
    sum(plain.losses(batch).values()).backward()  # plain training step with checkpointing
    _fit(model, steps=1)
    for (name, buffer), plain_buffer in zip(model.named_buffers(), plain.buffers(), strict=True):
        torch.testing.assert_close(buffer, plain_buffer, msg=name)


# ---------------------------------------------------------------- torch.compile on an encoder
@pytest.mark.slow
def test_compiled_encoder_is_exact() -> None:
    torch.manual_seed(0)
    model = TextImageNet()
    plain = copy.deepcopy(model)
    model.image = torch.compile(model.image, backend="aot_eager")
    loader = make_loader()
    batch = next(iter(loader))
    expected = expected_deltas(plain, _encoders, lambda m: m.losses(batch))
    _fit(model, steps=1, loader=loader)
    model.image = model.image._orig_mod
    assert_moved_by(model, plain, expected)


# ---------------------------------------------------------------- plain PyTorch: MMParetoEngine
@pytest.mark.parametrize("strategy", ["mmpareto", "multimodal_only"])
def test_plain_pytorch_engine_loop_is_exact(strategy: str) -> None:
    torch.manual_seed(0)
    model = TextImageNet()
    engine = MMParetoEngine({"text": model.text, "image": model.image}, RuleConfig(strategy=strategy))
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    for batch in make_loader():
        expected = expected_deltas(model, _encoders, lambda m, b=batch: m.losses(b), strategy=strategy)
        before = copy.deepcopy(model)
        optimizer.zero_grad(set_to_none=True)
        with engine.capture():
            losses = model.training_step(batch, 0)  # outside a Trainer: the plain losses
        engine.backward(losses)
        stats = engine.integrate()
        optimizer.step()
        assert set(stats) == {"text", "image"}
        assert_moved_by(model, before, expected)

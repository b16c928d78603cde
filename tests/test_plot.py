"""``mmpareto-lightning plot``: reading CSVLogger and TensorBoard logs, the figure, the clear failures."""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

from _models import MultiModalNet, make_loader, trainer_kwargs

from mmpareto_lightning import MMParetoCallback
from mmpareto_lightning.cli import main
from mmpareto_lightning.cli.logs import (
    encoder_dynamics,
    find_runs,
    read_metrics_csv,
    read_scalars,
    read_tensorboard,
)
from mmpareto_lightning.cli.plotting import plot_dynamics, rolling_mean

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

CSV = (
    "epoch,mmpareto/a/alpha_align_step,mmpareto/a/alpha_multimodal_step,mmpareto/a/alpha_unimodal_step,"
    "mmpareto/a/conflicts_step,mmpareto/a/cos_beta_epoch,mmpareto/a/cos_beta_step,mmpareto/a/rescale_step,"
    "mmpareto/a/stationary_step,mmpareto/a/stationary_total,step,val/acc\n"
    "0,0.3333,0.3333,0.3334,0,,0.5,1.0,0,0,0,\n"
    "0,0.2,0.5,0.3,1,,-0.25,1.5,1,1,5,\n"
    "0,,,,,0.125,,,,,5,\n"
    "0,,,,,,,,,,5,0.9\n"
    "1,0.1,0.6,0.3,1,,-0.5,2.0,0,3,10,\n"
)


def test_read_metrics_csv_and_encoder_dynamics(tmp_path):
    path = tmp_path / "metrics.csv"
    path.write_text(CSV)
    scalars = read_metrics_csv(path)
    assert scalars["val/acc"] == {5: 0.9} and scalars["mmpareto/a/cos_beta_epoch"] == {5: 0.125}
    (enc, dyn), *rest = encoder_dynamics(scalars).items()
    assert enc == "a" and not rest
    assert dyn.steps == [0, 5, 10] and dyn.cos_beta == [0.5, -0.25, -0.5]
    assert list(dyn.alphas) == ["multimodal", "unimodal", "align"]  # the rule's objective order
    assert dyn.alphas["align"] == [0.3333, 0.2, 0.1] and dyn.rescale == [1.0, 1.5, 2.0]
    assert dyn.conflict_rate() == 2 / 3  # (0 + 1 + 1) / 3: an exact sum, one correctly rounded division
    # stationary_total counts the steps between logging steps too: two more events by step 10.
    assert dyn.stationary_events() == [5, 10] and dyn.cumulative_stationary() == [0, 1, 3]


def test_rolling_mean_skips_nan():
    assert rolling_mean([1.0, math.nan, 3.0, 5.0], 2) == [1.0, 1.0, 3.0, 4.0]


def _fit(tmp_path: Path, loggers: list, steps: int = 6) -> None:
    import lightning.pytorch as pl

    kwargs = trainer_kwargs(max_steps=steps, logger=loggers, log_every_n_steps=2)
    trainer = pl.Trainer(callbacks=[MMParetoCallback()], **kwargs)
    trainer.fit(MultiModalNet(n=2, extra_loss=True), make_loader())


def test_tensorboard_and_csv_logs_give_the_same_dynamics(tmp_path):
    pytest.importorskip("tensorboard")
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    csv_logger = CSVLogger(tmp_path / "csv", name="", version="run")
    tb_logger = TensorBoardLogger(tmp_path / "tb", name="", version="run")
    _fit(tmp_path, [csv_logger, tb_logger])
    from_csv = encoder_dynamics(read_scalars(csv_logger.log_dir))
    from_tb = encoder_dynamics(read_tensorboard(tb_logger.log_dir))
    assert list(from_csv) == ["audio", "visual"] and from_tb.keys() == from_csv.keys()
    for enc, dyn in from_csv.items():
        assert dyn.steps == [1, 3, 5] and dyn.steps == from_tb[enc].steps
        # Both loggers store the same float32 values, the CSV as the shortest decimal that reads back
        # to them and TensorBoard as float32: read back, they are the same numbers.
        assert dyn.cos_beta == from_tb[enc].cos_beta
        assert dyn.alphas.keys() == from_tb[enc].alphas.keys()
        assert dyn.stationary_total == from_tb[enc].stationary_total
    assert set(from_csv["audio"].alphas) == {"multimodal", "unimodal", "align"}  # K = 3 on audio


def test_plot_command_on_a_csv_run(tmp_path, capsys):
    from lightning.pytorch.loggers import CSVLogger

    for version in ("version_0", "version_1"):
        _fit(tmp_path, [CSVLogger(tmp_path / "runs", name="logs", version=version)])
    newest = tmp_path / "runs" / "logs" / "version_1"
    os.utime(newest / "metrics.csv", (2e9, 2e9))
    assert find_runs(tmp_path / "runs")[0] == newest
    main(["plot", str(tmp_path / "runs")])
    out = capsys.readouterr().out
    assert "2 runs under" in out and str(newest) in out
    data = (newest / "training_dynamics.png").read_bytes()
    assert data[:8] == PNG_MAGIC
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width > 800 and height > 1000  # two encoders, five panels each


def test_plot_of_several_curves(tmp_path):
    path = tmp_path / "x.csv"
    path.write_text(CSV)
    dyn = encoder_dynamics(read_metrics_csv(path))
    out = plot_dynamics({"uniform": [dyn, dyn], "MMPareto": [dyn]}, tmp_path / "fig.png", title="t")
    assert out.read_bytes()[:8] == PNG_MAGIC


def test_plot_fails_clearly(tmp_path, monkeypatch):
    with pytest.raises(SystemExit, match=r"no metrics\.csv .* or events\.out\.tfevents"):
        main(["plot", str(tmp_path)])
    (tmp_path / "metrics.csv").write_text("epoch,step,val/acc\n0,3,0.5\n")
    with pytest.raises(SystemExit, match="log_on_step=True"):
        main(["plot", str(tmp_path)])
    (tmp_path / "metrics.csv").write_text(CSV)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r"needs matplotlib: pip install matplotlib"):
        main(["plot", str(tmp_path)])


def test_tensorboard_files_without_tensorboard_name_the_extra(tmp_path, monkeypatch):
    (tmp_path / "events.out.tfevents.0.host.1.0").write_bytes(b"")
    for name in ("tensorboard", "tensorboard.backend.event_processing.event_accumulator"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ImportError, match=r"mmpareto-lightning\[tensorboard\]"):
        read_scalars(tmp_path)


# A diverging run: cos beta leaves [-1, 1], then reads inf, -inf and NaN; other columns too.
NON_FINITE_CSV = (
    "epoch,mmpareto/a/alpha_multimodal_step,mmpareto/a/alpha_unimodal_step,mmpareto/a/conflicts_step,"
    "mmpareto/a/cos_beta_step,mmpareto/a/rescale_step,mmpareto/a/stationary_total,step,val/acc\n"
    "0,0.5,0.5,0,0.5,1.0,0,0,\n"
    "0,0.4,0.6,1,-1.28,1.5,0,1,\n"
    "0,nan,nan,1,inf,inf,0,2,\n"
    "0,0.3,0.7,1,-inf,2.0,inf,3,nan\n"
    "0,0.5,0.5,0,nan,-inf,1,4,\n"
    "0,0.5,0.5,0,0.25,1.0,1,5,0.5\n"
)
NON_FINITE_COUNTS = {
    "mmpareto/a/alpha_multimodal_step": 1,
    "mmpareto/a/alpha_unimodal_step": 1,
    "mmpareto/a/cos_beta_step": 3,
    "mmpareto/a/rescale_step": 2,
    "mmpareto/a/stationary_total": 1,
    "val/acc": 1,
}


def test_rolling_mean_and_averages_skip_infinities():
    from mmpareto_lightning.cli.plotting import average_over_runs

    assert rolling_mean([1.0, math.inf, -math.inf, 3.0], 4) == [1.0, 1.0, 1.0, 2.0]
    assert average_over_runs([([0, 1], [math.inf, 2.0]), ([0, 1], [1.0, -math.inf])]) == ([0, 1], [1.0, 2.0])


def test_drop_non_finite_counts_every_key(tmp_path):
    from mmpareto_lightning.cli.logs import drop_non_finite

    (tmp_path / "metrics.csv").write_text(NON_FINITE_CSV)
    scalars, skipped = drop_non_finite(read_metrics_csv(tmp_path / "metrics.csv"))
    assert skipped == NON_FINITE_COUNTS
    assert scalars["mmpareto/a/cos_beta_step"] == {0: 0.5, 1: -1.28, 5: 0.25}
    assert all(math.isfinite(v) for series in scalars.values() for v in series.values())


def test_plot_skips_non_finite_values_and_says_so(tmp_path, capsys):
    from mmpareto_lightning.cli.logs import NonFiniteWarning

    (tmp_path / "metrics.csv").write_text(NON_FINITE_CSV)
    with pytest.warns(NonFiniteWarning) as record:
        main(["plot", str(tmp_path)])
    message = str(record[0].message)
    for key, count in NON_FINITE_COUNTS.items():
        assert f"{key} ({count} value" in message
    assert (tmp_path / "training_dynamics.png").read_bytes()[:8] == PNG_MAGIC

"""The ``mmpareto-lightning`` LightningCLI: shipped configs, the ``mmpareto:`` section, sub-commands.

The tests that are about the command line a user types run the installed console script in a temporary
folder holding the user's own model module and YAML (``tests/_user_project.py``).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

pytest.importorskip("jsonargparse")
pytest.importorskip("sklearn")

from _user_project import console_script, run_in, write_user_project
from mmpareto_examples import CONFIG_DIR
from mmpareto_examples.fake_data import write_fake_av_dataset
from mmpareto_examples.models import AVClassifier, CGDigitsClassifier

from mmpareto_lightning import MMParetoCallback
from mmpareto_lightning.cli import build_cli, main
from mmpareto_lightning.cli.logs import encoder_dynamics, read_metrics_csv

REPO = Path(__file__).resolve().parent.parent
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


def _mmpareto_callback(trainer) -> MMParetoCallback:
    found = [cb for cb in trainer.callbacks if isinstance(cb, MMParetoCallback)]
    assert len(found) == 1
    return found[0]


@pytest.mark.parametrize("name", ["cg_digits.yaml", "cg_digits_3mod.yaml"])
def test_fit_cg_digits_configs(name, tmp_path):
    cli = build_cli(
        [
            "fit",
            "--config",
            str(CONFIG_DIR / name),
            "--trainer.fast_dev_run=2",
            f"--trainer.default_root_dir={tmp_path}",
            *QUIET,
        ]
    )
    assert isinstance(cli.model, CGDigitsClassifier)
    assert cli.trainer.global_step == 2
    cb = _mmpareto_callback(cli.trainer)
    assert cb.rule.strategy == "mmpareto" and cb.optimizer_steps == 2
    for m in cli.model.modalities:
        assert f"mmpareto/{m}/cos_beta_step" in cli.trainer.callback_metrics
    assert "val/acc" in cli.trainer.callback_metrics


@pytest.mark.parametrize(
    ("name", "list_ext", "num_frames"), [("cremad.yaml", "csv", 1), ("kinetics_sounds.yaml", "txt", 3)]
)
def test_fit_av_configs_on_the_fake_layout(name, list_ext, num_frames, tmp_path):
    root = tmp_path / "data"
    write_fake_av_dataset(
        root, classes=["a", "b", "c"], clips_per_class=2, frames_per_clip=6, list_ext=list_ext
    )
    cli = build_cli(
        [
            "fit",
            "--config",
            str(CONFIG_DIR / name),
            f"--data.init_args.root={root}",
            "--data.init_args.image_size=32",
            "--data.init_args.batch_size=3",
            "--data.init_args.num_workers=0",
            "--model.init_args.num_classes=3",
            "--trainer.accelerator=cpu",
            "--trainer.fast_dev_run=1",
            f"--trainer.default_root_dir={tmp_path}",
            *QUIET,
        ]
    )
    assert isinstance(cli.model, AVClassifier)
    assert cli.datamodule.hparams.num_frames == num_frames
    assert cli.trainer.global_step == 1
    assert {"val/acc", "val/acc_audio", "mmpareto/visual/cos_beta_step"} <= set(cli.trainer.callback_metrics)


def test_av_configs_hold_the_paper_hyperparameters():
    for name, classes in (("cremad.yaml", 6), ("kinetics_sounds.yaml", 31)):
        config = yaml.safe_load((CONFIG_DIR / name).read_text())
        model = config["model"]["init_args"]
        assert (model["lr"], model["momentum"], model["weight_decay"]) == (0.002, 0.9, 0.0001)
        assert model["num_classes"] == classes
        assert config["data"]["init_args"]["batch_size"] == 64
        assert config["trainer"]["max_epochs"] == 50


def test_callback_configured_only_from_yaml(tmp_path):
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "max_epochs": 1,
            "limit_train_batches": 2,
            "limit_val_batches": 1,
            "logger": False,
            "enable_checkpointing": False,
            "enable_progress_bar": False,
            "default_root_dir": str(tmp_path),
        },
        "mmpareto": {
            "strategy": "pareto",
            "rescale": "per_encoder",
            "gamma": 2.0,
            "gradient_clip_val": 0.5,
            "gradient_clip_algorithm": "value",
            "accumulate_grad_batches": 2,
        },
        "model": {
            "class_path": "mmpareto_examples.models.CGDigitsClassifier",
            "init_args": {"feature_dim": 16},
        },
        "data": {
            "class_path": "mmpareto_examples.cg_digits.CGDigitsDataModule",
            "init_args": {"batch_size": 16},
        },
    }
    path = tmp_path / "only_yaml.yaml"
    path.write_text(yaml.safe_dump(config))
    cli = build_cli(["fit", "--config", str(path)])
    cb = _mmpareto_callback(cli.trainer)
    assert (cb.rule.strategy, cb.rule.rescale, cb.rule.gamma) == ("pareto", "per_encoder", 2.0)
    assert (cb.gradient_clip_val, cb.gradient_clip_algorithm, cb.accumulate_grad_batches) == (0.5, "value", 2)
    # Two batches accumulated into one optimizer step.
    assert cli.trainer.global_step == 1 and cb.optimizer_steps == 1
    assert cli.model.encoders["gray"].feature_dim == 16


def test_callback_options_from_the_command_line_with_other_callbacks(tmp_path):
    # The case: another callback after MMPareto's used to swallow the strategy switch.
    cli = build_cli(
        [
            "--config",
            str(CONFIG_DIR / "cg_digits.yaml"),
            "--trainer.callbacks+=EarlyStopping",
            "--trainer.callbacks.monitor=val/acc",
            "--trainer.callbacks+=LearningRateMonitor",
            "--mmpareto.strategy=uniform",
            "--mmpareto.gamma=1.25",
            f"--trainer.default_root_dir={tmp_path}",
        ],
        run=False,
    )
    cb = _mmpareto_callback(cli.trainer)
    assert cb.rule.strategy == "uniform" and cb.rule.gamma == 1.25
    assert cb.rule.rescale == "per_tensor"  # untouched values keep the config's
    names = [type(c).__name__ for c in cli.trainer.callbacks]
    assert "EarlyStopping" in names and "LearningRateMonitor" in names


def test_every_callback_argument_is_a_mmpareto_option(capsys):
    import inspect

    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    out = capsys.readouterr().out
    for name in inspect.signature(MMParetoCallback.__init__).parameters:
        if name != "self":
            assert f"--mmpareto.{name} " in out, name


def test_callback_listed_under_trainer_callbacks_is_refused_with_the_fix(tmp_path, capsys):
    config = yaml.safe_load((CONFIG_DIR / "cg_digits.yaml").read_text())
    config.pop("mmpareto")
    config["trainer"]["callbacks"] = [
        {"class_path": "lightning.pytorch.callbacks.EarlyStopping", "init_args": {"monitor": "val/acc"}},
        {"class_path": "mmpareto_lightning.MMParetoCallback", "init_args": {"strategy": "pareto"}},
    ]
    path = tmp_path / "old_style.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit) as exc:
        build_cli(["fit", "--config", str(path)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "is listed under trainer.callbacks" in err
    assert "mmpareto:" in err and "--mmpareto.strategy=pareto" in err


@pytest.mark.slow
def test_console_script_in_a_users_folder_switches_strategy_and_plots(tmp_path):
    """Items 1-3 of the issue as a user meets them: their module, their YAML, another callback."""
    script = console_script()
    write_user_project(tmp_path)
    fit = run_in(tmp_path, script, "fit", "--config", "my.yaml", "--mmpareto.strategy=pareto")
    assert fit.returncode == 0, fit.stderr[-3000:]  # `mymodels` was found in the working directory
    assert "mmpareto-lightning plot" in fit.stdout + fit.stderr  # the hint at the end of fit
    (run,) = (tmp_path / "runs" / "lightning_logs").iterdir()
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["mmpareto"]["strategy"] == "pareto"  # the run records its strategy
    assert [c["class_path"].split(".")[-1] for c in saved["trainer"]["callbacks"]] == ["EarlyStopping"]
    alphas = encoder_dynamics(read_metrics_csv(run / "metrics.csv"))["a"].alphas["multimodal"]
    # Conventional Pareto weighs by min-norm on every step: not the 1/2 of a plain sum.
    assert alphas and all(a != 0.5 for a in alphas)

    plot = run_in(tmp_path, script, "plot", "runs", "--output", "dyn.png")
    assert plot.returncode == 0, plot.stderr[-3000:]
    assert (tmp_path / "dyn.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _readme_block(heading: str) -> str:
    text = (REPO / "examples" / "README.md").read_text()
    match = re.search(re.escape(heading) + r".*?```python\n(.*?)```", text, re.S)
    assert match is not None, f"examples/README.md has no python block under {heading!r}"
    return match.group(1)


@pytest.mark.slow
def test_your_own_lightning_cli_script_from_the_docs(tmp_path):
    write_user_project(tmp_path)
    (tmp_path / "train.py").write_text(_readme_block("### MMPareto in your own LightningCLI script"))
    out = run_in(
        tmp_path, sys.executable, "train.py", "fit", "--config", "my.yaml", "--mmpareto.strategy=uniform",
        "--trainer.max_epochs=1",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    (run,) = (tmp_path / "runs" / "lightning_logs").iterdir()
    assert yaml.safe_load((run / "config.yaml").read_text())["mmpareto"]["strategy"] == "uniform"
    assert "mmpareto/a/cos_beta_step" in (run / "metrics.csv").read_text().splitlines()[0]


# Evaluating without a logger moves the restored checkpoint callback's directory; harmless here.
@pytest.mark.filterwarnings("ignore:The dirpath has changed")
def test_validate_test_and_predict_subcommands(tmp_path):
    common = [
        "--config",
        str(CONFIG_DIR / "cg_digits.yaml"),
        f"--trainer.default_root_dir={tmp_path}",
        *QUIET,
    ]
    fit = build_cli(
        [
            "fit",
            *common,
            "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=2",
            "--trainer.limit_val_batches=1",
            "--trainer.log_every_n_steps=1",
        ]
    )
    ckpt = fit.trainer.checkpoint_callback.best_model_path or fit.trainer.checkpoint_callback.last_model_path
    assert ckpt and Path(ckpt).is_file()
    common += ["--trainer.logger=false"]
    val = build_cli(["validate", *common, "--trainer.limit_val_batches=2", f"--ckpt_path={ckpt}"])
    assert 0.0 <= float(val.trainer.callback_metrics["val/acc"]) <= 1.0
    test = build_cli(["test", *common, "--trainer.limit_test_batches=2", f"--ckpt_path={ckpt}"])
    assert {"test/acc", "test/macro_f1", "test/acc_gray", "test/acc_color"} <= set(
        test.trainer.callback_metrics
    )
    pred = build_cli(["predict", *common, "--trainer.limit_predict_batches=2", "--return_predictions=true"])
    outputs = pred.trainer.predict_loop.predictions
    assert len(outputs) == 2 and outputs[0]["pred"].shape == (64,)
    assert torch.allclose(outputs[0]["probs"].sum(1), torch.ones(64))


def test_main_dispatches_compare_help(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["compare", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "--seeds" in out and "--output-dir" in out and "mmpareto" in out


def test_help_mentions_compare(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "compare" in out and "fit" in out and "predict" in out


@pytest.mark.slow
def test_training_script_runs_directly(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            str(REPO / "examples" / "train_cg_digits.py"),
            "--fast-dev-run",
            "--strategy",
            "pareto",
            "--output-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "test/acc=" in out.stdout and "test/acc_color=" in out.stdout


def test_precision_and_resume_from_the_command_line(tmp_path):
    common = [
        "fit",
        "--config",
        str(CONFIG_DIR / "cg_digits.yaml"),
        f"--trainer.default_root_dir={tmp_path}",
        "--trainer.precision=bf16-mixed",
        "--trainer.limit_train_batches=3",
        "--trainer.limit_val_batches=1",
        "--trainer.logger=false",
        *QUIET,
    ]
    first = build_cli([*common, "--trainer.max_epochs=1"])
    assert first.trainer.precision == "bf16-mixed"
    assert _mmpareto_callback(first.trainer).optimizer_steps == 3
    ckpt = (
        first.trainer.checkpoint_callback.last_model_path or first.trainer.checkpoint_callback.best_model_path
    )
    assert ckpt and Path(ckpt).is_file()
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    saved = next(v for k, v in state["callbacks"].items() if k.startswith("MMParetoCallback"))
    assert saved["optimizer_steps"] == 3

    resumed = build_cli([*common, "--trainer.max_epochs=2", f"--ckpt_path={ckpt}"])
    assert resumed.trainer.global_step == 6
    cb = _mmpareto_callback(resumed.trainer)
    assert cb.optimizer_steps == 6  # counters continue from the checkpoint, not from zero
    totals = cb.totals
    assert set(totals) == set(resumed.model.modalities)
    for counts in totals.values():
        assert 0 <= counts["conflicts"] <= 6 and 0 <= counts["stationary"] <= counts["conflicts"]


@pytest.mark.slow
def test_ddp_from_the_command_line(tmp_path):
    # ddp_spawn: the plain `ddp` launcher re-runs the command line, which a test process cannot do.
    # Spawned ranks train; the main process gets rank 0's weights and metrics back (Lightning's design).
    cli = build_cli(
        [
            "--config",
            str(CONFIG_DIR / "cg_digits.yaml"),
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.strategy=ddp_spawn",
            "--trainer.devices=2",
            "--trainer.max_steps=3",
            "--trainer.log_every_n_steps=1",
            "--trainer.limit_val_batches=1",
            "--trainer.logger=false",
            "--trainer.enable_checkpointing=false",
            *QUIET,
        ],
        run=False,
    )
    before = {k: v.detach().clone() for k, v in cli.model.named_parameters()}
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert cli.trainer.world_size == 2
    after = dict(cli.model.named_parameters())
    assert all(not torch.equal(before[k], after[k]) for k in before)  # every parameter was trained
    metrics = cli.trainer.callback_metrics
    for m in cli.model.modalities:
        # A global count: at most one per step, not one per rank and step.
        conflicts = float(metrics[f"mmpareto/{m}/conflicts_total"])
        assert conflicts == int(conflicts) and 0 <= conflicts <= 3
        assert -1.0 <= float(metrics[f"mmpareto/{m}/cos_beta_step"]) <= 1.0

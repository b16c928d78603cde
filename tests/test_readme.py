"""The README's promises: its two commands, the CI script running the same test command, its example."""

from __future__ import annotations

import re
import runpy
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    first_block = re.search(r"```bash\n(.*?)```", text, re.S)
    assert first_block is not None and first_block.start() < 200, "the README must open with its commands"
    return [line for line in first_block.group(1).splitlines() if line.strip()]


def test_readme_opens_with_exactly_two_commands_and_ci_runs_the_test_command() -> None:
    commands = _readme_commands()
    assert len(commands) == 2
    assert "mmpareto-lightning fit --config examples/configs/cg_digits.yaml" in commands[0]
    assert "pytest" in commands[1]
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert commands[1] in ci, ".ci/run must run the README's test command verbatim"
    assert (ROOT / "examples/configs/cg_digits.yaml").exists()


def test_readme_quick_start_runs(tmp_path) -> None:
    text = (ROOT / "README.md").read_text()
    quick_start = re.search(r"## Quick start\n\n```python\n(.*?)```", text, re.S)
    assert quick_start is not None
    namespace: dict = {}
    exec(compile(quick_start.group(1), "README-quick-start", "exec"), namespace)
    import lightning.pytorch as pl
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    data = TensorDataset(torch.randn(16, 128), torch.randn(16, 256), torch.randint(0, 6, (16,)))
    callback = namespace["MMParetoCallback"]()
    trainer = pl.Trainer(
        max_steps=2, callbacks=[callback], logger=False, enable_progress_bar=False, enable_checkpointing=False
    )
    trainer.fit(namespace["AVClassifier"](), DataLoader(data, batch_size=8))
    assert trainer.global_step == 2 and callback.optimizer_steps == 2


def test_plain_pytorch_example_runs(monkeypatch, capsys) -> None:
    monkeypatch.setattr(sys, "argv", ["plain_pytorch_loop.py", "--steps", "3", "--batch-size", "8"])
    runpy.run_path(str(ROOT / "examples" / "plain_pytorch_loop.py"), run_name="__main__")
    out = capsys.readouterr().out
    for key in (
        "loss_multimodal",
        "loss_audio",
        "loss_visual",
        "conflict_rate_audio",
        "conflict_rate_visual",
    ):
        assert re.search(rf"^{key}: \d+\.\d+$", out, re.M), out


@pytest.mark.parametrize(
    "path", sorted(str(p.relative_to(ROOT)) for p in (ROOT / "mmpareto_lightning").glob("*.py"))
)
def test_every_module_has_a_docstring(path: str) -> None:
    source = (ROOT / path).read_text()
    assert source.lstrip().startswith('"""'), f"{path} needs a module docstring saying what it is for"

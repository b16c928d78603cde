from __future__ import annotations

import warnings

import pytest
import torch

# Tiny models: one intra-op thread is fastest and keeps timings stable on a shared 2-core machine.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _quiet_and_deterministic():
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\).*")
        warnings.filterwarnings("ignore", message=".*GPU available but not used.*")
        yield

"""Shared pytest setup: one torch thread (tiny models; CI has 2 cores) and deterministic seeds."""

import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may come from a hub at run time
torch.set_num_threads(1)  # tiny models: one thread avoids sync overhead; CI has 2 cores


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield

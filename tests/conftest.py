"""Shared fixtures: small, seeded, CPU-only."""

import pytest
import torch

# Tiny networks: a second OpenMP thread buys nothing and, on a loaded machine, only waits (30x slower).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def small_testbed():
    from domains.gmm import make_testbed

    return make_testbed(dim=2, n_components=4, n_classes=2, seed=3)

"""Fixtures for the trainer tests: every architecture, small activations, a prepared model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.trainer.helpers import D_IN, TINY_ARCHES, tiny_arch_config
from trainer.data import TensorSource
from trainer.models import build_model


@pytest.fixture(params=sorted(TINY_ARCHES))
def arch(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def rows() -> np.ndarray:
    """Heavy-tailed, offset, anisotropic activations (like a residual stream) [2048, D_IN]."""
    rng = np.random.default_rng(7)
    basis = rng.standard_normal((D_IN * 2, D_IN))
    codes = rng.standard_normal((2048, D_IN * 2)) * (rng.random((2048, D_IN * 2)) < 0.1)
    return (codes @ basis * 3 + 5 * rng.standard_normal(D_IN)).astype(np.float32)


@pytest.fixture
def source(rows) -> TensorSource:
    return TensorSource(rows)


@pytest.fixture
def prepared(arch, rows):
    """A freshly built model of `arch`, with its data-dependent init done."""
    model = build_model(tiny_arch_config(arch), D_IN, seed=0)
    model.prepare(torch.from_numpy(rows[:512]))
    if arch == "tree":
        # training makes its first tree at step `reassign_every`; the tests want one now
        model.reassign(torch.from_numpy(rows))
    return model

"""Shared fixtures: tiny DUSt3R models (random, and the reference fixtures' weights)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from fixture_utils import FIXTURES, fixture, formula_state_dict  # noqa: E402

TINY = dict(img_size=(32, 48), enc_embed_dim=32, enc_depth=2, enc_num_heads=2,
            dec_embed_dim=32, dec_depth=2, dec_num_heads=2)


def pytest_configure(config):
    torch.set_num_threads(1)  # tiny models: threads only add overhead (and contention on 2 cores)


@pytest.fixture(scope="session")
def tiny_config():
    from mv_interp.adapters.dust3r import DUSt3RConfig

    return DUSt3RConfig(**TINY)


@pytest.fixture(scope="module")
def tiny_model_shared():
    """A seeded random tiny DUSt3R (``TINY``) in eval mode, wrapped in nnsight, shared by one test
    module (its tests only read it; ``tiny_model`` is the one to edit)."""
    import mv_interp
    from mv_interp.adapters.dust3r import DUSt3RConfig, HookedDUSt3R

    torch.manual_seed(0)
    return mv_interp.MVModel(HookedDUSt3R(DUSt3RConfig(**TINY)).eval())


@pytest.fixture()
def tiny_model(tiny_config):
    """A fresh random tiny DUSt3R wrapped in nnsight (function scope: tests may edit it)."""
    import mv_interp
    from mv_interp.adapters.dust3r import HookedDUSt3R

    torch.manual_seed(0)
    return mv_interp.MVModel(HookedDUSt3R(tiny_config).eval())


@pytest.fixture(scope="session")
def linear_fixture():
    return fixture("dust3r/dust3r_tiny_linear")


@pytest.fixture(scope="session")
def dpt_fixture():
    return fixture("dust3r/dust3r_tiny_dpt")


@pytest.fixture(scope="session")
def linear_model():
    import mv_interp

    return mv_interp.load_model(FIXTURES / "dust3r" / "dust3r_tiny_linear.pth")


@pytest.fixture(scope="session")
def dpt_model(dpt_fixture):
    import mv_interp

    meta, _ = dpt_fixture
    return mv_interp.load_model(formula_state_dict(meta), config=meta["config"])

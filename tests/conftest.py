"""Test set-up: 8 simulated CPU devices (set before jax is imported), markers, shared fixtures.

Tiers: the default run is fast (tiny shapes); ``-m slow`` marks the slower CPU tests that CI
still runs; ``gpu`` tests skip by detecting the hardware, never by an environment flag.
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

import jax
import pytest

# XLA:CPU spends most of a tiny test in compilation; the fast tier does not need optimised code.
jax.config.update("jax_disable_most_optimizations", True)

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"


def pytest_collection_modifyitems(config, items):
    """Skip ``gpu`` tests when jax sees no GPU (hardware detection, not an env flag)."""
    if any(d.platform == "gpu" for d in jax.devices()):
        return
    skip = pytest.mark.skip(reason="needs a GPU; jax sees none")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def x64():
    """Run the test body with 64-bit floats enabled."""
    with jax.enable_x64(True):
        yield


@pytest.fixture
def optimized():
    """Compile with XLA's optimisations for the test body (training loops run ~2x faster)."""
    jax.config.update("jax_disable_most_optimizations", False)
    yield
    jax.config.update("jax_disable_most_optimizations", True)


@pytest.fixture
def shared_data() -> Path:
    """``../shared/data`` beside the repository; skips the test where it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"needs the shared data folder {SHARED_DATA} (absent in this checkout)")
    return SHARED_DATA

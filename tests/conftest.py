"""Shared fixtures: real data (sklearn digits, image patches) and fresh random data."""
from __future__ import annotations

import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))

SESSION_SEED = int(os.environ.get("OPTDEN_TEST_SEED", np.random.SeedSequence().entropy % 2**32))


def pytest_report_header(config):
    return f"optden test seed: OPTDEN_TEST_SEED={SESSION_SEED}"


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    # the header is hidden under -q (the README's test command): name the seed of a failed run
    if exitstatus not in (0, 5):
        terminalreporter.write_line(f"optden test seed: OPTDEN_TEST_SEED={SESSION_SEED} (set it to rerun these draws)")


@pytest.fixture(scope="session")
def digits_u8() -> np.ndarray:
    """sklearn's 1797 handwritten digits as uint8 rows (1797, 64)."""
    from sklearn.datasets import load_digits

    return np.clip(np.round(load_digits().data * 255.0 / 16.0), 0, 255).astype(np.uint8)


@pytest.fixture(scope="session")
def faces_u8() -> np.ndarray:
    """Real photographs: 8x8 RGB patches of scikit-image's bundled astronaut, (M, 192) uint8."""
    from skimage import data

    img = data.astronaut()  # (512, 512, 3) uint8, bundled with scikit-image
    p = 8
    rows = []
    for i in range(0, img.shape[0] - p + 1, 12):
        for j in range(0, img.shape[1] - p + 1, 12):
            rows.append(img[i : i + p, j : j + p].transpose(2, 0, 1).reshape(-1))
    return np.stack(rows)


@pytest.fixture
def rng(request) -> np.random.Generator:
    """Fresh random data each session, reproducible: OPTDEN_TEST_SEED=<seed in the header>."""
    import zlib

    return np.random.default_rng([SESSION_SEED, zlib.crc32(request.node.nodeid.encode())])

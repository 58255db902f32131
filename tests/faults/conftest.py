"""Fixtures of the fault-injection suite: the tiny demo data and an uninterrupted reference run."""

import pytest

from tests.faults.runs import train_tiny


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory):
    """A data dir whose tiny demo dataset (16 frames of 64x96) is built once, by a real 1-epoch run."""
    data = tmp_path_factory.mktemp("fault-data")
    result = train_tiny(tmp_path_factory.mktemp("fault-warmup"), data, "--epochs", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    return data


@pytest.fixture(scope="session")
def reference_run(demo_data, tmp_path_factory):
    """An uninterrupted 4-epoch run: what every interrupted and resumed run must end with."""
    out = tmp_path_factory.mktemp("fault-reference")
    result = train_tiny(out, demo_data, "--epochs", "4")
    assert result.returncode == 0, result.stderr[-3000:]
    return out

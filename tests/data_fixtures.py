"""Shared fixtures of the data tests (imported by tests/test_data_*.py)."""

import os

import pytest


@pytest.fixture(scope="session")
def embedded_dirs(tmp_path_factory):
    """The embedded default, built once per test session in a temporary cache.

    Under pytest-xdist the workers share the session's parent temp dir; the build is
    atomic (temp folder + rename), so concurrent first uses are safe.
    """
    from fasdiff_jax.data.embedded import embedded_dataset

    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent
    return embedded_dataset(cache_dir=str(base / "fasdiff_cache"))

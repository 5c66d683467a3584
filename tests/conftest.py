"""Shared test set-up.

Torch runs single-threaded in tests: the machines have 2 cores and results must be
bit-reproducible. ``PTB_DIR`` points at the shared Penn Treebank copy beside the
checkout (``../shared/data/ptb``) unless ``CELLSEARCH_PTB_DIR`` is set.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]
# A user's cached Penn Treebank copy (`cellsearch data fetch ptb`) must not change what the tests see: the
# cache is an empty place here, and tests of the cache point CELLSEARCH_CACHE_DIR at their own directory.
os.environ["CELLSEARCH_CACHE_DIR"] = os.path.join(tempfile.gettempdir(), f"cellsearch-tests-no-cache-{os.getpid()}")
# Absolute: the README's test command gives a relative path, and tests change the working directory.
PTB_DIR = Path(os.environ.get("CELLSEARCH_PTB_DIR", REPO_ROOT.parent / "shared" / "data" / "ptb")).resolve()


@pytest.fixture(autouse=True, scope="session")
def _single_thread_torch():
    try:
        import torch
    except ImportError:  # pragma: no cover
        yield
        return
    torch.set_num_threads(1)
    yield


@pytest.fixture(scope="session")
def ptb_dir() -> Path:
    if not (PTB_DIR / "ptb.train.txt").exists():
        pytest.fail(f"Penn Treebank data not found at {PTB_DIR}; set CELLSEARCH_PTB_DIR")
    return PTB_DIR


@pytest.fixture(scope="session")
def ray_address():
    """A local Ray instance shared by the whole test session (2 CPUs, no dashboard); its GCS address.

    Started once because starting Ray costs about ten seconds on 2 cores. CLI tests attach
    their driver subprocesses to it with ``--address``.
    """
    ray = pytest.importorskip("ray")
    started = not ray.is_initialized()
    if started:
        # A new instance even when another Ray on this machine is recorded as the current cluster.
        ray.init(address="local", num_cpus=2, include_dashboard=False, configure_logging=False,
                 log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    if started:
        ray.shutdown()


def pytest_collection_modifyitems(config, items):
    """A test that uses the session's Ray instance is slow (Ray start-up, workers), marked or not."""
    for item in items:
        if "ray_address" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)

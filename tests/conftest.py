import os
from pathlib import Path

import pytest
import torch

# Under pytest-xdist (`make test` runs two workers) the cores are shared out between the workers, and
# the subprocesses the tests start (CLI runs, torchrun) inherit the share: threads that outnumber the
# cores make OpenMP spin-wait and everything slower.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
_THREADS = max(1, min(2, (os.cpu_count() or 1) // _WORKERS))
torch.set_num_threads(_THREADS)
if _WORKERS > 1:
    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_var, str(_THREADS))

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"


def pytest_collection_modifyitems(items):
    """The tests marked ``slow`` (tens of seconds each) run first: under pytest-xdist the short ones then
    fill in around them, instead of one long test running alone at the end."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)  # stable: otherwise collection order


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Never write into the user's home: every test gets its own cache folder."""
    monkeypatch.setenv("MOELAB_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture
def world_of_one():
    """A one-process gloo group in this process (an in-memory store), joined as moelab joins (``ddp.init``, so
    that destroying it afterwards frees it and stops its threads)."""
    import torch.distributed as dist

    from moelab.parallel import ddp

    if dist.is_initialized():  # pragma: no cover - another test left a group behind
        pytest.skip("a process group is already initialised in this process")
    ddp.init("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.fixture
def real_data_dir() -> Path:
    """The real data sets (MOELAB_DATA_DIR, else ../shared/datasets); skip when absent."""
    d = Path(os.environ.get("MOELAB_DATA_DIR", SHARED_DATA))
    if not (d / "mnist").is_dir():
        pytest.skip(f"real data sets not found at {d} (set MOELAB_DATA_DIR)")
    return d


@pytest.fixture(scope="session")
def _decoded_store(tmp_path_factory) -> Path:
    """One folder for the whole session; under pytest-xdist, one for all the workers (the folder above each
    worker's base temp is common to them; the cache writes each file atomically, so two workers decoding at
    once only cost time)."""
    if _WORKERS > 1:
        store = tmp_path_factory.getbasetemp().parent / "decoded-shared"
        store.mkdir(exist_ok=True)
        return store
    return tmp_path_factory.mktemp("decoded-shared")


@pytest.fixture
def shared_decoded_cache(_decoded_store) -> Path:
    """The test's cache folder ($MOELAB_CACHE_DIR, set per test above or by the test module) with its
    ``decoded/`` data-set entries shared by every test of the session that asks for this fixture: CIFAR-10 is
    decoded from its 60000 JPEGs (about 20 s of CPU) once per session instead of once per test. Everything
    else in the cache (experts, expert outputs, kernels, checksum memo) stays the test's own."""
    cache = Path(os.environ["MOELAB_CACHE_DIR"])
    cache.mkdir(parents=True, exist_ok=True)
    link = cache / "decoded"
    if not link.exists():
        link.symlink_to(_decoded_store, target_is_directory=True)
    return cache


@pytest.fixture(scope="session")
def cifar_source() -> Path:
    """The folder holding CIFAR-10 (MOELAB_DATA_DIR, else ../shared/datasets); skip when absent."""
    d = Path(os.environ.get("MOELAB_DATA_DIR", SHARED_DATA))
    if not (d / "cifar10-jpeg75.tar.gz").is_file() and not (d / "cifar10").is_dir():
        pytest.skip(f"CIFAR-10 not found in {d} (set MOELAB_DATA_DIR)")
    return d


@pytest.fixture
def cifar_dir(cifar_source, shared_decoded_cache) -> Path:
    """:func:`cifar_source`, its decoded arrays shared across tests (:func:`shared_decoded_cache`)."""
    return cifar_source

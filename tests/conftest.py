import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Never write into the user's home: every test gets its own cache folder."""
    monkeypatch.setenv("MOELAB_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture
def real_data_dir() -> Path:
    """The real data sets (MOELAB_DATA_DIR, else ../shared/datasets); skip when absent."""
    d = Path(os.environ.get("MOELAB_DATA_DIR", SHARED_DATA))
    if not (d / "mnist").is_dir():
        pytest.skip(f"real data sets not found at {d} (set MOELAB_DATA_DIR)")
    return d

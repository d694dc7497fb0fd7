"""Shared fixtures: the real data in ../shared/data when present, tiny settings for CPU tests."""
import os
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


@pytest.fixture
def shared_spider() -> Path:
    """The unpacked real Spider in ../shared/data, or skip."""
    path = SHARED_DATA / "spider_data"
    if not (path / "dev.json").exists():
        pytest.skip(f"real Spider not found at {path}")
    return path


@pytest.fixture
def shared_mmlu() -> Path:
    """The real MMLU CSVs in ../shared/data, or skip."""
    path = SHARED_DATA / "mmlu"
    if not (path / "test").is_dir():
        pytest.skip(f"real MMLU not found at {path}")
    return path

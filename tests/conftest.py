"""Shared fixtures: the real Spider and MMLU data when TEXT2SQL_DATA names them, tiny settings for CPU tests.

TEXT2SQL_DATA is a folder holding spider_data/ (unpacked Spider: dev.json, tables.json, database/...),
spider_data.zip and mmlu/ (the MMLU CSVs: dev/, test/, ...). Tests that need them skip when it is unset or the
files are missing.
"""
import os
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = Path(__file__).resolve().parent.parent
DATA_ENV = "TEXT2SQL_DATA"


def real_data(name: str, marker: str) -> Path:
    """$TEXT2SQL_DATA/name when it holds marker, or skip with a reason naming the variable."""
    root = os.environ.get(DATA_ENV)
    if not root:
        pytest.skip(f"{DATA_ENV} is not set (a folder holding spider_data/, spider_data.zip and mmlu/)")
    path = Path(root) / name
    if not (path / marker).exists():
        pytest.skip(f"{path / marker} not found ({DATA_ENV}={root})")
    return path


@pytest.fixture
def real_spider() -> Path:
    """The unpacked real Spider in $TEXT2SQL_DATA/spider_data, or skip."""
    return real_data("spider_data", "dev.json")


@pytest.fixture
def real_mmlu() -> Path:
    """The real MMLU CSVs in $TEXT2SQL_DATA/mmlu, or skip."""
    return real_data("mmlu", "test")

"""Shared fixtures. The suite needs ../shared beside the checkout and fails without it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
FIXTURES = SHARED / "fixtures"

if not FIXTURES.is_dir():
    raise pytest.UsageError(f"shared fixtures not found at {FIXTURES}: clone the project beside ../shared")

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    return SHARED


@pytest.fixture(scope="session")
def arena_dir() -> Path:
    return FIXTURES / "arena"


@pytest.fixture(scope="session")
def tokenizer_dir() -> Path:
    return FIXTURES / "gemma2-tokenizer"


@pytest.fixture(scope="session")
def repo_dir() -> Path:
    return REPO

# The throwaway Slurm cluster fixture (tests/slurm_cluster.py); tests/ is on sys.path under
# pytest's default import mode.
pytest_plugins = ["slurm_cluster"]


def pytest_collection_modifyitems(config, items):
    """Real-width tests first: their ranks need most of the 24 GB CI machine, and the pytest
    process grows as in-process tests load models."""
    items.sort(key=lambda item: 0 if item.get_closest_marker("realwidth") else 1)

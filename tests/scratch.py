"""Disk hygiene for module-scoped fixtures. A checkpoint of the test model is ~100 MB (its 256k x 32
embedding plus two Adam moments), so a suite that kept every run would leave ~20 GB behind per
session. pytest removes a passing test's tmp_path (tmp_path_retention_policy = "failed" in
pyproject.toml); module fixtures use module_dir, which does the same when their module ends."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest


def module_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, name: str) -> Path:
    """A fresh directory for the fixture `request` belongs to, removed at its teardown unless a test
    failed meanwhile (then it stays for the post-mortem, as pytest keeps a failed test's tmp_path)."""
    failed_before = request.session.testsfailed
    path = tmp_path_factory.mktemp(name)

    def remove() -> None:
        if request.session.testsfailed == failed_before:
            shutil.rmtree(path, ignore_errors=True)

    request.addfinalizer(remove)
    return path

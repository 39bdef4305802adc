"""Fixtures for the sparsity tests: the MiniLM subject (built like the other real subjects)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def minilm_l3_path() -> Path:
    from models import recipes

    try:
        return recipes.minilm_l3()
    except ModuleNotFoundError as exc:
        if os.environ.get("CI"):
            pytest.fail(str(exc))
        pytest.skip(str(exc))

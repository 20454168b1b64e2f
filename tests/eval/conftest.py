"""Evaluation fixtures: a tiny out-of-context set from real photos (tests/fixtures/ooc_sets.py)."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.fixtures.ooc_sets import build_tiny_ooc


@pytest.fixture(scope="session")
def tiny_ooc(tmp_path_factory, photos) -> Path:
    return build_tiny_ooc(tmp_path_factory.mktemp("ooc") / "tiny_ooc", photos)

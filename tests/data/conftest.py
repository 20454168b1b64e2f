"""Fixtures for the data tests: scikit-learn's real handwritten digits as an ImageFolder tree."""
from pathlib import Path

import pytest

from bitlab.data.datasets import write_digits


@pytest.fixture(scope="session")
def digits_root(tmp_path_factory) -> Path:
    """`<tmp>/digits/{train,val}/<digit>/*.png` (1,437 + 360 real 8x8 scans)."""
    return write_digits(tmp_path_factory.mktemp("datasets"))

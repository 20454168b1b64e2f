"""Fixtures for the training tests: small real datasets made from scikit-learn's digits."""
import shutil
from pathlib import Path

import pytest

from bitlab.data.datasets import write_digits


@pytest.fixture(scope="session")
def digits_root(tmp_path_factory) -> Path:
    """The built-in digits dataset (1,437 train + 360 val real 8x8 scans) as an ImageFolder tree."""
    return write_digits(tmp_path_factory.mktemp("datasets"))


@pytest.fixture(scope="session")
def tiny_digits(digits_root, tmp_path_factory) -> Path:
    """A few real digits per class (6 train, 3 val): fast runs that still exercise every path."""
    root = tmp_path_factory.mktemp("tiny") / "digits"
    for split, n in (("train", 6), ("val", 3)):
        for class_dir in sorted((digits_root / split).iterdir()):
            dest = root / split / class_dir.name
            dest.mkdir(parents=True)
            for f in sorted(class_dir.glob("*.png"))[:n]:
                shutil.copy(f, dest / f.name)
    return root


@pytest.fixture(autouse=True)
def one_torch_thread():
    """One intra-op thread per test process: `make test` runs 2 pytest workers on 2 cores, and
    oversubscribed OpenMP threads spin-wait (10x slower steps seen here); restored afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

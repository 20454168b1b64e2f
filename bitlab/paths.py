"""Where bitlab's data files are (class tables, background categories, the embedded offline sample),
where output goes when the user names no folder, and the cache (downloaded weights, built-in data).

The repository's top-level `ooc_dataset/` is the source of that data. A wheel ships it inside the
package as `bitlab/ooc_dataset/` (pyproject.toml maps that package onto the folder); run from a
source tree (an editable install, or the checkout on PYTHONPATH) bitlab reads the folder itself.
The location is resolved once, here; everything else imports it from this module.
"""
from __future__ import annotations

import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent


def _ooc_dataset_dir() -> Path:
    installed = PACKAGE_DIR / "ooc_dataset"
    return installed if installed.is_dir() else PACKAGE_DIR.parent / "ooc_dataset"


OOC_DATASET_DIR = _ooc_dataset_dir()
SAMPLE_DIR = OOC_DATASET_DIR / "sample"
# The checkout bitlab runs from; None when it is installed from a wheel (no checkout around it).
SOURCE_ROOT: Path | None = None if OOC_DATASET_DIR.parent == PACKAGE_DIR else PACKAGE_DIR.parent


def default_dir(name: str) -> Path:
    """An output folder the user did not name: inside the checkout when bitlab runs from one (its
    `figures/` and git-ignored `demo_out/`, which `make demo` and the notebooks fill), else in the
    working directory."""
    return (SOURCE_ROOT or Path.cwd()) / name


CACHE_ENV = "BITLAB_CACHE"


def cache_dir() -> Path:
    """bitlab's cache: `$BITLAB_CACHE`, else the platform's user cache folder (`~/.cache/bitlab` on
    Linux). Read at each call, so a process (or a test suite) can point it elsewhere."""
    if value := os.environ.get(CACHE_ENV):
        return Path(value).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("bitlab", appauthor=False))


def weights_dir() -> Path:
    """Where official BiT weights are cached (`<name>.npz` with its `.sha256` record)."""
    return cache_dir() / "weights"

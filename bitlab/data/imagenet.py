"""ILSVRC-2012 class wnids and names, in the standard 0..999 order (sorted wnids).

The lists ship inside timm (the files behind `timm.data.ImageNetInfo`), which bitlab already
depends on, so there is no second copy to keep in sync. They are read from timm's package folder
without importing timm: `import timm` costs 3-4 s (torchvision and all its models), which was
most of the start-up of `make-ooc` and of every notebook that only needed the class names.
tests/data/test_imagenet.py checks the result against `ImageNetInfo` itself.
"""
from __future__ import annotations

import csv
import importlib.util
from functools import lru_cache
from pathlib import Path

NUM_CLASSES = 1000
_SYNSETS, _LEMMAS = "imagenet_synsets.txt", "imagenet_synset_to_lemma.txt"  # as timm's ImageNetInfo reads them


def _info_file(name: str) -> str:
    spec = importlib.util.find_spec("timm")  # finds the package without running it
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("timm is not installed (bitlab reads ImageNet's class list from it)")
    return (Path(next(iter(spec.submodule_search_locations))) / "data" / "_info" / name).read_text(encoding="utf-8")


@lru_cache(maxsize=1)
def wnids() -> tuple[str, ...]:
    """The 1000 WordNet ids; `wnids()[i]` is class index i."""
    ids = tuple(_info_file(_SYNSETS).splitlines())
    if len(ids) != NUM_CLASSES:
        raise RuntimeError(f"timm's {_SYNSETS} lists {len(ids)} classes, not {NUM_CLASSES}")
    return ids


@lru_cache(maxsize=1)
def names() -> tuple[str, ...]:
    """Short human names (first lemma), e.g. 'tabby' for index 281."""
    return tuple(d.split(",")[0].strip() for d in descriptions())


@lru_cache(maxsize=1)
def descriptions() -> tuple[str, ...]:
    """All lemmas, e.g. 'tabby, tabby cat'."""
    lemmas = dict(csv.reader(_info_file(_LEMMAS).splitlines(), delimiter="\t"))
    return tuple(lemmas[w] for w in wnids())


@lru_cache(maxsize=1)
def index_of() -> dict[str, int]:
    """wnid -> class index."""
    return {w: i for i, w in enumerate(wnids())}

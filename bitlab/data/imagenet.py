"""ILSVRC-2012 class wnids and names, in the standard 0..999 order (sorted wnids).

The lists ship inside timm (`timm.data.ImageNetInfo`), which bitlab already depends on, so
there is no second copy to keep in sync.
"""
from __future__ import annotations

from functools import lru_cache

NUM_CLASSES = 1000


@lru_cache(maxsize=1)
def _info():
    from timm.data import ImageNetInfo

    return ImageNetInfo("imagenet-1k")


@lru_cache(maxsize=1)
def wnids() -> tuple[str, ...]:
    """The 1000 WordNet ids; `wnids()[i]` is class index i."""
    return tuple(_info().label_names())


@lru_cache(maxsize=1)
def names() -> tuple[str, ...]:
    """Short human names (first lemma), e.g. 'tabby' for index 281."""
    return tuple(d.split(",")[0].strip() for d in descriptions())


@lru_cache(maxsize=1)
def descriptions() -> tuple[str, ...]:
    """All lemmas, e.g. 'tabby, tabby cat'."""
    info = _info()
    return tuple(info.index_to_description(i) for i in range(NUM_CLASSES))


@lru_cache(maxsize=1)
def index_of() -> dict[str, int]:
    """wnid -> class index."""
    return {w: i for i, w in enumerate(wnids())}

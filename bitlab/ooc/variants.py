"""Controls for the out-of-context composites (`make-ooc --variants`), from the same selection and
geometry, so that every variant image pairs with composites image by image.

- `only_fg`: the object, at the same size and place, on flat grey `GREY` (one image per object and
  paste position: one per object when centred);
- `no_fg`: the background square alone, as the objects were pasted on it (one per background file);
- `mixed_rand`: for each composite, the object at the same size and place on a background file
  drawn at random (seeded by `--seed` and the pair) from another category that is not a usual
  context of its class (ImageNet-9's "mixed-rand" control, Xiao et al. 2020). Every selected
  background already carries every object, so its pixels are those of another composite; what it
  adds is the pairing: the same object on a random other background, beside each composite.

Each variant lives in `OUT/variants/<variant>/` with class folders (background category folders
for `no_fg`) and a `manifest.csv` of its own whose `variant` column names it, so `bitlab evaluate`
can score it alone (`--data OUT/variants/only_fg`) or with the composites it stands beside.
"""
from __future__ import annotations

import hashlib
from typing import Mapping, Sequence

import numpy as np

from bitlab.errors import BitlabError
from bitlab.ooc.spec import Background, Foreground

COMPOSITE = "composite"  # the `variant` of the composites themselves
VARIANTS = ("only_fg", "no_fg", "mixed_rand")
FOLDER = "variants"
# Mid-grey, not black (ImageNet-9's only-FG): BiT feeds x / 127.5 - 1, so 128 is its neutral input
# (0.004); timm's ImageNet models subtract mean (124, 116, 104) and divide by ~57, so 128 lies within
# half a standard deviation of the mean in every channel. Black is -2 std for them: a strong cue
# of its own ("night", "screen"), which is what the control must not add.
GREY = 128


def folder(variant: str) -> str:
    """Where a variant's images and manifest live, relative to the build's output folder."""
    return f"{FOLDER}/{variant}"


def check(variants: Sequence[str]) -> list[str]:
    """The requested variants in canonical order (so that dataset.json does not depend on how they
    were listed); an unknown or repeated name is an error."""
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise BitlabError(f"--variants: unknown variant {unknown[0]!r} (choose from {', '.join(VARIANTS)})")
    if len(set(variants)) != len(variants):
        raise BitlabError(f"--variants: a variant is listed twice: {' '.join(variants)}")
    return [v for v in VARIANTS if v in variants]


def grey_square(size: int) -> np.ndarray:
    """The only_fg canvas: `size` x `size` BGR uint8 of `GREY`."""
    return np.full((size, size, 3), GREY, np.uint8)


def mixed_partner(fg: Foreground, bg: Background, backgrounds: Sequence[Background],
                  usual_for: Mapping[str, set[str]], seed: int) -> Background:
    """The background mixed_rand shows `fg` on instead of `bg`: drawn uniformly (a hash of seed and
    the pair, so any subset of the build draws the same) among the backgrounds of the other
    categories that are no usual context of `fg`'s class; of any other category when none is left."""
    others = [b for b in backgrounds if b.category != bg.category]
    if not others:
        raise BitlabError("--variants mixed_rand needs backgrounds of at least two categories")
    unusual = [b for b in others if fg.folder not in usual_for.get(b.category, set())]
    pool = sorted(unusual or others, key=lambda b: (b.category, b.uid))
    digest = hashlib.sha256(f"{seed}:mixed_rand:{fg.uid}:{bg.uid}".encode()).digest()
    return pool[int.from_bytes(digest[:8], "big") % len(pool)]

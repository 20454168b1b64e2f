"""Which mistakes fit the background: what a model sees in each background alone.

The paper (appendix F) says ILSVRC-2012 models "predict objects absent from the image, but that
could plausibly appear with the background". bitlab measures "plausibly appears with the
background" without a hand-made co-occurrence table: a wrong top-1 on a composite *fits the
background* when the same model ranks it among its top-k on the bare background (the same square
crop make-ooc pasted the object on, without the object).

    squares = background_squares(ooc_dir, work / "backgrounds")   # one PNG per background
    top = background_topk(model, squares)                         # bg_uid -> top-k ILSVRC ids
    fits = fits_background(predictions, top)                      # per image: a fitting mistake
"""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
from torch import nn

from bitlab import io
from bitlab.errors import BitlabError
from bitlab.eval.predict import predict_files
from bitlab.ooc import compose

TOPK = 5  # "plausibly appears with the background": among the model's five best guesses for it alone


def background_squares(ooc: str | Path, out: str | Path, backgrounds: str | Path | None = None) -> dict[str, Path]:
    """Write each background of a make-ooc build as it was composited (largest top-left square at
    the build's size, `compose.prepare_background`) to `out/<bg_uid>.png`; returns bg_uid -> file.

    The backgrounds folder is the build's (`dataset.json`), or `backgrounds` when it moved."""
    ooc, out = Path(ooc), Path(out)
    try:
        config = json.loads((ooc / "dataset.json").read_text())["config"]
        root, size = Path(backgrounds or config["backgrounds"]), int(config["size"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise BitlabError(f"{ooc / 'dataset.json'}: not a make-ooc build ({e})") from None
    with (ooc / "manifest.csv").open(newline="", encoding="utf-8") as f:
        files = {r["bg_uid"]: r["bg_file"] for r in csv.DictReader(f)}
    squares = {}
    for uid, rel in sorted(files.items()):
        src = root / rel
        if not src.is_file():
            raise BitlabError(f"{src}: background {uid} of {ooc} not found "
                              "(pass the backgrounds folder it was built from)")
        squares[uid] = out / f"{uid}.png"
        io.write_bytes(squares[uid], compose.encode(compose.prepare_background(compose.decode(src), size)))
    return squares


def background_topk(model: nn.Module, squares: Mapping[str, Path], k: int = TOPK) -> dict[str, list[int]]:
    """The model's top-k ILSVRC-2012 classes on each bare background: bg_uid -> ids, best first."""
    uids = sorted(squares)
    pred = predict_files(model, [squares[u] for u in uids], topk=k, progress=False)
    return {u: [int(i) for i in ids] for u, ids in zip(uids, pred.indices)}


def fits_background(predictions: pd.DataFrame, topk: Mapping[str, Sequence[int]]) -> pd.Series:
    """Per image of a predictions table (`bitlab evaluate`): the top-1 is wrong and among the
    model's top-k on the image's bare background. False where the background is unknown."""
    top = predictions["bg_uid"].map(lambda uid: set(topk.get(uid, ())))
    inside = np.array([int(i) in t for i, t in zip(predictions["top1_id"], top)], dtype=bool)
    wrong = ~predictions["top1_correct"].to_numpy(bool)
    return pd.Series(wrong & inside, index=predictions.index, name="fits_background")

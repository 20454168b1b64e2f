"""What every notebook does before its work: parameters as papermill passes them, no progress bars.

- `setup`: called first in each notebook (before anything imports tqdm): turns progress bars off,
  since an executed notebook would save each bar's first frame ("make-ooc: 0%| 0/12") as its output;
- `parameter`: a list or dict parameter given on the command line (`papermill ... -p MODELS '[...]'`
  hands it over as text) as the value it spells, JSON or a Python literal.
"""
from __future__ import annotations

import ast
import json
import os
from typing import Any

from bitlab.errors import BitlabError


def setup() -> None:
    """No progress bars in this kernel, also where a library call has no switch for them (make-ooc).

    tqdm's plain bar reads `TQDM_DISABLE` when tqdm is first imported; its notebook bar (what
    `tqdm.auto` picks in a kernel) ignores it. So the plain bar, off, stands in for `tqdm.auto`'s:
    this must run before the first bitlab import that pulls tqdm in (the notebooks' setup cell)."""
    os.environ["TQDM_DISABLE"] = "1"
    import tqdm.auto
    import tqdm.std

    tqdm.auto.tqdm = tqdm.std.tqdm


def parameter(value: Any, name: str) -> Any:
    """`value` itself, or, when papermill passed it as text, the JSON or Python literal it spells
    (`'[{"model": "R50x1"}]'`, `"[1, 5]"`); text that spells neither is an error naming `name`."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except ValueError:
        pass
    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError):
        raise BitlabError(f"parameter {name}: {value!r} is neither JSON nor a Python literal") from None

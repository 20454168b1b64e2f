"""torchrun's environment and command line as the CLI needs them, before and after the process group (no
torch import)."""
from __future__ import annotations

import os
import sys
from typing import Sequence

from bitlab.errors import ConfigError


def under_torchrun() -> bool:
    """This process is a torchrun (torch.distributed.elastic) worker."""
    return "TORCHELASTIC_RUN_ID" in os.environ or "TORCHELASTIC_RESTART_COUNT" in os.environ


def env_rank() -> int:
    """This process's global rank (0 outside torchrun)."""
    return int(os.environ.get("RANK", "0") or 0)


def torchrun_command(argv: Sequence[str], nproc: int, *, max_restarts: int = 0,
                     python: str | None = None) -> list[str]:
    """The torchrun command line equivalent to `bitlab <argv>` with `--nproc`/`--max-restarts`
    removed: `python -m torch.distributed.run --standalone --nproc-per-node N -m bitlab ...`."""
    if nproc < 1:
        raise ConfigError("nproc", f"must be at least 1, got {nproc}")
    rest, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        name = arg.split("=", 1)[0]
        if name in ("--nproc", "--max-restarts"):
            skip = "=" not in arg
            continue
        rest.append(arg)
    return [python or sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            f"--max-restarts={max_restarts}", "-m", "bitlab", *rest]

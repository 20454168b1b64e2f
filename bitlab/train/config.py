"""Settings of the training commands as dataclasses (no torch import: the CLI builds its flags from them)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from bitlab.errors import BitlabError

PRECISIONS = ("fp32", "bf16", "fp16")


def require(cfg: Any, ok: bool, name: str, what: str) -> None:
    """Refuse `cfg.<name>` unless `ok`, naming it as its flag: "--base-lr must be ..., got -1"."""
    if not ok:
        raise BitlabError(f"--{name.replace('_', '-')} must be {what}, got {getattr(cfg, name)}")


def check_running(cfg: Any) -> None:
    """The loop's step counts as the flags of the same names (`cfg`: LoopConfig or a command's config)."""
    if cfg.log_every < 1:
        raise BitlabError(f"--log-every must be at least 1, got {cfg.log_every}")
    for flag, value in (("--checkpoint-every", cfg.checkpoint_every), ("--eval-every", cfg.eval_every)):
        if value < 0:
            raise BitlabError(f"{flag} must be 0 (only at the end) or a positive step count, got {value}")
    if cfg.stop_after is not None and cfg.stop_after < 1:
        raise BitlabError(f"--stop-after must be at least 1 step, got {cfg.stop_after}")


@dataclass
class LoopConfig:
    """How the engine runs (the command's own dataclass holds what to train)."""

    total_steps: int
    eval_every: int = 0  # 0: evaluate at the end only
    checkpoint_every: int = 100  # 0: at the end (and on signals) only
    log_every: int = 10
    precision: str = "fp32"  # fp32 | bf16 | fp16 (autocast; fp16 adds a gradient scaler)
    channels_last: bool = False
    compile: bool = False
    # stop with a checkpoint (as if interrupted) after this many steps of this call, counted from
    # the resumed step: the same --stop-after N advances any run by N steps (scripts training in chunks)
    stop_after: int | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise BitlabError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.total_steps <= 0:
            raise BitlabError(f"the schedule has no steps (total {self.total_steps})")
        check_running(self)

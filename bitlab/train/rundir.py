"""The run directory of a training command, apart from checkpoints (`checkpoint.py`): rank 0 writes.

- `config.json`: the command's settings dataclass (`write_config`; paths recorded absolute), which
  `--config` reads back to rerun the experiment;
- `plan.json`: what the command chose for this data (the task's plan);
- `metrics.jsonl` + `metrics.csv` (one row per log or eval event) and TensorBoard events under
  `tb/` when tensorboard is installed (`MetricsWriter`);
- `log.txt` and, when the run ends or dies, `summary.json` (`RunRecord`).

A rerun into the same folder must continue the same experiment: `check_resume_settings` refuses a
checkpoint written with other settings or for other data, naming each change.
"""
from __future__ import annotations

import contextlib
import csv
import io as _io
import json
import logging
import os
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from bitlab import io
from bitlab.errors import BitlabError
from bitlab.train.checkpoint import CHECKPOINT, saved_step
from bitlab.train.distributed import DistInfo

log = logging.getLogger(__name__)


def refuse_overwrite(run_dir: Path, how: str) -> None:
    raise BitlabError(f"{run_dir} already holds a training checkpoint; {how} to continue it or choose another --out")


def _resolved(value: Any) -> Any:
    """An existing path as an absolute one (the same data from another directory); else unchanged
    (builtin:digits, or a path that is gone and is compared as written)."""
    return str(Path(value).resolve()) if isinstance(value, str) and Path(value).exists() else value


def recorded_config(config: Any) -> dict:
    """The command's dataclass as config.json records it: the fields its class lists in
    `PATH_FIELDS` as absolute paths, so that a rerun from another directory compares equal."""
    out = asdict(config) if is_dataclass(config) else dict(config)
    for key in getattr(config, "PATH_FIELDS", ()):
        out[key] = _resolved(out.get(key))
    return out


def write_config(run_dir: str | Path, config: Any) -> Path:
    """The command's dataclass as `config.json` (atomic; see `recorded_config`)."""
    path = Path(run_dir) / "config.json"
    io.write_json(path, recorded_config(config))
    return path


def check_settings(run_dir: Path, config: Any, keys: Sequence[str], *, what: str = "a finished run",
                   action: str = "reuse this run") -> None:
    """Refuse `run_dir` when its config.json was written with other values of `keys` (`PATH_FIELDS`
    compared as resolved paths), naming each change; `what` and `action` word the error."""
    path = run_dir / "config.json"
    if not path.exists():
        raise BitlabError(f"{run_dir}: {what} without config.json (not a bitlab run?); use another --out")
    old, new = json.loads(path.read_text()), recorded_config(config)
    for key in getattr(config, "PATH_FIELDS", ()):  # older runs recorded paths as typed
        old[key] = _resolved(old.get(key))
    if changed := [k for k in keys if old.get(k) != new.get(k)]:
        diff = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed)
        raise BitlabError(f"{path}: cannot {action} with different settings ({diff}); "
                          "use the original settings or another --out")


def check_resume_settings(run_dir: Path, config: Any, keys: Sequence[str], *, resume: bool = True,
                          counts: dict[str, int] | None = None) -> dict | None:
    """The previous run's plan.json (`{}` if it has none) when `run_dir` holds a checkpoint to
    continue, None when there is none. Refuses a checkpoint without `resume` (saying how to resume
    by the config's `RESUME_HINT`: each command resumes by other flags), one written with
    other values of `keys` (what is trained; `PATH_FIELDS` compared as resolved paths), and one
    whose plan counted other `counts` (e.g. images added under the same --data folder: the
    schedule and data order would change under the checkpoint), naming each change."""
    if not (run_dir / CHECKPOINT).exists():
        return None
    if not resume:
        refuse_overwrite(run_dir, getattr(config, "RESUME_HINT", "pass resume=True"))
    check_settings(run_dir, config, keys, what="a checkpoint", action="resume this checkpoint")
    plan_path = run_dir / "plan.json"
    plan = json.loads(plan_path.read_text()) if plan_path.exists() else {}
    if changed := [k for k, v in (counts or {}).items() if k in plan and plan[k] != v]:
        what = ", ".join(f"{k}: {plan[k]} -> {counts[k]}" for k in changed)
        raise BitlabError(f"{plan_path}: the data changed since this checkpoint was written ({what}); its schedule "
                          "and data order no longer apply: restore the data or use another --out")
    return plan


# ----------------------------------------------------------------------------- metrics
class MetricsWriter:
    """`metrics.jsonl` (append) and `metrics.csv` (columns = union of keys; rewritten when a new
    key appears), plus TensorBoard scalars when `torch.utils.tensorboard` imports."""

    def __init__(self, run_dir: Path, tensorboard: bool = True) -> None:
        self.jsonl, self.csv = run_dir / "metrics.jsonl", run_dir / "metrics.csv"
        self.rows = read_metrics(self.jsonl)
        self.columns = _columns(self.rows)
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional
                pass
            else:
                self.tb = SummaryWriter(str(run_dir / "tb"))

    def truncate(self, after_step: int) -> None:
        """Drop rows logged after `after_step` (a resumed run redoes those steps)."""
        kept = [r for r in self.rows if r.get("step", 0) <= after_step]
        if len(kept) != len(self.rows):
            self.rows = kept
            io.write_text(self.jsonl, "".join(json.dumps(r) + "\n" for r in kept))
        self._rewrite_csv()

    def write(self, row: dict) -> None:
        self.rows.append(row)
        with open(self.jsonl, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        if set(row) - set(self.columns) or not self.csv.exists():
            self.columns = _columns(self.rows)
            self._rewrite_csv()
        else:
            with open(self.csv, "a", newline="", encoding="utf-8") as f:
                csv.DictWriter(f, self.columns).writerow(row)
        if self.tb is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(f"{row.get('split', 'train')}/{k}", v, row.get("step", 0))

    def _rewrite_csv(self) -> None:
        buf = _io.StringIO()
        writer = csv.DictWriter(buf, self.columns)
        writer.writeheader()
        writer.writerows(self.rows)
        io.write_text(self.csv, buf.getvalue())

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _columns(rows: list[dict]) -> list[str]:
    cols: list[str] = ["step", "split"]
    for r in rows:
        cols += [k for k in r if k not in cols]
    return cols


# ----------------------------------------------------------------------------- log.txt and summary.json
@contextlib.contextmanager
def log_to_file(path: Path, enabled: bool) -> Iterator[logging.Handler | None]:
    """Mirror the `bitlab` loggers into `log.txt` (appending, so resumed runs keep their history).
    Yields the handler; when one for this file is attached already (a `RunRecord` around the
    loop), that one, and nothing is added."""
    logger = logging.getLogger("bitlab")
    if not enabled:
        yield None
        return
    if same := [h for h in logger.handlers if isinstance(h, logging.FileHandler)
                and h.baseFilename == os.path.abspath(path)]:  # how FileHandler names its file
        yield same[0]
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    old_level = logger.level
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
        handler.close()


class RunRecord:
    """Around a whole command: `log.txt` from its first line (data loading, the plan), and when the
    run dies, the error in `log.txt` and in `summary.json` (`completed: false`, the error, the step
    `checkpoint.pt` holds). Rank 0 writes.

    `summary.json` is written only once `claim()` was called, i.e. once the command has checked the
    directory is its own to write (resume settings accepted): a refused rerun must not overwrite
    the summary of the run that is there. A command that fails before `claim()` (bad data, an
    unknown model, a refused resume) leaves nothing behind: its new `log.txt` and the folders it
    made are removed (the CLI prints the error); a log.txt or folder that was there stays."""

    def __init__(self, run_dir: str | Path, dist: DistInfo) -> None:
        self.run_dir, self.dist, self.claimed = Path(run_dir), dist, False
        self._stack = contextlib.ExitStack()
        self._handler: logging.Handler | None = None
        self._made: Path | None = None  # the topmost folder this command creates (None: run_dir exists)
        self._new_log = False

    def __enter__(self) -> "RunRecord":
        if self.dist.is_main:
            self._made = next((p for p in reversed([self.run_dir, *self.run_dir.parents])
                               if not p.exists()), None)
            self._new_log = not (self.run_dir / "log.txt").exists()
        self._handler = self._stack.enter_context(log_to_file(self.run_dir / "log.txt", self.dist.is_main))
        return self

    def claim(self) -> None:
        """From now on a failure is this run's: record it in summary.json."""
        self.claimed = True

    def __exit__(self, kind, error, tb) -> None:
        try:
            if error is not None and isinstance(error, (Exception, KeyboardInterrupt)) and self.dist.is_main:
                message = str(error) or type(error).__name__
                if self._handler is not None:  # to the file only: the CLI prints the error on stderr itself
                    self._handler.handle(log.makeRecord(log.name, logging.ERROR, __file__, 0,
                                                        "run stopped by an error: %s", (message,), None))
                if self.claimed:
                    ckpt = self.run_dir / CHECKPOINT
                    io.write_json(self.run_dir / "summary.json", {
                        "completed": False, "error": message, "error_type": type(error).__name__,
                        "checkpoint_step": saved_step(ckpt) if ckpt.exists() else None})
        finally:
            self._stack.close()
            if error is not None and not self.claimed and self.dist.is_main:
                self._remove_own_traces()

    def _remove_own_traces(self) -> None:
        """log.txt if this command made it, then the folders it made, innermost first, while empty."""
        if self._new_log:
            (self.run_dir / "log.txt").unlink(missing_ok=True)
        if self._made is None:
            return
        folder = self.run_dir
        while True:
            try:
                folder.rmdir()  # only an empty folder: never what someone else put there
            except OSError:
                return
            if folder == self._made:
                return
            folder = folder.parent

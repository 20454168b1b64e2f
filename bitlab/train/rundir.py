"""A training run's folder but its checkpoints (rank 0 writes): `config.json` (the settings, which
`--config` reads back), resume checks against it, `metrics.jsonl` / `metrics.csv` / TensorBoard
(`MetricsWriter`), `log.txt`, `summary.json` and the folder's lock (`RunRecord`). `plan.json` is
the task's."""
from __future__ import annotations

import contextlib
import csv
import io as _io
import json
import logging
import os
import sys
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from bitlab import fileio
from bitlab.errors import BitlabError, ConfigError
from bitlab.train.checkpoint import CHECKPOINT, FINAL, saved_step
from bitlab.train.distributed import DistInfo, main_rank_call

log = logging.getLogger(__name__)


def refuse_overwrite(run_dir: Path, how: str) -> None:
    raise ConfigError("out", f"{run_dir} already holds a training checkpoint; {how} to continue it or choose "
                              "another {setting}")


def _resolved(value: Any) -> Any:
    """An existing path made absolute (the same data from another directory); else unchanged."""
    return str(Path(value).resolve()) if isinstance(value, str) and Path(value).exists() else value


def recorded_config(config: Any) -> dict:
    """The dataclass as config.json records it: `PATH_FIELDS` absolute (a rerun from elsewhere matches)."""
    out = asdict(config) if is_dataclass(config) else dict(config)
    for key in getattr(config, "PATH_FIELDS", ()):
        out[key] = _resolved(out.get(key))
    return out


def write_config(run_dir: str | Path, config: Any) -> Path:
    """The command's dataclass as `config.json` (atomic; see `recorded_config`)."""
    path = Path(run_dir) / "config.json"
    fileio.write_json(path, recorded_config(config))
    return path


def check_settings(run_dir: Path, config: Any, keys: Sequence[str], *, what: str = "a finished run",
                   action: str = "reuse this run") -> None:
    """Refuse `run_dir` if its config.json has other values of `keys`, naming each (`what`, `action`: wording)."""
    path = run_dir / "config.json"
    if not path.exists():
        raise ConfigError("out", f"{run_dir}: {what} without config.json (not a bitlab run?); use another {{setting}}")
    old, new = json.loads(path.read_text()), recorded_config(config)
    for key in getattr(config, "PATH_FIELDS", ()):  # older runs recorded paths as typed
        old[key] = _resolved(old.get(key))
    if changed := [k for k in keys if old.get(k) != new.get(k)]:
        diff = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed)
        raise BitlabError(f"{path}: cannot {action} with different settings ({diff}); "
                          "use the original settings or another --out")


def check_resume_settings(run_dir: Path, config: Any, keys: Sequence[str], *, resume: bool = True,
                          counts: dict[str, int] | None = None) -> dict | None:
    """The previous run's plan.json (`{}` if none) when `run_dir` holds a checkpoint, else None.
    Refuses a checkpoint without `resume` (saying how by the config's `RESUME_HINT`), or written with
    other values of `keys`, or whose plan counted other `counts` (images added under the same data
    folder would change the schedule and data order under it), naming each change."""
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
    """`metrics.jsonl` (appended), `metrics.csv` (all keys' columns) and TensorBoard scalars if installed."""

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
            fileio.write_text(self.jsonl, "".join(json.dumps(r) + "\n" for r in kept))
        self._rewrite_csv()

    def write(self, row: dict) -> None:
        self.rows.append(row)
        fileio.append_text(self.jsonl, json.dumps(row) + "\n")  # a full disk: no torn line
        if set(row) - set(self.columns) or not self.csv.exists():
            self.columns = _columns(self.rows)
            self._rewrite_csv()
        else:
            line = _io.StringIO()
            csv.DictWriter(line, self.columns).writerow(row)
            fileio.append_text(self.csv, line.getvalue())
        if self.tb is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(f"{row.get('split', 'train')}/{k}", v, row.get("step", 0))

    def _rewrite_csv(self) -> None:
        write_csv(self.csv, self.columns, self.rows)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def write_csv(path: Path, columns: Sequence[str], rows: list[dict]) -> None:
    """`rows` as a CSV with a header (atomic)."""
    buf = _io.StringIO()
    writer = csv.DictWriter(buf, columns)
    writer.writeheader()
    writer.writerows(rows)
    fileio.write_text(path, buf.getvalue())


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
    with fileio.naming_full_disk(path):
        handler = _RunLog(path, encoding="utf-8")
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


class _RunLog(logging.FileHandler):
    """log.txt: once a write fails (a full disk), one warning on the other handlers and no more
    attempts, instead of logging's traceback on stderr for every record."""

    failed = False

    def emit(self, record: logging.LogRecord) -> None:
        if not self.failed:
            super().emit(record)

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 (logging's hook)
        self.failed = True
        error = sys.exc_info()[1]
        log.warning("%s", fileio.disk_full(self.baseFilename, error) or f"{self.baseFilename}: cannot write ({error})")


@contextlib.contextmanager
def lock_run_folder(run_dir: str | Path, dist: DistInfo, command: str) -> Iterator[None]:
    """Rank 0 holds `run_dir`'s lock (`fileio.lock_folder`); a folder in use stops every rank alike."""
    lock = fileio.lock_folder(run_dir, command)
    main_rank_call(lambda: lock.__enter__() and None, dist)  # runs on rank 0; its error reaches all
    try:
        yield
    finally:
        if dist.is_main:
            lock.__exit__(None, None, None)


class RunRecord:
    """Around a whole command: the folder's lock (one run writes it at a time: `fileio.lock_folder`),
    `log.txt` from its first line, and when the run dies, the error in `log.txt` and `summary.json`
    (`completed: false`, the step `checkpoint.pt` holds). Rank 0 writes.

    `summary.json` only once `claim()` was called (the folder checked to be this run's): a refused
    rerun must not overwrite the summary there. A command failing before `claim()` (bad data, an
    unknown model, a refused resume) leaves nothing behind: its new log.txt and folders go."""

    def __init__(self, run_dir: str | Path, dist: DistInfo, command: str = "train") -> None:
        self.run_dir, self.dist, self.command, self.claimed = Path(run_dir), dist, command, False
        self._stack = contextlib.ExitStack()
        self._handler: logging.Handler | None = None
        self._lock = lock_run_folder(self.run_dir, dist, command)
        self._new_log = False

    def __enter__(self) -> "RunRecord":
        self._lock.__enter__()
        try:
            self._new_log = self.dist.is_main and not (self.run_dir / "log.txt").exists()
            self._handler = self._stack.enter_context(log_to_file(self.run_dir / "log.txt", self.dist.is_main))
        except BaseException:
            self._lock.__exit__(None, None, None)
            raise
        return self

    def claim(self) -> None:
        """From now on a failure is this run's: record it in summary.json. What the folder recorded
        of an earlier run goes first (its summary.json, and final.pt when nothing resumes from a
        checkpoint), so that a kill from here on never leaves this run's config beside another's results."""
        self.claimed = True
        if not self.dist.is_main:
            return
        (self.run_dir / "summary.json").unlink(missing_ok=True)
        if (self.run_dir / FINAL).exists() and not (self.run_dir / CHECKPOINT).exists():
            log.warning("%s: starting afresh; removed the earlier run's %s", self.run_dir, FINAL)
            (self.run_dir / FINAL).unlink()

    def __exit__(self, kind, error, tb) -> None:
        try:
            if error is not None and isinstance(error, (Exception, KeyboardInterrupt)) and self.dist.is_main:
                self._record_error(error)
        finally:
            self._stack.close()
            if error is not None and not self.claimed and self._new_log:
                (self.run_dir / "log.txt").unlink(missing_ok=True)
            self._lock.__exit__(None, None, None)  # also removes the folders it made, if left empty

    def _record_error(self, error: BaseException) -> None:
        message = str(error) or type(error).__name__
        if self._handler is not None:  # to the file only: the CLI prints the error on stderr itself
            self._handler.handle(log.makeRecord(log.name, logging.ERROR, __file__, 0,
                                                "run stopped by an error: %s", (message,), None))
        if self.claimed:
            ckpt = self.run_dir / CHECKPOINT
            try:
                fileio.write_json(self.run_dir / "summary.json", {
                    "completed": False, "error": message, "error_type": type(error).__name__,
                    "checkpoint_step": saved_step(ckpt) if ckpt.exists() else None})
            except (BitlabError, OSError) as e:  # a full disk: the error itself still reaches the user
                log.warning("could not record the error in summary.json: %s", e)

"""benchmarks/gpu_check.sh cannot run without a GPU; every command in it must at least parse, so
that a session lent a GPU does not spend its minutes on a typo."""
from __future__ import annotations

import importlib.util
import re
import shlex
from pathlib import Path

from bitlab.cli import build_parser

REPO_ROOT = Path(__file__).resolve().parents[1]

SCRIPT = REPO_ROOT / "benchmarks" / "gpu_check.sh"


def _commands() -> list[list[str]]:
    text = SCRIPT.read_text().replace("\\\n", " ")
    text = re.sub(r'"\$\{OUT:-/tmp\}/([^"]*)"', r"/tmp/\1", text)  # the output folder -> a value
    out = []
    for line in text.splitlines():
        words = shlex.split(line, comments=True)
        if words[:1] == ["run"]:
            out.append(words[1:])
        elif words[:1] == ["log"]:
            out.append(words[2:])  # after the log file's name
    return out


def _benchmark_parser(path: str):
    spec = importlib.util.spec_from_file_location(f"gpu_check_{path.replace('/', '_')[:-3]}", REPO_ROOT / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.parser()


def test_every_command_parses(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO_ROOT / "benchmarks"))  # as when a script runs: its folder first
    commands = _commands()
    seen = set()
    for argv in commands:
        assert argv[0] == "$PY", argv
        if argv[1] == "-m":
            assert argv[2] == "bitlab", argv
            args = build_parser().parse_args(argv[3:])  # SystemExit on an unknown option or bad value
            assert args.device is None or args.device == "cuda"
            seen.add(f"bitlab {args.command}")
        else:
            args = _benchmark_parser(argv[1]).parse_args(argv[2:])
            seen.add(argv[1])
            if argv[1] == "benchmarks/models.py":  # bf16 autocast, or float32 inference as evaluate runs
                assert args.device == "cuda" and (args.amp == "bf16" or args.modes == ["inference"])
            else:
                assert args.part == "gpu"
    assert seen == {"benchmarks/models.py", "benchmarks/finetune.py", "benchmarks/pretrain.py", "bitlab finetune",
                    "bitlab pretrain"}


def test_runs_from_the_source_tree_and_keeps_going_after_a_failure():
    text = SCRIPT.read_text()
    assert 'export PYTHONPATH="$PWD' in text  # the GPU image cannot pip install bitlab
    assert "pip install" not in text
    assert text.rstrip().endswith("exit $FAILED")

"""The package's shape, as the architecture step (issue 16) set it: checks that fail when it erodes."""
from __future__ import annotations

import ast
from pathlib import Path

import bitlab

PACKAGE = Path(bitlab.__file__).parent
MAX_FUNCTION_LINES = 80  # a function longer than a screen hides its policies: split it into named pieces
MAX_TASK_LINES = 400  # a training task keeps only what differs from the shared engine


def _modules() -> dict[str, ast.Module]:
    return {p.relative_to(PACKAGE).as_posix(): ast.parse(p.read_text(encoding="utf-8"))
            for p in sorted(PACKAGE.rglob("*.py"))}


def test_no_function_is_longer_than_a_screen():
    long = [f"{path}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for path, tree in _modules().items() for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, long


def test_one_home_for_batches_collation_and_loaders():
    homes: dict[str, list[str]] = {"Batch": [], "collate": [], "make_loader": [], "default_workers": [],
                                   "Results": [], "load_results": [], "ImageSet": []}
    for path, tree in _modules().items():
        for node in tree.body:
            if isinstance(node, (ast.ClassDef, ast.FunctionDef)) and node.name in homes:
                homes[node.name].append(path)
    assert homes == {"Batch": ["data/loader.py"], "collate": ["data/loader.py"], "make_loader": ["data/loader.py"],
                     "default_workers": ["data/loader.py"], "Results": ["eval/results.py"],
                     "load_results": ["eval/results.py"], "ImageSet": ["data/datasets.py"]}


def test_training_tasks_keep_only_what_differs():
    for task in ("train/finetune.py", "train/pretrain.py"):
        lines = len((PACKAGE / task).read_text(encoding="utf-8").splitlines())
        assert lines < MAX_TASK_LINES, f"{task}: {lines} lines"


def test_no_module_shadows_the_standard_library():
    import sys

    shadowing = [p.name for p in PACKAGE.glob("*.py") if p.stem in sys.stdlib_module_names]
    assert not shadowing, shadowing


def test_eval_never_imports_the_figures():
    """Data flows one way: `eval` computes, `report` draws; a drawing module imported by eval would
    pull matplotlib into every evaluation and tie numbers to figures."""
    upward = [f"{path}:{node.lineno}" for path, tree in _modules().items() if path.startswith("eval/")
              for node in ast.walk(tree)
              if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("bitlab.report")
              or isinstance(node, ast.Import) and any(a.name.startswith("bitlab.report") for a in node.names)]
    assert not upward, upward

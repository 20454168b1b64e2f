"""The project's set-up files agree with each other."""
import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_environment_yml_installs_the_project_and_declares_no_other_deps():
    import yaml  # a timm dependency

    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    conda = [d for d in env["dependencies"] if isinstance(d, str)]
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    # conda provides only the interpreter and pip; pyproject.toml is the one list of dependencies
    assert sorted(re.split(r"[=<> ]", d)[0] for d in conda) == ["pip", "python"]
    assert pip == ["-e .[notebooks]"]
    project = _pyproject()["project"]
    python = next(d for d in conda if d.startswith("python"))
    version = tuple(map(int, re.search(r"(\d+)\.(\d+)", python).groups()))
    floor = tuple(map(int, re.search(r">=\s*(\d+)\.(\d+)", project["requires-python"]).groups()))
    assert version >= floor
    assert any(d.startswith("jupyterlab") for d in project["optional-dependencies"]["notebooks"])


def test_pinned_torch_pair():
    deps = _pyproject()["project"]["dependencies"]
    assert "torch==2.14.1" in deps and "torchvision==0.29.1" in deps  # 2.13 + timm/torchvision fails at import
    names = {re.split(r"[<>=!~\[; ]", d)[0].lower() for d in deps}
    assert {"timm", "numpy", "opencv-python-headless", "matplotlib", "seaborn", "pandas", "tqdm"} <= names


def test_installed_metadata_matches_pyproject():
    """The venv was installed from this pyproject.toml (the Makefile reinstalls when it changes)."""
    from importlib.metadata import requires

    from packaging.requirements import Requirement

    def norm(reqs):
        return {(r.name, str(r.specifier)) for r in map(Requirement, reqs) if r.marker is None}

    assert norm(requires("bitlab")) == norm(_pyproject()["project"]["dependencies"])


def test_ci_runs_make_test_and_nothing_else():
    script = (ROOT / ".ci" / "run").read_text()
    commands = [l for l in script.splitlines() if l.strip() and not l.startswith("#") and not l.startswith("set ")
                and not l.startswith("cd ")]
    assert commands == ["make test"]

"""The project's set-up files agree with each other, and the wheel they build runs the main job."""
import os
import re
import shutil
import site
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

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


# ----------------------------------------------------------------------------- the wheel
def test_setuptools_lists_every_subpackage_and_maps_the_data():
    """pyproject.toml lists the packages by hand (the data package lives outside bitlab/): a new
    subpackage missing from the list would be missing from the wheel."""
    tool = _pyproject()["tool"]["setuptools"]
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "bitlab").rglob("__init__.py")}
    assert sorted(tool["packages"]) == sorted(found | {"bitlab.ooc_dataset"})
    assert tool["package-dir"] == {"bitlab.ooc_dataset": "ooc_dataset"}


def _pip(*args: str, timeout: float = 300) -> None:
    subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", *args], check=True,
                   capture_output=True, text=True, timeout=timeout)


def _copy_source(dst: Path) -> Path:
    """What a build reads, copied: a build writes build/ and *.egg-info beside pyproject.toml, and a
    stale build/ in the checkout could hold files the source no longer has."""
    dst.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, dst / name)
    for name in ("bitlab", "ooc_dataset"):
        shutil.copytree(ROOT / name, dst / name, ignore=shutil.ignore_patterns("__pycache__"))
    return dst


def _venv(path: Path) -> Path:
    """A fresh venv that reuses this interpreter's installed dependencies (torch and the rest are
    not installed again): its site-packages get a .pth naming ours. Returns its python."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True, timeout=120)
    python = path / "bin" / "python"
    own = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         check=True, capture_output=True, text=True).stdout.strip()
    Path(own, "_bitlab_test_deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    return python


# Outside the checkout, with no source tree on the path: only the installed package can answer.
INSTALLED_ENV = {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """`pip wheel` of the source, offline, with the setuptools already installed."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = _copy_source(tmp / "src")
    _pip("wheel", str(src), "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", str(tmp / "dist"))
    return next((tmp / "dist").glob("bitlab-*.whl"))


def test_wheel_holds_every_data_file(wheel):
    """Class tables, background categories and whatever files the embedded sample holds ship inside
    the package; the top-level ooc_dataset/ stays their one copy in the repository."""
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
    data = {"bitlab/ooc_dataset/" + p.relative_to(ROOT / "ooc_dataset").as_posix()
            for p in (ROOT / "ooc_dataset").rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    assert {"bitlab/ooc_dataset/classes.csv", "bitlab/ooc_dataset/backgrounds.csv",
            "bitlab/ooc_dataset/sample/classes.csv", "bitlab/ooc_dataset/sample/selection.csv"} <= data
    assert data <= names, sorted(data - names)
    assert "bitlab/train/slurm_pretrain.sh" in names and "bitlab/paths.py" in names


@pytest.mark.slow
def test_installed_wheel_builds_the_demo_set_and_evaluates_it_outside_the_checkout(wheel, tmp_path):
    """The main job from a wheel: `bitlab make-ooc --demo` (the sample inside the package) and
    `bitlab evaluate` on its output, run from a folder outside the repository; the composites are
    the same bytes as the source tree's."""
    python = _venv(tmp_path / "venv")
    _pip("--python", str(python), "install", "--no-deps", "--no-index", "-q", str(wheel))
    work = tmp_path / "work"
    work.mkdir()

    def run(*args: str) -> str:
        done = subprocess.run(args, cwd=work, env=INSTALLED_ENV, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout

    sample, source = run(str(python), "-c", "import bitlab.paths as p; print(p.SAMPLE_DIR, p.SOURCE_ROOT)").split()
    assert Path(sample).is_relative_to(tmp_path / "venv") and source == "None"
    assert Path(sample).parts[-3:] == ("bitlab", "ooc_dataset", "sample")
    bitlab = str(tmp_path / "venv" / "bin" / "bitlab")
    assert "108 images (8 classes" in run(bitlab, "make-ooc", "--demo", "--out", "ooc")
    run(bitlab, "evaluate", "--model", "efficientnet_lite0.offline_in1k", "--data", "ooc", "--out", "results",
        "--workers", "0", "--no-progress")

    from bitlab.eval.results import load_results
    from bitlab.ooc.build import build_demo

    results = load_results(work / "results")
    with (work / "ooc" / "manifest.csv").open(encoding="utf-8") as f:
        listed = sum(1 for _ in f) - 1
    assert len(results.predictions) == results.summary["n"] == listed > 0 and results.role == "ooc"
    assert results.data_root == work / "ooc" and 0 < results.summary["top1"] < 1  # a real model, real images
    reference = build_demo(tmp_path / "source_ooc")  # this checkout's sample, built here
    made = sorted(p.relative_to(work / "ooc") for p in (work / "ooc").rglob("*.png"))  # composites and variants
    assert made == sorted(p.relative_to(reference) for p in reference.rglob("*.png"))
    assert sum(p.parts[0] != "variants" for p in made) == listed
    assert all((work / "ooc" / p).read_bytes() == (reference / p).read_bytes() for p in made)


@pytest.mark.slow
def test_editable_install_reads_the_checkouts_data(tmp_path):
    """`pip install -e` (what `make` does) maps bitlab onto the source tree: the data is the
    checkout's top-level ooc_dataset/, and default output folders are the checkout's."""
    src = _copy_source(tmp_path / "src")
    python = _venv(tmp_path / "venv")
    _pip("--python", str(python), "install", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-e", str(src))
    done = subprocess.run([str(python), "-c", "import bitlab.paths as p; print(p.SAMPLE_DIR, p.SOURCE_ROOT, "
                                              "p.default_dir('figures'))"],
                          cwd=tmp_path, env=INSTALLED_ENV, capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.split() == [str(src / "ooc_dataset" / "sample"), str(src), str(src / "figures")]

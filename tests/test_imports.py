"""The package's import contracts (.importlinter, checked by import-linter): layers storage <- pipeline <-
stages <- demo <- cli, captioning and matching independent above stages.common, no cycle at any depth.
Each contract is also shown to fail: a copy of the package gets one forbidden import at a time."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]  # the package `vlcache` is the repository root
LINT = Path(sys.executable).with_name("lint-imports")


def lint(package_parent: Path) -> subprocess.CompletedProcess:
    """lint-imports with the repository's contracts on the package `vlcache` found under ``package_parent``."""
    env = {"PYTHONPATH": str(package_parent), "PATH": "/usr/bin:/bin"}
    return subprocess.run([str(LINT), "--no-cache", str(ROOT / ".importlinter")], cwd=package_parent, env=env,
                          capture_output=True, text=True, timeout=120)


def _copy(src: Path, parent: Path) -> Path:
    """The package's modules under ``parent/vlcache`` (the checkout's folder may have any name)."""
    shutil.copytree(src, parent / "vlcache", ignore=shutil.ignore_patterns(
        ".git", ".venv", "tests", "examples", "docs", "bench", "__pycache__", "*.zarr", "runs", "demo", "*.png"))
    return parent


def test_the_package_keeps_every_import_contract(tmp_path):
    r = lint(_copy(ROOT, tmp_path))
    assert r.returncode == 0 and "3 kept, 0 broken" in r.stdout, r.stdout + r.stderr


@pytest.mark.parametrize("module, line, broken", [
    ("stages/common/vocab.py", "from ..match import data as _up",  # shared code importing a family
     "vlcache.stages.common is not allowed to import vlcache.stages.match"),
    ("stages/caption/sat.py", "from ..match import retrieval as _other",  # one family importing the other
     "vlcache.stages.caption is not allowed to import vlcache.stages.match"),
    ("storage/schema.py", "from ..pipeline import records as _up",  # a lower layer importing a higher one
     "vlcache.storage is not allowed to import vlcache.pipeline"),
    ("stages/match/data.py", "from . import train as _cycle",  # train -> data -> train
     "No cycles are allowed in vlcache.stages.match"),
])
def test_a_forbidden_import_breaks_its_contract(tmp_path, module, line, broken):
    parent = _copy(ROOT, tmp_path)
    path = parent / "vlcache" / module
    path.write_text(path.read_text() + f"\n{line}  # noqa\n")
    r = lint(parent)
    assert r.returncode != 0 and "0 broken" not in r.stdout, r.stdout
    assert broken in r.stdout.split("Broken contracts")[1], r.stdout


SHARED_TEST_DIRS = {"helpers", "fixtures", "__pycache__"}  # subprocess workers, checked-in stores and runs


def test_test_folders_mirror_the_packages_and_test_files_never_import_each_other():
    """tests/<name>/ holds the tests of the package <name> (storage/, pipeline/ or stages/<name>/), and a test
    file takes shared code from a helper module at the top of tests/, never from another test file."""
    tests = ROOT / "tests"
    for folder in (p for p in tests.iterdir() if p.is_dir() and p.name not in SHARED_TEST_DIRS):
        package = ROOT / folder.name if (ROOT / folder.name / "__init__.py").exists() else ROOT / "stages" / folder.name
        assert (package / "__init__.py").exists(), f"tests/{folder.name}/ mirrors no package"
        assert list(folder.glob("test_*.py")), f"tests/{folder.name}/ holds no tests"
    importing = [str(f.relative_to(tests)) for f in tests.rglob("test_*.py")
                 if any(line.startswith(("from test_", "import test_")) for line in f.read_text().splitlines())]
    assert not importing, f"test files importing another test file: {importing}"
    stage_packages = {p.name for p in (ROOT / "stages").iterdir() if (p / "__init__.py").exists()}
    assert stage_packages <= {p.name for p in tests.iterdir()}, "a stage package has no tests/<name>/ folder"

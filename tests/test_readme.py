"""The README's commands run as written (issue #13.1): every ```bash block not marked
``<!-- not run by tests: REASON -->`` runs, in order, in one fresh folder, with ``vlcache`` on PATH
meaning this checkout's CLI; then the ```python blocks run in that folder. Nothing is downloaded:
the blocks that run use random-init weights.
"""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
SKIP = re.compile(r"<!--\s*not run by tests:\s*(.+?)\s*-->")


def readme_blocks(text: str) -> list[tuple[str, str, str | None]]:
    """(language, code, skip reason or None) of every fenced block, in order."""
    blocks, lines, k = [], text.splitlines(), 0
    while k < len(lines):
        m = re.match(r"^```(\w*)\s*$", lines[k])
        if not m or not m.group(1):
            k += 1
            continue
        prev = next((ln for ln in reversed(lines[:k]) if ln.strip()), "")
        skip = SKIP.search(prev)
        end = next(j for j in range(k + 1, len(lines)) if lines[j].startswith("```"))
        blocks.append((m.group(1), "\n".join(lines[k + 1 : end]), skip.group(1) if skip else None))
        k = end + 1
    return blocks


def test_every_block_runs_or_says_why_not():
    blocks = readme_blocks(README.read_text())
    assert len(blocks) >= 5
    for lang, code, reason in blocks:
        assert lang in ("bash", "python") or reason, (lang, code[:80])
        assert reason is None or len(reason) > 10, reason  # a reason, not just a marker


@pytest.mark.timeout(1800)  # ~1 min on 2 idle cores; much more on a shared, loaded machine
def test_readme_commands_run_as_written(tmp_path):
    blocks = readme_blocks(README.read_text())
    bash = [code for lang, code, reason in blocks if lang == "bash" and reason is None]
    python = [code for lang, code, reason in blocks if lang == "python" and reason is None]
    assert bash and python
    shim = tmp_path / "bin" / "vlcache"
    shim.parent.mkdir()
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m vlcache "$@"\n')
    shim.chmod(shim.stat().st_mode | stat.S_IEXEC)
    work = tmp_path / "work"
    work.mkdir()
    env = {**os.environ, "PATH": f"{shim.parent}{os.pathsep}{os.environ['PATH']}", "OMP_NUM_THREADS": "2"}
    for code in bash:
        r = subprocess.run(["bash", "-euo", "pipefail", "-c", code], cwd=work, env=env, capture_output=True,
                           text=True, timeout=900)
        assert r.returncode == 0, f"README block failed:\n{code}\n--- stdout\n{r.stdout[-3000:]}\n--- stderr\n{r.stderr[-3000:]}"
    for code in python:
        r = subprocess.run([sys.executable, "-c", "import matplotlib; matplotlib.use('Agg')\n" + code], cwd=work,
                           env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, f"README block failed:\n{code}\n--- stderr\n{r.stderr[-3000:]}"
    # what the blocks say they make is there
    assert (work / "stores" / "synth.zarr").is_dir() and (work / "fig.png").stat().st_size > 0
    for run in ("sat-ica", "scan"):
        assert (work / "runs" / run / "report.md").is_file(), run

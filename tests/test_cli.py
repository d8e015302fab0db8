"""The command line as a user meets it: every expected failure is one line naming the input and the fix,
exit 1 (2 for usage), no traceback unless --debug, and cheap checks happen before torch is imported.

Each case runs the real CLI in a subprocess (``tests/helpers/cli_probe.py`` reports whether torch was
imported); the cases that need no torch take ~0.3 s each.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import make_tiny_store

from vlcache.pipeline.synth import generate

PROBE = Path(__file__).parent / "helpers" / "cli_probe.py"
HAS_NVIDIA_DRIVER = any(os.path.exists(p) for p in ("/dev/nvidiactl", "/dev/nvidia0", "/proc/driver/nvidia/version"))


def run_cli(*args, cwd=None, timeout=300, env=None):
    """(exit code, stdout, stderr without the probe's line, whether torch was imported)."""
    r = subprocess.run([sys.executable, str(PROBE), *map(str, args)], capture_output=True, text=True,
                       timeout=timeout, cwd=cwd, env={**os.environ, **(env or {})})
    lines = r.stderr.rstrip("\n").split("\n")
    assert lines[-1].startswith("torch imported: "), r.stderr
    return r.returncode, r.stdout, "\n".join(lines[:-1]), lines[-1] == "torch imported: True"


def assert_one_line_error(code, err, *needles, exit_code=1):
    assert code == exit_code, err
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, err)


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    generate(root, n_images=4, seed=0, size=(48, 48))
    return root


def test_cheap_input_errors_are_one_line_before_torch(synth, tmp_path):
    bad = tmp_path / "dataset_typo.json"
    bad.write_text('{"images": [ {"filename": "a.jpg",, } ]}')
    code, _, err, torch_ = run_cli("extract", "--dataset", bad, "--out", tmp_path / "s.zarr", "--weights", "none")
    assert_one_line_error(code, err, str(bad), "malformed JSON at line 1")
    assert not torch_ and not (tmp_path / "s.zarr").exists()

    # a config file that does not exist, a config key that does not exist
    code, _, err, torch_ = run_cli("extract", "--dataset", synth / "dataset_synth.json", "--out", tmp_path / "s.zarr",
                                   "--config", tmp_path / "nope.yaml")
    assert_one_line_error(code, err, "config file not found", "nope.yaml")
    assert not torch_
    code, _, err, torch_ = run_cli("extract", "--dataset", synth / "dataset_synth.json", "--out", tmp_path / "s.zarr",
                                   "--set", "detector.min_sise=400")
    assert_one_line_error(code, err, "unknown key(s) ['min_sise']")
    assert not torch_

    # --debug shows the traceback of the same error
    code, _, err, _ = run_cli("--debug", "extract", "--dataset", bad, "--out", tmp_path / "s.zarr")
    assert code == 1 and "Traceback" in err and err.rstrip().splitlines()[-1].startswith("error: ")


@pytest.mark.parametrize("argv", [
    ["train", "caption", "--store", "{store}", "--run", "{tmp}/run"],
    ["train", "match", "--store", "{store}", "--run", "{tmp}/run"],
    ["store", "text-cache", "--store", "{store}", "--out", "{tmp}/text.zarr"],
    ["demo", "--out", "{tmp}/demo"],
    ["extract", "--dataset", "{synth}/dataset_synth.json", "--out", "{tmp}/s.zarr", "--weights", "none"],
], ids=["train-caption", "train-match", "text-cache", "demo", "extract"])
def test_cuda_without_cuda_is_one_line_and_writes_nothing(argv, synth, tmp_path):
    device = "cuda:7"  # no machine here has 8 GPUs; without an NVIDIA driver even "cuda" fails the same way
    args = [a.format(store=tmp_path / "missing.zarr", tmp=tmp_path, synth=synth) for a in argv]
    code, _, err, torch_ = run_cli(*args, "--device", device)
    assert_one_line_error(code, err, f"--device {device}: CUDA is not available on this machine", "--device cpu")
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no run, store, cache or demo folder
    assert torch_ == HAS_NVIDIA_DRIVER  # the cheap check needs no torch where there is no driver
    code, _, err, _ = run_cli(*args, "--device", "gpu")
    assert code == 2 and "--device 'gpu': expected cpu, cuda, cuda:N or auto" in err


def _run_dir(path: Path, config: dict) -> Path:
    path.mkdir()
    (path / "config.yaml").write_text(yaml.safe_dump(config))
    return path


def test_evaluate_refuses_the_other_kind_of_run(tmp_path):
    # the config.yaml each trainer writes: a matching run names its model, a captioning run has model args
    match_run = _run_dir(tmp_path / "scan", {"model": "scan", "store": "s.zarr", "ccr": 1.0})
    caption_run = _run_dir(tmp_path / "sat", {"ica_weight": 0.1, "model": {"vocab_size": 30}, "store": "s.zarr"})
    code, _, err, torch_ = run_cli("evaluate", "caption", "--run", match_run)
    assert_one_line_error(code, err, f"{match_run} is a matching run (scan)",
                          f"vlcache evaluate match --run {match_run}")
    assert not torch_
    code, _, err, torch_ = run_cli("evaluate", "match", "--run", caption_run)
    assert_one_line_error(code, err, f"{caption_run} is a captioning run", "vlcache evaluate caption")
    code, _, err, torch_ = run_cli("evaluate", "caption", "--run", tmp_path / "nowhere")
    assert_one_line_error(code, err, "is not a run directory (no config.yaml)", "vlcache train caption")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sat", "scan"]


def test_inspect_tells_ids_from_row_numbers(tmp_path):
    url = str(tmp_path / "tiny.zarr")
    tiny = make_tiny_store(url, tmp_path / "images", n=6, block_size=3)
    ids = [str(i) for i in tiny.truth["images/id"]]
    assert "7" not in ids  # an id that looks like a row number but is neither
    code, _, err, torch_ = run_cli("inspect", url, "--image", "7", "--out", tmp_path / "f.png")
    assert_one_line_error(code, err, "has no image with id '7'", repr(ids[0]), "use --row (0..5)")
    code, _, err, _ = run_cli("inspect", url, "--row", "7", "--out", tmp_path / "f.png")
    assert_one_line_error(code, err, "--row 7:", "has 6 rows (0..5)")
    code, _, err, _ = run_cli("inspect", url, "--out", tmp_path / "f.png")
    assert code == 2 and "--image ID or as --row N" in err
    assert not (tmp_path / "f.png").exists() and not torch_
    code, out, err, _ = run_cli("inspect", url, "--image", ids[2], "--out", tmp_path / "f.png")
    assert code == 0 and (tmp_path / "f.png").stat().st_size > 0, err


def test_missing_weights_name_the_flag_of_the_model_that_needs_them(synth, tmp_path):
    # offline with an empty torch cache: the backbone's DEFAULT weights cannot be fetched (a proxy that
    # refuses connections stands in for no network); the error names --backbone-weights, not --weights
    offline = {"TORCH_HOME": str(tmp_path / "torch"), "https_proxy": "http://127.0.0.1:9",
               "HTTPS_PROXY": "http://127.0.0.1:9", "no_proxy": "", "NO_PROXY": ""}
    code, _, err, _ = run_cli("extract", "--dataset", synth / "dataset_synth.json", "--out", tmp_path / "s.zarr",
                              "--weights", "none", "--backbone-weights", "DEFAULT", "--set", "groups=[grid]",
                              env=offline)
    assert_one_line_error(code, err, "resnet101", "no internet: pass --backbone-weights PATH",
                          "or --weights none for random init of every model")
    assert not (tmp_path / "s.zarr").exists()

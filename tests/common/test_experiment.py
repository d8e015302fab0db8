"""Ablation tables: mean ± sample std, paired deltas, markdown; the generic train/eval driver.

The ICA experiment end to end is in tests/caption/test_evaluate.py (it shares that module's METEOR JVM)."""

import math

import pytest

from vlcache.stages.common.experiment import format_table, paired_deltas, run_ablation, summarize

ROWS = [
    {"variant": "base", "seed": 0, "run": "r0", "CIDEr": 1.0, "attn_f1": 0.2, "SPICE": None},
    {"variant": "base", "seed": 1, "run": "r1", "CIDEr": 2.0, "attn_f1": 0.4, "SPICE": None},
    {"variant": "base", "seed": 2, "run": "r2", "CIDEr": 3.0, "attn_f1": 0.3, "SPICE": None},
    {"variant": "ica", "seed": 0, "run": "r3", "CIDEr": 2.0, "attn_f1": 0.5, "SPICE": None},
    {"variant": "ica", "seed": 1, "run": "r4", "CIDEr": 4.0, "attn_f1": float("nan"), "SPICE": None},
    {"variant": "ica", "seed": 2, "run": "r5", "CIDEr": 6.0, "attn_f1": 0.7, "SPICE": None},
]


def test_summary_is_mean_and_sample_std():
    s = summarize(ROWS, ["CIDEr", "attn_f1", "SPICE"])
    assert list(s) == ["base", "ica"] and "SPICE" not in s["base"]  # no values: no column
    assert s["base"]["CIDEr"] == {"mean": 2.0, "std": 1.0, "n": 3}  # sample std: sqrt(2 / 2)
    assert s["ica"]["CIDEr"]["mean"] == 4.0 and s["ica"]["CIDEr"]["std"] == pytest.approx(2.0)
    assert s["base"]["attn_f1"]["std"] == pytest.approx(0.1)
    assert s["ica"]["attn_f1"] == {"mean": pytest.approx(0.6), "std": pytest.approx(math.sqrt(0.02)), "n": 2}  # NaN left out
    d = paired_deltas(ROWS, "base", ["CIDEr", "attn_f1"])
    assert d["ica"]["CIDEr"] == {"mean": 2.0, "std": 1.0, "n": 3}  # per-seed differences 1, 2, 3
    assert d["ica"]["attn_f1"]["n"] == 2 and d["ica"]["attn_f1"]["mean"] == pytest.approx(0.35)
    with pytest.raises(ValueError, match="baseline variant 'nope'"):
        paired_deltas(ROWS, "nope")


def test_format_table_markdown():
    table = format_table(ROWS, ["CIDEr", "attn_f1", "SPICE"], baseline="base", digits=2)
    lines = table.splitlines()
    assert lines[0] == "| Model | seeds | CIDEr | Attn F1 |" and lines[1] == "|---|---|---|---|"
    assert lines[2] == "| base | 3 | 2.00 ± 1.00 | 0.30 ± 0.10 |"
    assert lines[3] == "| ica | 3 | **4.00 ± 2.00** | **0.60 ± 0.14** |"
    assert lines[4] == "| Δ ica − base | 3 | +2.00 ± 1.00 | +0.35 ± 0.07 |"
    one = format_table([r for r in ROWS if r["seed"] == 0], ["CIDEr"])
    assert one.splitlines()[2:] == ["| base | 1 | 1.0000 |", "| ica | 1 | **2.0000** |"]  # one seed: no ±
    assert format_table(ROWS).splitlines()[0] == "| Model | seeds | CIDEr | Attn F1 |"  # numeric columns found


def test_run_ablation_trains_and_evaluates_each_variant_and_seed():
    calls = []

    def train_fn(name, overrides, seed):
        calls.append((name, overrides, seed))
        return f"runs/{name}-{seed}"

    def eval_fn(run):
        return {"CIDEr": len(run) / 10, "notes": ["text is dropped"], "SPICE": None}

    rows = run_ablation({"a": {"w": 0}, "b": {"w": 1}}, [7, 8], train_fn, eval_fn)
    assert calls == [("a", {"w": 0}, 7), ("a", {"w": 0}, 8), ("b", {"w": 1}, 7), ("b", {"w": 1}, 8)]
    assert rows[0] == {"variant": "a", "seed": 7, "run": "runs/a-7", "CIDEr": 0.8}
    with pytest.raises(ValueError, match="at least one variant"):
        run_ablation({}, [0], train_fn, eval_fn)

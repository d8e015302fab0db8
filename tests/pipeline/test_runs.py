"""Run directories on small data: strict-JSON scores, per-epoch losses, one epoch convention, TensorBoard
event files, and training on an incomplete store only when asked (issue 13, items 4, 9 and 12)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from synth_store import make_synth_store

from vlcache.pipeline.runs import RunDir, finite_json
from vlcache.stages.caption.evaluate import evaluate_caption
from vlcache.stages.caption.train import CaptionTrainConfig, train_caption
from vlcache.stages.common.experiment import score_cell
from vlcache.stages.match.evaluate import evaluate_match, write_report
from vlcache.stages.match.registry import match_model
from vlcache.stages.match.train import MatchTrainConfig, train_match
from vlcache.storage.writer import StoreWriter

torch.set_num_threads(2)
CAPTION = dict(embed_dim=16, attn_dim=16, hidden_dim=16, num_workers=0, device="cpu", beam_size=1, max_len=12,
               val_max_images=2, min_word_count=1)
MATCH = dict(embed=16, word_dim=16, d=16, heads=2, vocab_min_count=1, device="cpu", region_norm=True,
             val_max_images=4)


def _strict_json(path):
    def refuse(token):
        raise AssertionError(f"{path} holds a bare {token} (not JSON)")
    return json.loads(path.read_text(), parse_constant=refuse)


def _scalars(run_dir) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


@pytest.fixture(scope="module")
def synth():
    return make_synth_store()[0]


@pytest.fixture(scope="module")
def caption_run(synth, tmp_path_factory):
    """Two one-step epochs (batch larger than the train split), log_every far above the steps."""
    run = tmp_path_factory.mktemp("runs") / "cap"
    summary = train_caption(CaptionTrainConfig(store=synth, epochs=2, batch_images=64, log_every=20, ica_weight=0.1,
                                               **CAPTION), run, progress=False)
    return run, summary


@pytest.fixture(scope="module")
def scan_i2t_run(synth, tmp_path_factory):
    """SCAN i2t has no word->region attention: its attention scores are undefined (NaN before the fix)."""
    run = tmp_path_factory.mktemp("runs") / "scan"
    summary = train_match(MatchTrainConfig(model="scan", direction="i2t", store=synth, epochs=1, batch_size=64,
                                           log_every=20, **MATCH), run)
    return run, summary


def test_one_step_epochs_still_log_a_loss_curve(caption_run):
    run, summary = caption_run
    assert summary["steps"] == 2 and summary["epochs_completed"] == 2
    records = RunDir(run).metrics()
    assert not [r for r in records if "loss" in r]  # log_every=20 > 2 steps: no step records ...
    per_epoch = [r for r in records if "epoch_loss" in r]
    assert [(r["epoch"], r["step"], r["epoch_steps"]) for r in per_epoch] == [(0, 1, 1), (1, 2, 1)]
    assert all(np.isfinite(r["epoch_loss"]) and r["epoch_loss"] > 0 for r in per_epoch)
    # ... and loss.png draws them: the curve's colour (matplotlib C0) is on the canvas
    pixels = np.asarray(Image.open(run / "figures" / "loss.png").convert("RGB")).reshape(-1, 3).astype(int)
    assert (np.abs(pixels - [31, 119, 180]).sum(1) < 40).sum() > 20


def test_scores_json_writes_null_not_nan_and_says_why(scan_i2t_run):
    run, _ = scan_i2t_run
    scores = evaluate_match(run, "test", figures=0, device="cpu")
    for name in ("scores_test.json", "scores.json"):
        saved = _strict_json(run / "eval" / name)
        assert saved["attn_precision"] is None and saved["attn_f1"] is None and saved["attn_words"] == 0
        why = [n for n in saved["notes"] if n.startswith("null (")]
        assert len(why) == 1 and "attn_precision" in why[0] and "nothing to average" in why[0]
    assert scores["attn_precision"] is None  # what the CLI prints and the report shows agree with the file
    assert "null (" in (run / "report.md").read_text()
    # reports and ablation tables read null as n/a (SLAN's box scores are null when no word has a box)
    scores.update(box_inside_before=None, box_iou_before=None, box_inside_after=None, box_iou_after=None,
                  box_words=0, kept_regions=None, box_moved=None)
    write_report(RunDir(run), scores, RunDir(run).read_config(), [], match_model("slan"))  # SLAN's section
    assert "n/a% of the words' boxes moved" in (run / "report.md").read_text()
    assert score_cell(None) == score_cell(float("nan")) == "n/a" and score_cell(0.25) == "0.2500"


def test_captioning_and_matching_number_epochs_alike(caption_run, scan_i2t_run):
    cap_run, cap = caption_run
    scan_run, scan = scan_i2t_run
    assert scan["epochs_completed"] == 1 and "epochs_done" not in scan
    cap_val = [r["epoch"] for r in RunDir(cap_run).metrics() if "val_CIDEr" in r]
    scan_val = [r["epoch"] for r in RunDir(scan_run).metrics() if "val_rsum" in r]
    assert cap_val == [0, 1] and scan_val == [0]  # records: the 0-based epoch index, in both
    cap_scores = evaluate_caption(cap_run, "test", figures=0, device="cpu", max_images=2)
    scan_scores = evaluate_match(scan_run, "test", figures=0, device="cpu")
    best_cap = RunDir(cap_run).load_checkpoint("best")
    # checkpoints and reports: epochs completed ("after N epochs"), in both
    assert cap_scores["epoch"] == best_cap["epoch"] == cap["best_epoch"] + 1
    assert scan_scores["epoch"] == scan["best_epoch"] + 1 == 1
    assert f"after {cap_scores['epoch']} epoch" in (cap_run / "report.md").read_text()
    report = (scan_run / "report.md").read_text()
    assert "after 1 epoch," in report and "1 epochs" not in report
    n = scan_scores["n_images"]  # a small test split is not labelled as the Flickr 1K protocol
    assert f"| whole split, {n:,} images |" in report and "1K protocol" not in report


def test_tensorboard_scalars_and_figures(caption_run):
    run, _ = caption_run
    evaluate_caption(run, "test", figures=1, device="cpu", max_images=4)
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    acc = _scalars(run)
    tags = acc.Tags()
    assert {"epoch/loss", "epoch/xent", "val/CIDEr", "eval_test/CIDEr"} <= set(tags["scalars"])
    assert [e.step for e in acc.Scalars("epoch/loss")] == [0, 1]
    first = [r for r in RunDir(run).metrics() if "epoch_loss" in r][0]["epoch_loss"]
    assert acc.Scalars("epoch/loss")[0].value == pytest.approx(first, rel=1e-6)
    figs = [t for t in tags["images"] if t.startswith("figures/attention_test_row")]
    assert len(figs) == 1 and (run / "figures" / (figs[0].split("/", 1)[1] + ".png")).is_file()


def test_tensorboard_off_by_environment(synth, tmp_path, monkeypatch):
    monkeypatch.setenv("VLCACHE_TENSORBOARD", "0")
    train_match(MatchTrainConfig(model="scan", store=synth, epochs=1, batch_size=64, max_steps=1, **MATCH),
                tmp_path / "run")
    assert (tmp_path / "run" / "config.yaml").is_file() and not (tmp_path / "run" / "tensorboard").exists()


def test_finite_json_replaces_every_non_finite_number():
    data = {"a": float("nan"), "b": [1.0, float("inf"), {"c": np.float32("nan")}], "d": torch.tensor(float("-inf")),
            "e": 2, "f": "NaN", "g": None, "h": np.float64(0.5)}
    clean, nulls = finite_json(data)
    assert nulls == ["a", "b[1]", "b[2].c", "d"]
    assert clean == {"a": None, "b": [1.0, None, {"c": None}], "d": None, "e": 2, "f": "NaN", "g": None, "h": 0.5}
    json.dumps(clean, allow_nan=False)


def test_ablation_summary_with_one_seed_is_strict_json(tmp_path):
    """One seed has no standard deviation: ablation.json says null (and why), never a bare NaN."""
    from vlcache.pipeline.runs import write_strict_json
    from vlcache.stages.common.experiment import summarize

    rows = [{"variant": "base", "seed": 0, "CIDEr": 0.5}, {"variant": "+ICA", "seed": 0, "CIDEr": float("nan")}]
    result = {"rows": rows, "summary": summarize(rows, ["CIDEr"])}
    write_strict_json(tmp_path / "ablation.json", result)

    def refuse(constant):
        raise AssertionError(f"bare {constant} in ablation.json")

    saved = json.loads((tmp_path / "ablation.json").read_text(), parse_constant=refuse)
    assert saved["rows"][1]["CIDEr"] is None
    assert any("rows[1].CIDEr" in note for note in saved["notes"])


# ------------------------------------------------------------------------------------ partial stores
def _finish(ts):
    """Write the blocks a partial tiny store lacks (the same extraction continuing) and finalize it."""
    writer = StoreWriter(ts.url)
    done = np.asarray(writer.backend.read("images/done", slice(None))) != 0
    for b in range(ts.layout.num_blocks):
        rows = ts.layout.block_rows(b)
        if not done[rows.start]:
            writer.write_block(b, {p: ts.truth[p][rows.start:rows.stop] for p in ts.truth if p != "images/done"})
    assert writer.finalize()
    writer.close()


def test_incomplete_store_is_refused_unless_allowed_and_the_run_outlives_the_extraction(tiny_store_factory,
                                                                                      tmp_path):
    ts = tiny_store_factory("partial.zarr", n=20, block_size=8, blocks=[0], finalize=False)
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    cli = [sys.executable, "-m", "vlcache", "train", "caption", "--store", ts.url, "--run", str(run),
           "--set", "ica_weight=0", "--set", "min_word_count=1"]
    res = subprocess.run(cli, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 1, res.stderr
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "8 of 20 rows" in lines[0] and "--allow-partial" in lines[0] and ts.url in lines[0]
    assert not run.exists()  # refused before anything was written

    cfg = CaptionTrainConfig(store=ts.url, epochs=1, batch_images=4, ica_weight=0.0, allow_partial=True, **CAPTION)
    train_caption(cfg, run, progress=False)
    recorded = RunDir(run).read_config()["store_partial"]
    assert recorded["done_rows"] == 8 and recorded["total_rows"] == 20

    _finish(ts)  # the extraction finishes: the store's fingerprint changes
    scores = evaluate_caption(run, "test", figures=0, device="cpu")
    assert any("partial store: 8 of 20 rows" in n and "since extended" in n for n in scores["notes"])
    assert "partial store: 8 of 20 rows" in (run / "report.md").read_text()
    other = tiny_store_factory("other.zarr", n=20, block_size=8)  # same content, another store: refused
    with pytest.raises(ValueError, match="fingerprint"):
        evaluate_caption(run, "test", figures=0, device="cpu", store=other.url)

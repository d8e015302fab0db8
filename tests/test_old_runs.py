"""Run directories written by the code before the stage-two move (issue #16) still load and evaluate to
the same scores: tests/fixtures/old_runs (made by its make_old_runs.py at commit 000e42f) holds an
8-image store and a captioning, a SCAN and a SLAN run with the old code's evaluation scores."""

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from vlcache.stages.caption.evaluate import evaluate_caption, load_run_model
from vlcache.stages.match.evaluate import evaluate_match
from vlcache.stages.match.train import load_match_run

OLD = Path(__file__).parent / "fixtures" / "old_runs"
# Timing and where the store was: the only fields that may differ between the old and the new evaluation.
VOLATILE = {"seconds", "scoring_seconds", "pairs_per_second", "store", "decode_seconds", "score_seconds"}


@pytest.fixture(scope="module")
def old(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("old_runs")
    for name in ("store.zarr", "caption", "scan", "slan"):
        shutil.copytree(OLD / name, root / name)  # evaluation writes into the run; the fixture stays as made
    return root


def _without_paths(notes: list[str]) -> list[str]:
    """Notes name local paths (e.g. where SPICE's jars were looked for): another checkout has other ones."""
    return [re.sub(r"(/[^\s;:,]+)+", "<path>", n) for n in notes]


def _same_scores(new: dict, run: Path) -> None:
    saved = json.loads((OLD / run.name / "eval" / "scores_train.json").read_text())
    new = json.loads(json.dumps(new))  # NaN and tuples as the file holds them
    for scores in (new, saved):
        if "notes" in scores:
            scores["notes"] = _without_paths(scores["notes"])
    assert set(new) == set(saved)
    for key in sorted(set(saved) - VOLATILE):
        assert new[key] == pytest.approx(saved[key], rel=1e-5, abs=1e-6) if isinstance(saved[key], float) \
            else new[key] == saved[key], key


@pytest.mark.parametrize("name", ["scan", "slan"])
def test_old_matching_run_loads_with_the_same_state_dict_and_scores(old, name):
    net, _, ckpt, cfg = load_match_run(old / name, "best")  # strict load: every old key, no new one
    assert sorted(net.state_dict()) == sorted(ckpt["model"]) and cfg.model == name
    assert all(torch.equal(net.state_dict()[k], v) for k, v in ckpt["model"].items())
    scores = evaluate_match(old / name, "train", figures=0, device="cpu", store=str(old / "store.zarr"))
    _same_scores(scores, old / name)


def test_old_caption_run_loads_and_evaluates_to_the_same_captions_and_scores(old):
    model, _, ckpt, _ = load_run_model(old / "caption", "best")
    assert sorted(model.state_dict()) == sorted(ckpt["model"])
    scores = evaluate_caption(old / "caption", "train", figures=0, device="cpu", store=str(old / "store.zarr"))
    _same_scores(scores, old / "caption")
    captions = json.loads((old / "caption" / "eval" / "captions_train.json").read_text())
    assert captions == json.loads((OLD / "caption" / "eval" / "captions_train.json").read_text())

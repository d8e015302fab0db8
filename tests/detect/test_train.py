"""`vlcache train detector` / `evaluate detector` on a tiny synthetic set (ResNet-18, 64-px images).

Real parts throughout: torchvision Mask R-CNN (random init, narrowed FPN), real PNGs and COCO
instances written by the synthetic generator, pycocotools' COCOeval, a real store from `extract`.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from vlcache.pipeline.runs import RunDir
from vlcache.pipeline.synth import SYNTH_CLASSES, generate
from vlcache.stages.detect.train import DetectorTrainConfig, lr_at, train_detector

TINY = dict(backbone="resnet18", fpn_channels=32, min_size=64, max_size=64, batch_size=4, lr=0.01,
            warmup_iters=2, rpn_pre_nms_top_n_train=200, rpn_post_nms_top_n_train=100,
            rpn_batch_size_per_image=64, box_batch_size_per_image=64, num_workers=0, log_every=1,
            checkpoint_every=2, eval_every=0)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth_det")
    return generate(out, n_images=24, seed=1, size=(64, 64)), out / "instances.json"


def _cfg(synth, **kw) -> DetectorTrainConfig:
    return DetectorTrainConfig(dataset=str(synth[0]), instances=[str(synth[1])], **{**TINY, **kw})


@pytest.fixture(scope="module")
def trained(synth, tmp_path_factory):
    """8 steps through the real command line."""
    run = tmp_path_factory.mktemp("det_run") / "run"
    sets = [x for k, v in {**TINY, "max_iters": 8}.items() if k not in ("backbone", "batch_size")
            for x in ("--set", f"{k}={v}")]
    cmd = [sys.executable, "-m", "vlcache", "train", "detector", "--run", str(run), "--dataset", str(synth[0]),
           "--instances", str(synth[1]), "--backbone", "resnet18", "--batch-size", "4", "--epochs", "2", *sets]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return run, json.loads(r.stdout)


def _losses(run) -> list[float]:
    return [r["loss"] for r in RunDir(run).metrics() if "loss" in r]


def test_training_lowers_the_loss_and_writes_a_checkpoint_with_its_metadata(trained):
    run, summary = trained
    losses = _losses(run)
    assert summary["steps"] == 8 and len(losses) == 8
    assert np.mean(losses[-3:]) < 0.7 * np.mean(losses[:2]), losses
    ckpt = torch.load(run / "detector.pt", weights_only=True)
    assert ckpt["meta"]["backbone"] == "resnet18" and ckpt["meta"]["class_names"] == SYNTH_CLASSES
    assert ckpt["meta"]["num_classes"] == len(SYNTH_CLASSES) + 1
    assert (run / "loss.png").stat().st_size > 0 and (run / "config.yaml").is_file()


def test_extract_loads_the_trained_checkpoint_and_records_its_sha256(trained, synth, tmp_path):
    from vlcache import open as open_store
    from vlcache.stages.extract.detectors import sha256_file

    run, _ = trained
    out = tmp_path / "store.zarr"
    cmd = [sys.executable, "-m", "vlcache", "extract", "--dataset", str(synth[0]), "--instances", str(synth[1]),
           "--out", str(out), "--weights", str(run / "detector.pt"), "--backbone-weights", str(run / "detector.pt"),
           "--limit", "4", "--num-workers", "0", "--set", "detector.min_size=64", "--set", "detector.max_size=64",
           "--set", "features.input_size=64", "--set", "features.grid_size=2", "--set", "features.max_regions=4",
           "--set", "features.min_regions=2", "--set", "block_size=4", "--set", "features.region_min_size=64",
           "--set", "features.region_max_size=128"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    store = open_store(str(out))
    models, sha = store.attrs["models"], sha256_file(run / "detector.pt")
    # detector and feature trunk both come from the checkpoint, architecture from its metadata
    assert models["detector"]["weights_sha256"] == models["features"]["weights_sha256"] == sha
    assert models["detector"]["arch"] == "maskrcnn_resnet18_fpn32" and models["features"]["backbone"] == "resnet18"
    assert store.classes == SYNTH_CLASSES
    assert store.attrs["layout"]["capacities"]["region_dim"] == 512  # ResNet-18's C5 width


KILL_SCRIPT = """
import os, signal, sys, torch
torch.set_num_threads(int(sys.argv[3]))  # the parent's, so that both runs sum floats in the same order
from vlcache.stages.detect.train import DetectorTrainConfig, train_detector
cfg = DetectorTrainConfig(**{k: v for k, v in eval(sys.argv[2]).items()})
def die(step, losses):
    if step == 3:  # after the checkpoint at step 2 and step 3's log line: a real kill -9
        os.kill(os.getpid(), signal.SIGKILL)
train_detector(cfg, sys.argv[1], progress=False, on_step=die)
"""


def test_resume_after_kill_continues_from_the_last_checkpoint(synth, tmp_path):
    cfg = _cfg(synth, max_iters=5, epochs=3)
    script = tmp_path / "kill.py"
    script.write_text(KILL_SCRIPT)
    r = subprocess.run([sys.executable, str(script), str(tmp_path / "killed"), repr(cfg.__dict__),
                        str(torch.get_num_threads())],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    run = RunDir(tmp_path / "killed")
    assert run.load_checkpoint("last")["step"] == 2
    assert [x["step"] for x in run.metrics() if "loss" in x] == [1, 2, 3]
    resumed = train_detector(cfg, tmp_path / "killed", progress=False)
    assert resumed["steps"] == 5
    records = run.metrics()
    assert [x["step"] for x in records if x.get("event") == "resumed"] == [2]
    assert [x["step"] for x in records if "loss" in x] == [1, 2, 3, 4, 5]  # step 3 once, redone after resume
    train_detector(cfg, tmp_path / "straight", progress=False)
    a = torch.load(tmp_path / "killed" / "detector.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "straight" / "detector.pt", weights_only=True)["model"]
    worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    # the resumed run ends where an uninterrupted one does, up to float summation order (~1e-5 seen
    # between thread counts); a lost RNG state or a replayed batch moves weights by 1e-2 or more
    assert worst < 1e-3, worst
    assert _losses(tmp_path / "killed") == pytest.approx(_losses(tmp_path / "straight"), rel=1e-4)


def test_resume_with_another_config_is_refused(synth, trained):
    run, _ = trained
    with pytest.raises(ValueError, match="differs in \\['lr'\\]"):
        train_detector(_cfg(synth, max_iters=8, epochs=2, lr=0.5), run, progress=False)


def test_evaluate_detector_equals_cocoeval_on_the_same_predictions(trained, synth):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from vlcache.stages.detect.evaluate import STAT_NAMES, evaluate_detector

    run, _ = trained
    scores = evaluate_detector(run, score_threshold=0.0)
    dets = json.loads((run / "eval" / "detections_val.json").read_text())
    assert len(dets) == scores["detections"] > 0
    gt = COCO(str(synth[1]))
    names = {img["file_name"]: img["id"] for img in gt.dataset["images"]}
    val = [img for img in json.loads(Path(synth[0]).read_text())["images"] if img["split"] == "val"]
    ids = sorted(names[f"images/{img['filename']}"] if f"images/{img['filename']}" in names
                 else names[img["filename"]] for img in val)
    assert sorted({d["image_id"] for d in dets}) <= ids
    for iou_type in ("bbox", "segm"):
        ev = COCOeval(gt, gt.loadRes(dets), iou_type)
        ev.params.imgIds = ids
        ev.evaluate(), ev.accumulate(), ev.summarize()
        assert [scores[f"{iou_type}_{n}"] for n in STAT_NAMES] == pytest.approx(ev.stats.tolist(), abs=1e-12)


def test_coco_scores_on_jittered_ground_truth_equal_cocoeval(synth):
    """Non-trivial AP: predictions are the ground truth, jittered, with random scores."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from vlcache.stages.detect.evaluate import STAT_NAMES, coco_scores, load_gt

    gt = load_gt([synth[1]])
    rng = np.random.default_rng(0)
    dets = []
    for a in gt.dataset["annotations"]:
        x, y, w, h = a["bbox"]
        d = rng.normal(0, 2, 4)
        dets.append({"image_id": a["image_id"], "category_id": a["category_id"], "score": float(rng.random()),
                     "bbox": [x + d[0], y + d[1], w + d[2], h + d[3]], "segmentation": a["segmentation"]})
    ids = sorted(gt.getImgIds())[:10]
    ours = coco_scores(gt, dets, ids)
    ref = COCO(str(synth[1]))
    for iou_type in ("bbox", "segm"):
        ev = COCOeval(ref, ref.loadRes(dets), iou_type)
        ev.params.imgIds = ids
        ev.evaluate(), ev.accumulate(), ev.summarize()
        assert [ours[f"{iou_type}_{n}"] for n in STAT_NAMES] == pytest.approx(ev.stats.tolist(), abs=1e-12)
    assert 0.2 < ours["bbox_AP"] < 1.0 and ours["segm_AP"] > 0.9


def test_lr_schedule_warms_up_then_steps_down():
    cfg = DetectorTrainConfig(batch_size=4, warmup_iters=10, warmup_factor=0.001, lr_steps=[2, 3], lr_gamma=0.1)
    assert cfg.base_lr == pytest.approx(0.005)  # 0.02 x 4 / 16
    assert lr_at(cfg, 0, 0, 100) == pytest.approx(0.005 * 0.001)
    assert lr_at(cfg, 5, 0, 100) == pytest.approx(0.005 * (0.001 * 0.5 + 0.5))
    assert lr_at(cfg, 10, 0, 100) == lr_at(cfg, 0, 1, 100) == pytest.approx(0.005)
    assert lr_at(cfg, 0, 2, 100) == pytest.approx(0.0005) and lr_at(cfg, 0, 3, 100) == pytest.approx(0.00005)
    assert lr_at(cfg, 4, 0, 5) == pytest.approx(0.005)  # warm-up capped at iterations per epoch - 1


def test_fine_tuning_loads_a_detector_and_reinitialises_only_what_does_not_fit(trained, synth):
    from vlcache.stages.detect.train import build_for_training

    run, _ = trained
    saved = torch.load(run / "detector.pt", weights_only=True)["model"]
    cfg = _cfg(synth, weights=str(run / "detector.pt"))
    same, meta = build_for_training(cfg, SYNTH_CLASSES)
    assert meta["init"]["reinitialised"] == [] and meta["norm"] == "frozen"
    assert all(torch.equal(v, saved[k]) for k, v in same.state_dict().items() if k in saved)
    fewer, meta = build_for_training(cfg, SYNTH_CLASSES[:3])  # new classes: new class-specific predictors
    assert sorted(meta["init"]["reinitialised"]) == [
        "roi_heads.box_predictor.bbox_pred.bias", "roi_heads.box_predictor.bbox_pred.weight",
        "roi_heads.box_predictor.cls_score.bias", "roi_heads.box_predictor.cls_score.weight",
        "roi_heads.mask_predictor.mask_fcn_logits.bias", "roi_heads.mask_predictor.mask_fcn_logits.weight"]
    assert torch.equal(fewer.state_dict()["backbone.fpn.layer_blocks.0.0.weight"],
                       saved["backbone.fpn.layer_blocks.0.0.weight"])

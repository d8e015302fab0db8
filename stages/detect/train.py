"""``vlcache train detector``: torchvision's detection reference recipe for Mask R-CNN, resumable.

What follows torchvision's ``references/detection/train.py`` (METHODS section "Detector training"):
SGD (momentum 0.9, weight decay 1e-4) at lr = 0.02 x batch / 16 (their 0.02 for 8 GPUs x 2 images);
a linear warm-up from 0.001 x lr over the first min(1000, iterations per epoch - 1) iterations of epoch
0; the lr multiplied by 0.1 at each epoch in ``lr_steps`` (their 16, 22 of 26); horizontal flips with
p = 0.5; batches drawn from one aspect-ratio group (landscape / portrait) each; images without
training targets skipped; AMP on CUDA (``--amp``). Ours: checkpoints every ``checkpoint_every`` steps
as well as per epoch, and a resume continues at the same batch of the same epoch (batches and flips are
pure functions of seed, epoch and position), so a killed run ends where an uninterrupted one would.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ...pipeline.config import to_dict
from ...pipeline.runs import RunDir, plot_curves
from .data import (DetectionDataset, DetectorData, aspect_groups, collate, grouped_batches, raise_bad_samples,
                   with_targets)
from ..extract.maskrcnn import CHECKPOINT_FORMAT, DetectorCheckpointError, build_maskrcnn
from .config import DetectorTrainConfig

LOSS_KEYS = ("loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg")
# config keys that may change between a run and its resume (they do not change what is learned)
RUNTIME_KEYS = {"device", "num_workers", "max_iters", "log_every", "checkpoint_every", "eval_every",
                "eval_max_images"}


def lr_at(cfg: DetectorTrainConfig, step: int, epoch: int, iters_per_epoch: int) -> float:
    """The reference's schedule: linear warm-up in epoch 0, times ``lr_gamma`` per passed ``lr_steps``."""
    lr = cfg.base_lr * cfg.lr_gamma ** sum(epoch >= m for m in cfg.lr_steps)
    warmup = min(cfg.warmup_iters, iters_per_epoch - 1)
    if epoch == 0 and step < warmup:
        alpha = step / warmup
        lr *= cfg.warmup_factor * (1 - alpha) + alpha
    return lr


def flips(seed: int, p: float) -> Callable[[int, int], bool]:
    """Whether image ``index`` is flipped in ``epoch``: a pure function, so resumed runs flip the same."""
    return lambda index, epoch: bool(np.random.default_rng([seed, epoch, index, 7]).random() < p)


def build_for_training(cfg: DetectorTrainConfig, class_names: list[str]) -> tuple[torch.nn.Module, dict]:
    """The model and its checkpoint ``meta``, initialised as ``weights``/``backbone_weights`` ask."""
    from .weights import init_backbone, init_detector

    pretrained = cfg.weights != "none" or cfg.backbone_weights != "none"
    norm = "frozen" if pretrained else "batch"
    layers = cfg.trainable_layers if cfg.trainable_layers is not None else (3 if pretrained else 5)
    meta = {"format": CHECKPOINT_FORMAT, "backbone": cfg.backbone, "num_classes": len(class_names) + 1,
            "class_names": list(class_names), "norm": norm, "fpn_channels": cfg.fpn_channels,
            "min_size": cfg.min_size, "max_size": cfg.max_size, "init": {"weights": cfg.weights,
                                                                          "backbone_weights": cfg.backbone_weights}}
    model = build_maskrcnn(cfg.backbone, len(class_names) + 1, norm=norm, trainable_layers=layers,
                           fpn_channels=cfg.fpn_channels, min_size=cfg.min_size, max_size=cfg.max_size,
                           rpn_batch_size_per_image=cfg.rpn_batch_size_per_image,
                           box_batch_size_per_image=cfg.box_batch_size_per_image,
                           rpn_pre_nms_top_n_train=cfg.rpn_pre_nms_top_n_train,
                           rpn_post_nms_top_n_train=cfg.rpn_post_nms_top_n_train)
    if cfg.backbone_weights != "none":
        meta["init"]["backbone_sha256"] = init_backbone(model, cfg.backbone, cfg.backbone_weights)
    if cfg.weights != "none":
        meta["init"]["weights_sha256"], meta["init"]["reinitialised"] = init_detector(model, cfg, cfg.weights)
    return model, meta


def _check_resume(run: RunDir, cfg: DetectorTrainConfig) -> None:
    old = {k: v for k, v in run.read_config().items() if k not in RUNTIME_KEYS}
    new = {k: v for k, v in to_dict(cfg).items() if k not in RUNTIME_KEYS}
    diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if diff:
        raise ValueError(f"{run.path}: a run with another config exists (differs in {diff}); "
                         "use another --run directory")


def train_detector(cfg: DetectorTrainConfig, run_dir, progress: bool = True,
                   on_step: Callable[[int, dict], None] | None = None) -> dict:
    """Train (or resume) in ``run_dir``; returns a summary. ``on_step(step, losses)`` after every step."""
    from tqdm import tqdm

    from .evaluate import evaluate_model

    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {cfg.device}: CUDA is not available on this machine")
    data = DetectorData.load([Path(p) for p in cfg.instances], Path(cfg.dataset) if cfg.dataset else None,
                             Path(cfg.image_root) if cfg.image_root else None,
                             [Path(p) for p in cfg.val_instances],
                             Path(cfg.val_image_root) if cfg.val_image_root else None)
    train_records = with_targets(data.train)
    if not train_records:
        raise ValueError("no training image has a usable (non-crowd, non-empty) annotation")
    run = RunDir(run_dir)
    if run.exists():
        _check_resume(run, cfg)
    run.create()
    run.write_config(to_dict(cfg))
    device = torch.device(cfg.device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model, meta = build_for_training(cfg, data.classes)
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=cfg.base_lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    use_amp = cfg.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)

    groups = aspect_groups(train_records, data.train_root) if cfg.aspect_grouping else [0] * len(train_records)
    iters_per_epoch = len(grouped_batches(groups, cfg.batch_size, cfg.seed, 0))
    total = cfg.epochs * iters_per_epoch if cfg.max_iters is None else min(cfg.max_iters, cfg.epochs * iters_per_epoch)
    step, epoch, position = 0, 0, 0
    torch.manual_seed(cfg.seed)  # the RPN and RoI samplers draw from the global generator
    state = run.load_checkpoint("last")
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        step, epoch, position = state["step"], state["epoch"], state["position"]
        rng = state.get("rng", {})  # checkpoints of the first version lack it
        if "cpu" in rng:
            torch.set_rng_state(rng["cpu"])
        if device.type == "cuda" and "cuda" in rng:
            torch.cuda.set_rng_state(rng["cuda"], device)
        run.truncate_metrics(lambda r: r.get("step", 0) <= step)  # steps after it died with the process
        run.log(event="resumed", step=step, epoch=epoch)
    dataset = DetectionDataset(train_records, data.train_root, flip=flips(cfg.seed, cfg.hflip))

    def save(name: str = "last") -> None:
        rng = {"cpu": torch.get_rng_state()}
        if device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(device)
        run.save_checkpoint(name, {"model": model.state_dict(), "optimizer": opt.state_dict(),
                                   "scaler": scaler.state_dict(), "step": step, "epoch": epoch,
                                   "position": position, "rng": rng, "meta": meta})

    bar = tqdm(total=total, initial=step, disable=not progress, desc="train detector", dynamic_ncols=True)
    meter: dict[str, list[float]] = {}
    model.train()
    while step < total:
        batches = grouped_batches(groups, cfg.batch_size, cfg.seed, epoch)
        dataset.epoch = epoch
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches[position:], collate_fn=collate,
                                             num_workers=cfg.num_workers,
                                             # its own generator: a loader made at resume must not draw
                                             # from the global one the RoI samplers use
                                             generator=torch.Generator().manual_seed(cfg.seed + epoch))
        for images, targets in loader:
            raise_bad_samples(targets)
            lr = lr_at(cfg, position, epoch, iters_per_epoch)
            for g in opt.param_groups:
                g["lr"] = lr
            images = [im.to(device) for im in images]
            targets = [{k: v.to(device) for k, v in t.items() if k != "index"} for t in targets]
            with torch.autocast("cuda", dtype=torch.float16, enabled=use_amp):
                losses = model(images, targets)
            loss = sum(losses.values())
            values = {k: float(v.detach()) for k, v in losses.items()}
            if not math.isfinite(float(loss.detach())):
                raise FloatingPointError(f"step {step + 1} (epoch {epoch}): loss is {float(loss)} ({values}); "
                                         "lower --set lr=... or raise warmup_iters")
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            step, position = step + 1, position + 1
            values["loss"] = float(loss.detach())
            for k, v in values.items():
                meter.setdefault(k, []).append(v)
            bar.update(1)
            bar.set_postfix(loss=f"{values['loss']:.3f}", mask=f"{values['loss_mask']:.3f}", lr=f"{lr:.2g}")
            if step % cfg.log_every == 0 or step == total:
                run.log(step=step, epoch=epoch, lr=lr, **{k: float(np.mean(v)) for k, v in meter.items()})
                meter.clear()
            if position == len(batches):
                epoch, position = epoch + 1, 0
            if step % cfg.checkpoint_every == 0 or position == 0 or step == total:
                save()
            if position == 0:
                export(run, model, meta)  # every finished epoch leaves a usable detector
            if on_step is not None:
                on_step(step, values)
            if position == 0 and cfg.eval_every and epoch % cfg.eval_every == 0 and data.val and step < total:
                _validate(run, model, meta, data, cfg, step, epoch, evaluate_model)
                model.train()
            if step >= total:
                break
    bar.close()
    exported = export(run, model, meta)
    scores = _validate(run, model, meta, data, cfg, step, epoch, evaluate_model) if data.val else {}
    plot_curves(run.metrics(), ["loss", *LOSS_KEYS], run.path / "loss.png", title="Mask R-CNN training loss")
    return {"run": str(run.path), "steps": step, "epochs_completed": epoch, "checkpoint": str(exported),
            "train_images": len(train_records), "val_images": len(data.val), "val": scores}


def export(run: RunDir, model: torch.nn.Module, meta: dict) -> Path:
    """``RUN/detector.pt``: the weights and their metadata only, for ``vlcache extract --weights``."""
    import os

    path = run.path / "detector.pt"
    tmp = path.with_suffix(".pt.tmp")
    torch.save({"model": model.state_dict(), "meta": meta}, tmp)
    os.replace(tmp, path)
    return path


def _validate(run, model, meta, data, cfg, step, epoch, evaluate_model) -> dict:
    scores = evaluate_model(model, data.val, data.val_root, data.gt_files, torch.device(cfg.device),
                            max_images=cfg.eval_max_images, batch_size=cfg.batch_size)
    run.log(event="val", step=step, epoch=epoch, **scores)
    plot_curves(run.metrics(), ["bbox_AP", "segm_AP"], run.path / "val_ap.png", title="validation AP")
    return scores


__all__ = ["DetectorTrainConfig", "train_detector", "lr_at", "export", "DetectorCheckpointError"]

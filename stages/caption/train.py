"""Train Show-Attend-Tell (+ ICA loss) by streaming a store (METHODS.md sections 1-3).

``train_caption(cfg, run_dir)``: vocabulary from the train split (saved as ``vocab.json``), Adam, gradient
clipping, loss = cross-entropy + doubly stochastic attention + ``ica_weight`` * ICA (0 = the baseline), the
first two reduced as sgrvinod's PyTorch code does (``loss_recipe="xu-theano"``: as Xu et al.'s Theano code),
validation after every epoch (beam search, BLEU and CIDEr), early stopping on validation CIDEr,
checkpoints ``last`` (everything needed to resume, also mid-epoch) and ``best`` (best validation CIDEr).

Resuming: rerun with the same run directory. The ``last`` checkpoint holds model, optimizer, sampler
position, epoch, step, RNG states and the early-stopping state; metrics logged after it (by a process
that died) are dropped from metrics.jsonl. On CPU a resumed run gives the same weights as an
uninterrupted one: the data order is fixed by the sampler, the transform is deterministic, the
DataLoader has its own generator, and dropout's global RNG is restored.

Distributed: under torchrun every rank trains on its shard of the blocks (DDP); only rank 0 validates
and writes files; the early-stopping decision is broadcast. Logged losses are rank 0's.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from typing import Literal

import torch
from tqdm import tqdm

from ...pipeline.config import ConfigError, to_dict
from ...pipeline.runs import EpochLosses, RunDir, plot_curves, store_record
from ..common import distributed as D
from ..common.store_rows import split_rows, train_tokens
from ..common.vocab import Vocab
from .data import CaptionBatches, CaptionTransform, caption_loader, grid_feature_stats, store_info
from .evaluate import decode_split, quick_scores
from .losses import SAT_RECIPES, caption_xent, doubly_stochastic, ica_loss
from .sat import ShowAttendTell

__all__ = ["CaptionTrainConfig", "train_caption", "step_losses", "RESUMABLE_KEYS"]


@dataclass
class CaptionTrainConfig:
    store: str = ""  # store URL or path (required)
    image_root: str | None = None  # images for figures, when they are not where the store says
    epochs: int = 20
    batch_images: int = 16  # images per step; every caption of each is a sample (~5x samples)
    lr: float = 4e-4
    grad_clip: float = 5.0
    loss_recipe: str = "sgrvinod"  # sgrvinod | xu-theano: how CE and the doubly stochastic term are reduced (METHODS §1)
    alpha_c: float = 1.0  # doubly stochastic attention weight (1 in both recipes)
    ica_weight: float = 0.1  # lambda_aux of the ICA loss; 0 = Show-Attend-Tell baseline
    ica_score_threshold: float = 0.5  # instances below this detector score are left out of merged masks
    ica_cover_threshold: float = 0.5  # a grid cell is labelled when the merged mask covers this fraction
    min_word_count: int = 5
    max_len: int = 50
    embed_dim: int = 512
    attn_dim: int = 512
    hidden_dim: int = 512
    dropout: float = 0.5
    feat_norm: Literal["none", "standardize"] = "none"  # none | standardize: per-channel (a - mean) / std, statistics of the train split
    feat_stats_images: int = 2000  # train images the statistics are computed from (evenly spaced)
    beam_size: int = 3
    patience: int = 5  # epochs without a better val CIDEr before stopping; 0 = never stop early
    seed: int = 0
    num_workers: int = 2
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    window_blocks: int = 4
    checkpoint_every: int = 500  # steps between mid-epoch checkpoints; 0 = only at epoch ends
    val_max_images: int | None = None  # validate on the first N val images (None = all)
    log_every: int = 20
    max_steps: int | None = None  # stop (with a checkpoint) after this many steps in total
    allow_partial: bool = False  # train on the done rows of an incomplete store (the run records it)


# Keys that may change when a run is resumed; any other difference is an error.
RESUMABLE_KEYS = {"store", "image_root", "epochs", "patience", "num_workers", "device", "checkpoint_every",
                  "val_max_images", "log_every", "max_steps", "allow_partial"}


def _model_args(vocab: Vocab, feat_dim: int, cfg: CaptionTrainConfig) -> dict:
    return {"vocab_size": len(vocab), "feat_dim": feat_dim, "embed_dim": cfg.embed_dim, "attn_dim": cfg.attn_dim,
            "hidden_dim": cfg.hidden_dim, "dropout": cfg.dropout, "pad_id": vocab.pad_id,
            "start_id": vocab.start_id, "end_id": vocab.end_id, "feat_norm": cfg.feat_norm == "standardize"}


def _check_resume(run: RunDir, cfg: CaptionTrainConfig, fingerprint: str) -> None:
    old = run.read_config()
    if old.get("store_fingerprint") not in (None, fingerprint):
        raise ConfigError(f"run {run.path} was trained on store fingerprint {old['store_fingerprint']}, but "
                          f"{cfg.store} has {fingerprint}; use a new run directory")
    new = to_dict(cfg)
    diff = sorted(k for k in new if k not in RESUMABLE_KEYS and k in old and old[k] != new[k])
    if diff:
        raise ConfigError(f"run {run.path} exists with a different config for {diff} "
                          f"(old {[old[k] for k in diff]}, new {[new[k] for k in diff]}); use a new run directory "
                          f"or only change {sorted(RESUMABLE_KEYS)}")


def _load_vocab(run: RunDir, cfg: CaptionTrainConfig, main: bool) -> Vocab:
    path = run.path / "vocab.json"
    if path.is_file():
        return Vocab.from_dict(json.loads(path.read_text()))
    vocab = Vocab.build(train_tokens(cfg.store, split_rows(cfg.store, "train")), cfg.min_word_count, cfg.max_len)
    if main:  # every rank builds the same vocabulary from the same captions; one writes it
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(vocab.to_dict()))
        tmp.replace(path)
    return vocab


def _rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def step_losses(model, batch: dict, cfg: CaptionTrainConfig, device: torch.device) -> dict:
    """Loss terms of one batch: L = xent + doubly stochastic + ica_weight * ICA (sections 1-2), the first two
    reduced as ``cfg.loss_recipe`` says."""
    feats = batch["feats"].to(device, non_blocking=True)
    caps = batch["captions"].to(device, non_blocking=True)
    img = batch["img_index"].to(device, non_blocking=True)
    out = model(feats, caps, batch["lengths"].to(device, non_blocking=True), img_index=img)
    xent = caption_xent(out["logits"], caps[:, 1:], out["mask"], cfg.loss_recipe)
    ds = doubly_stochastic(out["alphas"], out["mask"], cfg.alpha_c, cfg.loss_recipe)
    terms = {"xent": xent, "ds": ds}
    loss = xent + ds
    if cfg.ica_weight > 0:
        sample, step = batch["ica_sample"].to(device), batch["ica_step"].to(device)
        energies = out["energies"][sample, step]  # pre-softmax scores of the steps predicting matched tokens
        terms["ica"] = ica_loss(energies, batch["ica_labels"].to(device, non_blocking=True))
        loss = loss + cfg.ica_weight * terms["ica"]
    terms["loss"] = loss
    return terms


class _Meter:
    """Running sums between two log lines."""

    def __init__(self):
        self.sums, self.n, self.samples, self.wait, self.total, self.pairs = {}, 0, 0, 0.0, 0.0, 0
        self.t0 = time.perf_counter()

    def add(self, terms: dict, samples: int, pairs: int, wait: float, total: float):
        for k, v in terms.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v)
        self.n += 1
        self.samples += samples
        self.pairs += pairs
        self.wait += wait
        self.total += total

    def record(self) -> dict:
        out = {k: v / max(self.n, 1) for k, v in self.sums.items()}
        out.update(samples_per_s=self.samples / max(self.total, 1e-9), data_wait=self.wait / max(self.total, 1e-9),
                   ica_pairs_per_step=self.pairs / max(self.n, 1))
        return out


def train_caption(cfg: CaptionTrainConfig, run_dir, resume: bool = True, progress: bool = True,
                  on_step=None) -> dict:
    """Train (or resume) a captioner on ``cfg.store`` into ``run_dir``; returns a summary dict.

    ``resume=False`` refuses a run directory that already has checkpoints. ``on_step(step, terms)`` is
    called after every optimiser step with the float loss terms (for notebooks and tests).
    """
    if not cfg.store:
        raise ConfigError("CaptionTrainConfig.store is required (the store to train on)")
    if cfg.loss_recipe not in SAT_RECIPES:
        raise ConfigError(f"loss_recipe must be one of {list(SAT_RECIPES)}, got {cfg.loss_recipe!r}")
    if cfg.feat_norm not in ("none", "standardize"):
        raise ConfigError(f"feat_norm must be 'none' or 'standardize', got {cfg.feat_norm!r}")
    if cfg.epochs < 1 or cfg.batch_images < 1:
        raise ConfigError(f"epochs and batch_images must be >= 1, got {cfg.epochs}, {cfg.batch_images}")
    device = D.resolve_device(cfg.device, int(os.environ.get("LOCAL_RANK", 0) or 0))
    dist = D.init_distributed(device)
    main = dist.is_main
    run = RunDir(run_dir)
    store_rec = store_record(cfg.store, cfg.allow_partial)  # refuses an incomplete store unless allowed
    fingerprint = store_rec["store_fingerprint"]
    info = store_info(cfg.store)
    if cfg.ica_weight > 0 and not info["has_ica"]:
        raise ConfigError(f"ica_weight={cfg.ica_weight} needs the store's instances and matches groups; {cfg.store} "
                          "has none (set ica_weight=0 for the baseline)")
    last = run.load_checkpoint("last") if run.checkpoints.is_dir() else None
    if last is not None and not resume:
        raise FileExistsError(f"run {run.path} already has checkpoints; resume it or choose a new directory")
    if run.exists():
        _check_resume(run, cfg, fingerprint)
    if main:
        split_rows(cfg.store, "val")  # validation needs a val split: checked before the run directory exists
        run.create()
    D.barrier()
    vocab = _load_vocab(run, cfg, main)
    torch.manual_seed(cfg.seed)
    model_args = _model_args(vocab, info["grid_dim"], cfg)
    model = ShowAttendTell(**model_args)
    if model.feat_norm and last is None:  # rank 0 reads the statistics once; a resumed run has them in "last"
        stats = grid_feature_stats(cfg.store, split_rows(cfg.store, "train"), cfg.feat_stats_images) if main else None
        model.set_feature_stats(*D.broadcast_object(stats))
    model = model.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    if main:
        run.write_config({**to_dict(cfg), **store_rec, "vocab_size": len(vocab),
                          "world_size": dist.world_size, "model": model_args})

    transform = CaptionTransform(vocab, info["grid_size"], ica=cfg.ica_weight > 0,
                                 score_threshold=cfg.ica_score_threshold, cover_threshold=cfg.ica_cover_threshold,
                                 mask_paste=info["mask_paste"], url=str(cfg.store))
    # The sampler's order depends on its lanes: a resumed run keeps the lanes it started with.
    lanes = int(last["lanes"]) if last is not None else max(1, cfg.num_workers)
    train_set = CaptionBatches(cfg.store, transform, split="train", cache_blocks=cfg.window_blocks)
    loader, sampler = caption_loader(train_set, cfg.batch_images, shuffle=True, seed=cfg.seed,
                                     window_blocks=cfg.window_blocks, rank=dist.rank, world_size=dist.world_size,
                                     num_workers=cfg.num_workers, lanes=lanes, pin_memory=device.type == "cuda")
    val_loader = None
    if main:
        val_rows = split_rows(cfg.store, "val")[: cfg.val_max_images]
        val_tf = CaptionTransform(vocab, info["grid_size"], url=str(cfg.store))
        val_loader, _ = caption_loader(CaptionBatches(cfg.store, val_tf, rows=val_rows), cfg.batch_images,
                                       shuffle=False, num_workers=min(cfg.num_workers, 1))

    epoch, step, start_batch = 0, 0, 0
    best = {"score": -math.inf, "epoch": -1, "bad_epochs": 0}
    stopped_early = False
    if last is not None:
        if int(last["world_size"]) != dist.world_size and int(last["sampler"]["position"]) > 0:
            raise ConfigError(f"run {run.path} stopped mid-epoch with {last['world_size']} rank(s); resume it with "
                              f"the same number (now {dist.world_size}), or from an epoch-end checkpoint")
        model.load_state_dict(last["model"])
        optimizer.load_state_dict(last["optimizer"])
        epoch, step, best = int(last["epoch"]), int(last["step"]), dict(last["best"])
        stopped_early = bool(last["stopped_early"])
        sampler.load_state_dict(last["sampler"])
        start_batch = int(last["sampler"]["position"]) // cfg.batch_images
        _set_rng_state(last["rng"], device)
        if main:  # records logged after the checkpoint by a process that died are dropped
            keep = iter(range(int(last["metric_records"])))
            run.truncate_metrics(lambda r: next(keep, None) is not None)
    elif main:  # no checkpoint: records of an attempt that died before its first checkpoint do not count
        run.truncate_metrics(lambda r: False)
    logged = len(run.metrics()) if main else 0

    def log(**record):
        nonlocal logged
        run.log(**record)
        logged += 1
    ddp_model = D.wrap_model(model, device)

    def save_last(position: int):
        if main:
            run.save_checkpoint("last", {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(), "model_args": model_args,
                "vocab": vocab.to_dict(), "sampler": sampler.state_dict(position=position), "epoch": epoch,
                "step": step, "rng": _rng_state(device), "best": best, "stopped_early": stopped_early,
                "metric_records": logged, "epoch_losses": epoch_losses.state(), "lanes": lanes, "world_size": dist.world_size, "config": to_dict(cfg), "store_fingerprint": fingerprint})

    steps_per_epoch = math.ceil(sampler.num_samples / cfg.batch_images)
    interrupted = False
    meter, epoch_losses = _Meter(), EpochLosses(last.get("epoch_losses") if last is not None else None)
    while epoch < cfg.epochs and not stopped_early and not (cfg.max_steps is not None and step >= cfg.max_steps):
        sampler.set_epoch(epoch)
        ddp_model.train()
        batches = start_batch
        bar = tqdm(total=steps_per_epoch, initial=batches, desc=f"epoch {epoch + 1}/{cfg.epochs}",
                   disable=not (progress and main), dynamic_ncols=True)
        it = iter(loader)
        while True:
            t0 = time.perf_counter()
            batch = next(it, None)
            if batch is None:
                break
            t_data = time.perf_counter() - t0
            terms = step_losses(ddp_model, batch, cfg, device)
            optimizer.zero_grad(set_to_none=True)
            terms["loss"].backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            step += 1
            batches += 1
            floats = {k: float(v.detach()) for k, v in terms.items()}
            n_pairs = int(batch["ica_sample"].numel()) if "ica_sample" in batch else 0
            meter.add(floats, int(batch["captions"].shape[0]), n_pairs, t_data, time.perf_counter() - t0)
            epoch_losses.add(floats)
            bar.update(1)
            if step % cfg.log_every == 0:
                rec = meter.record()
                bar.set_postfix(loss=f"{rec['loss']:.3f}", sps=f"{rec['samples_per_s']:.0f}",
                                wait=f"{100 * rec['data_wait']:.0f}%")
                if main:
                    log(step=step, epoch=epoch, lr=optimizer.param_groups[0]["lr"], **rec)
                meter = _Meter()
            if on_step is not None:
                on_step(step, floats)
            at_max = cfg.max_steps is not None and step >= cfg.max_steps
            if at_max or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0):
                save_last(batches * cfg.batch_images)
            if at_max:
                interrupted = True
                break
        bar.close()
        if interrupted:
            break
        start_batch = 0
        stop = False
        epoch_rec = epoch_losses.pop()
        if main:
            log(step=step, epoch=epoch, **epoch_rec)  # per epoch too: a 1-step epoch has a curve
            val = quick_scores(decode_split(model, val_loader, vocab, cfg.beam_size, cfg.max_len, device)[0])
            improved = val["CIDEr"] > best["score"]
            if improved:
                best = {"score": val["CIDEr"], "epoch": epoch, "bad_epochs": 0}
                run.save_checkpoint("best", {"model": model.state_dict(), "model_args": model_args,
                                             "vocab": vocab.to_dict(), "epoch": epoch + 1, "step": step,
                                             "score": val["CIDEr"], "val": val, "store_fingerprint": fingerprint})
            else:
                best["bad_epochs"] += 1
            stop = cfg.patience > 0 and best["bad_epochs"] >= cfg.patience
            log(step=step, epoch=epoch, best=improved, **{f"val_{k}": v for k, v in val.items()})
            _plot(run)
        stopped_early = bool(D.broadcast_object(stop))
        epoch += 1
        save_last(0)
    D.barrier()
    summary = {"run_dir": str(run.path), "steps": step, "epochs_completed": epoch, "best_val_cider": best["score"] if best["epoch"] >= 0 else None,
               "best_epoch": best["epoch"], "stopped_early": stopped_early, "interrupted": interrupted,
               "store_fingerprint": fingerprint, "world_size": dist.world_size}
    records = run.metrics() if main else []
    train_recs = [r for r in records if "samples_per_s" in r]
    if train_recs:
        summary["samples_per_s"] = sum(r["samples_per_s"] for r in train_recs) / len(train_recs)
        summary["data_wait_share"] = sum(r["data_wait"] for r in train_recs) / len(train_recs)
    if main:
        _plot(run)
        run.close()
    return summary


def _plot(run: RunDir) -> None:
    records = run.metrics()
    plot_curves(records, ["loss", "xent", "ds", "ica", "data_wait"],
                run.figures / "loss.png", title=run.path.name)
    plot_curves([r for r in records if "val_CIDEr" in r], ["val_CIDEr", "val_Bleu_4"], run.figures / "val.png",
                x="epoch", title=run.path.name)

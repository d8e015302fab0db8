"""Image-text matching training (SCAN, MMCA, SLAN) streamed from a store; METHODS §4, §6, §7, §9, §10.

The loop knows no model: each is a ``protocol.MatchModel`` found by name in ``registry`` (its own
module: ``scan``, ``mmca``, ``slan``), wrapped as ``model.MatchNet``; the losses (the model's own terms,
e.g. the hardest-negative triplet or SLAN's ITC + ITM + L_reg, plus the optional CCR/CCS/ICA attention
terms) are ``model.match_losses``; hooks after each step (SLAN's ITC queue update) are the model's.

Training: Adam, lr × ``lr_decay`` from epoch ``lr_decay_epoch`` (MMCA: 10 + 10 epochs), gradient
clipping, validation rsum after every epoch, the ``best`` checkpoint on validation rsum, ``last`` for
resume (mid-epoch too: sampler position, optimizer, RNG states; SLAN's ITC queue is a model buffer),
``metrics.jsonl`` and loss curves.

Under torchrun (``distributed``): DDP (told to look for unused parameters only when the model has some,
``MatchNet.has_unused_parameters``), each rank reads its own shard of every epoch (``drop_last``, so all
ranks take the same number of steps), SLAN's ITC queue receives every rank's pairs (``slan``).
Rank 0 alone writes the run (config with ``world_size``, metrics = rank 0's losses, checkpoints) and
validates; the others wait at the epoch's barrier. A run stopped mid-epoch resumes only with the same
number of ranks (the sampler position is per rank); at an epoch end any number will do.

(Just over 400 lines on purpose: the config every run records, its data setup and the one loop read
together; the models, their losses and the evaluation are in their own modules.)
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import nn

from ...pipeline.config import from_dict, to_dict
from ...pipeline.runs import EpochLosses, RunDir, plot_curves, store_record
from ...storage.backends import open_backend
from ..common.distributed import barrier, broadcast_object, init_distributed, is_main, resolve_device, wrap_model
from ..common.store_rows import split_rows, train_tokens
from ..common.text_encoders import encode_tokens, load_bert
from ..common.vocab import Vocab
from .data import CAPTION_MODES, MatchDataset, load_split, match_loader, resolve_positions
from .model import MatchNet, match_losses, model_args
from .protocol import MatchModel
from .registry import MATCH_MODELS, match_model
from .retrieval import recall_at_k
from .text_cache import check_text_cache

# The config's choice of model: whatever the registry holds (a Literal, so configs validate it like every choice).
MODEL_NAMES = tuple(MATCH_MODELS.names())
# Options that may change between a run and its resumption (how it runs, not what it computes). Not
# num_workers: it sets the sampler's lanes (one per worker), hence the order of the rows.
RUNTIME_KEYS = {"epochs", "device", "checkpoint_every", "log_every", "max_steps", "val_rerank_top", "val_max_images",
                "allow_partial"}


@dataclass
class MatchTrainConfig:
    """Everything a matching run computes with (saved as the run's config.yaml; see the module doc).

    Defaults follow METHODS §4/§6/§9: Adam 2e-4, ×0.1 from epoch 10 (MMCA: 10 + 10 epochs), margin 0.2,
    gradient clip 2, batch 64, d = 256 (MMCA, SLAN) / embed 1024 (SCAN); SLAN: 3 levels, r = (1, 0.5,
    0.25), threshold h = 0.5, ITC + ITM + L_reg with weight 1 each. CCR/CCS/ICA weights are 0 (off).
    """

    model: Literal[MODEL_NAMES] = "scan"  # a registered matching model (registry): mmca | scan | slan
    store: str = ""
    text_cache: str | None = None  # MMCA/SLAN: cached BERT outputs (`vlcache store text-cache`); None = BERT online
    bert: str | None = None  # MMCA/SLAN without cache: BERT name/path (None = bundled all-MiniLM-L6-v2)
    train_split: str = "train"
    val_split: str = "val"
    epochs: int = 20
    batch_size: int = 64
    lr: float = 2e-4
    lr_decay_epoch: int = 10
    lr_decay: float = 0.1
    grad_clip: float = 2.0  # 0 = off
    margin: float = 0.2
    region_norm: bool = False  # standardise region features with training-split statistics (MatchNet)
    # each: every caption once per epoch, shuffled at caption level (SCAN/VSE++) | one | all (data)
    captions: Literal["each", "one", "all"] = "each"
    same_image_negatives: bool = True  # SCAN/VSE++ code: another caption of the same image in the batch is a negative
    ccr: float = 0.0
    ccs: float = 0.0
    ica: float = 0.0
    gamma_r: float = 0.2
    gamma_s: float = 0.2
    ica_score_threshold: float = 0.5  # instances in a word's merged mask
    inside_threshold: float = 0.5  # region box fraction inside the mask to be a reference
    seed: int = 0
    device: str = "auto"
    num_workers: int = 0
    window_blocks: int = 4
    checkpoint_every: int = 0  # steps between mid-epoch checkpoints; 0 = at epoch ends only
    log_every: int = 10
    max_steps: int = 0  # stop after this many steps in total (checkpointed; resumable); 0 = no limit
    allow_partial: bool = False  # train on the done rows of an incomplete store (the run records it)
    val_rerank_top: int = 0  # MMCA validation by shortlist-and-rerank with this K; 0 = exact
    val_max_images: int = 1000  # validate on the split's first N images (SCAN/VSE++: 1000 = 5000 captions); 0 = all
    # SCAN
    embed: int = 1024
    word_dim: int = 300
    direction: Literal["t2i", "i2t"] = "t2i"
    agg: Literal["avg", "lse"] = "avg"
    lambda_softmax: float | None = None
    lambda_lse: float | None = None
    vocab_min_count: int = 5
    max_words: int = 50
    # MMCA
    d: int = 256
    heads: int = 16
    alpha: float = 0.2
    dropout: float = 0.1
    text_len: int = 32  # BERT truncation when encoding online
    # SLAN (also uses d, text_cache, bert, text_len; region_norm standardises its grid features)
    slan_levels: int = 3  # region adaptor levels L; 0 = frozen detector boxes
    slan_ratios: list[float] | None = None  # neighbourhood ratio per level; None = (1, 0.5, 0.25, ...)
    slan_k: int = 3  # K x K sub-regions (odd)
    slan_regions: int = 16  # T: at most this many regions kept by the filter
    slan_threshold: float | None = 0.5  # filter threshold h on max-normalised saliency; None = keep the top T
    slan_pool: int = 2  # RoIAlign output bins per side (averaged into one embedding)
    slan_samples: int = 2  # RoIAlign samples per bin side
    slan_box_grad: bool = True  # ITC/ITM gradients reach the boxes (differentiable pooling)
    slan_queue: int = 4096  # ITC queue length
    slan_tau: float = 0.07  # initial ITC temperature (learned)
    slan_offset_tau: float = 0.1  # initial temperature of Eq. 2's sub-region weights (learned)
    w_itc: float = 1.0
    w_itm: float = 1.0
    w_reg: float = 1.0
    # hyperparameters a model declares itself (MatchModel.defaults), so a new model adds no field here:
    # --set model_options.NAME=VALUE
    model_options: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        for name, allowed in (("model", tuple(MATCH_MODELS.names())), ("captions", CAPTION_MODES),
                              ("direction", ("t2i", "i2t")), ("agg", ("avg", "lse"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        match_model(self.model).check_config(self)
        match_model(self.model).options(self)  # unknown model_options are an error now, not mid-run

    @property
    def family(self) -> MatchModel:
        """The registered model this config trains (``protocol.MatchModel``)."""
        return match_model(self.model)


# ---------------------------------------------------------------------------------------- data setup
class TextEncoder:
    """Frozen BERT for MMCA/SLAN batches that have no cached outputs: adds ``words/word_mask/offsets``."""

    def __init__(self, bert, max_len: int, device):
        self.tokenizer, self.model = load_bert(bert, device=device)
        self.max_len, self.device = max_len, device

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    def __call__(self, batch: dict) -> dict:
        if "words" not in batch:
            h, m, o = encode_tokens(batch["texts"], self.tokenizer, self.model, self.max_len, self.device,
                                    out_device="cpu")
            batch.update(words=h, word_mask=m, offsets=o)
            resolve_positions(batch, "bert")  # BERT pieces
        return batch


def region_stats(store: str, rows: np.ndarray, max_rows: int = 2048,
                 path: str = "regions/feats") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension mean and std of the valid region features (``path="grid/feats"``: of every grid
    cell) of (up to ``max_rows`` evenly spaced) rows."""
    rows = rows[np.linspace(0, len(rows) - 1, min(len(rows), max_rows)).round().astype(int)]
    s1 = s2 = None
    n = 0
    with open_backend(store, "r") as be:
        for s in range(0, len(rows), 256):
            part = rows[s:s + 256]
            feats = torch.from_numpy(np.asarray(be.read(path, part))).double()
            count = (torch.from_numpy(np.asarray(be.read("regions/count", part))) if path == "regions/feats"
                     else torch.full((len(part),), feats.shape[1]))
            valid = torch.arange(feats.shape[1])[None] < count[:, None]
            f = feats[valid]
            s1 = f.sum(0) if s1 is None else s1 + f.sum(0)
            s2 = f.pow(2).sum(0) if s2 is None else s2 + f.pow(2).sum(0)
            n += f.shape[0]
    if n == 0:
        raise ValueError(f"store {store}: no {path} rows to compute feature statistics from")
    mean = s1 / n
    std = (s2 / n - mean.pow(2)).clamp_min(0).sqrt()
    return mean.float(), std.clamp_min(1e-3 * float(std.max()) + 1e-12).float()  # constant dims: no blow-up


def to_device(batch: dict, device) -> dict:
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


def build_vocab(cfg: MatchTrainConfig) -> Vocab:
    return Vocab.build(train_tokens(cfg.store, split_rows(cfg.store, cfg.train_split)), cfg.vocab_min_count,
                       cfg.max_words)


def make_dataset(cfg: MatchTrainConfig, split: str, vocab: Vocab | None, captions: str, labels: bool,
                 max_images: int = 0, store: str | None = None) -> MatchDataset:
    """The split's good rows (the first ``max_images`` when > 0) as a :class:`MatchDataset`."""
    store = store or cfg.store
    rows = split_rows(store, split)
    rows = rows[:max_images] if max_images > 0 else rows
    return MatchDataset(store, text=cfg.family.text, visual=cfg.family.visual, text_cache=cfg.text_cache, vocab=vocab, rows=rows,
                        captions=captions, seed=cfg.seed, labels=labels, score_threshold=cfg.ica_score_threshold,
                        inside_threshold=cfg.inside_threshold, cache_blocks=cfg.window_blocks)


def visual_dim(cfg: MatchTrainConfig) -> int:
    """Width of the features the model reads: region features, or (SLAN) grid features."""
    with open_backend(cfg.store, "r") as be:
        layout = be.layout
    if cfg.family.visual == "grid":
        if "grid" not in layout.groups:
            raise ValueError(f"store {cfg.store} has no 'grid' group: {cfg.model.upper()} pools its regions from the "
                             "grid feature map (extract with groups including grid, features.grid_size >= 7)")
        return layout.capacities.grid_dim
    return layout.capacities.region_dim


def text_dim(cfg: MatchTrainConfig, encoder: TextEncoder | None) -> int:
    if cfg.text_cache:
        return int(check_text_cache(cfg.text_cache, cfg.store)["text_encoder"]["hidden_size"])
    return encoder.dim


# ---------------------------------------------------------------------------------------- scoring
@torch.no_grad()
def similarity(net: MatchNet, data: dict, device, rerank_top: int = 0, block: int = 1024) -> dict:
    """Scores of every (image, caption) pair of a split batch (``load_split``) in eval mode.

    Returns ``sim (n_img, n_txt)`` (CPU) and, for MMCA with ``rerank_top``, ``sim_t2i`` and ``n_pairs``
    (shortlist-and-rerank, METHODS §4); MMCA without it scores every pair exactly.
    """
    was = net.training
    net.eval()
    try:
        return net.family.similarity(net, data, device, rerank_top, block)
    finally:
        net.train(was)


def retrieval_metrics(net: MatchNet, data: dict, device, rerank_top: int = 0) -> dict:
    s = similarity(net, data, device, rerank_top)
    return recall_at_k(s["sim"], data["txt_img"], sim_t2i=s.get("sim_t2i"))


# ---------------------------------------------------------------------------------------- training
def _lr(cfg: MatchTrainConfig, epoch: int) -> float:
    return cfg.lr * (cfg.lr_decay if epoch >= cfg.lr_decay_epoch else 1.0)


def _check_resume(run: RunDir, cfg: MatchTrainConfig) -> None:
    saved = run.read_config()
    diff = [k for k, v in to_dict(cfg).items() if k not in RUNTIME_KEYS and saved.get(k) != v]
    if diff:
        raise ValueError(f"run {run.path} was started with a different config ({', '.join(diff)}: "
                         f"{[(saved.get(k), getattr(cfg, k)) for k in diff]}); use a new run directory")


def train_match(cfg: MatchTrainConfig, run_dir, resume: bool = True,
                on_step: Callable[[int, dict, MatchNet], None] | None = None) -> dict:
    """Train (or resume) a matching model into ``run_dir``; returns a summary dict (module doc).
    ``on_step(step, losses, net)`` is called on every rank after each optimizer step (and SLAN's queue
    update) with this rank's float loss terms and its model, unwrapped (for notebooks and tests; the
    metrics file holds rank 0's losses only)."""
    if not cfg.store:
        raise ValueError("MatchTrainConfig.store is empty: give the store URL to train on")
    run = RunDir(run_dir)
    store_rec = store_record(cfg.store, cfg.allow_partial)  # refuses an incomplete store unless allowed
    info = init_distributed(resolve_device(cfg.device))
    device = resolve_device(cfg.device, info.local_rank)
    existed = broadcast_object(run.exists())  # rank 0's view, before anything is written
    if existed and not resume:
        raise FileExistsError(f"run {run.path} exists; resume it or choose a new run directory")
    if existed:
        _check_resume(run, cfg)
    state = run.load_checkpoint("last") if existed else None
    torch.manual_seed(cfg.seed)
    region_dim = visual_dim(cfg)
    family = cfg.family
    bert_text = family.text == "bert"
    encoder = TextEncoder(cfg.bert, cfg.text_len, device) if bert_text and not cfg.text_cache else None
    vocab = None
    if family.text == "tokens":
        vocab = Vocab.from_dict(json.loads((run.path / "vocab.json").read_text())) if existed else build_vocab(cfg)
    args = model_args(cfg, region_dim, len(vocab) if vocab else 0, text_dim(cfg, encoder) if bert_text else 0)
    net = MatchNet(**args)
    if cfg.region_norm:
        net.feat_mean, net.feat_std = region_stats(cfg.store, split_rows(cfg.store, cfg.train_split),
                                                   path=f"{family.visual}/feats")
    net = net.to(device)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed)  # CCS derangements, SLAN's ITM negatives
    attention = cfg.ccr > 0 or cfg.ccs > 0 or cfg.ica > 0
    train_ds = make_dataset(cfg, cfg.train_split, vocab, cfg.captions, labels=cfg.ica > 0)  # region labels: ICA only
    loader, sampler = match_loader(train_ds, cfg.batch_size, seed=cfg.seed, window_blocks=cfg.window_blocks,
                                   rank=info.rank, world_size=info.world_size, drop_last=info.world_size > 1,
                                   num_workers=cfg.num_workers)
    val = load_split(make_dataset(cfg, cfg.val_split, vocab, "all", False, cfg.val_max_images)) if is_main() else None
    if val is not None and encoder is not None:
        val = encoder(val)
    epoch, batches, step, best = 0, 0, 0, {"rsum": -1.0, "epoch": -1}
    if state is not None:
        ranks = int(state.get("world_size", 1))
        if ranks != info.world_size and int(state["batches"]) > 0:
            raise ValueError(f"run {run.path} stopped mid-epoch with {ranks} rank(s); resume it with the same "
                             f"number (now {info.world_size}), or from an epoch-end checkpoint")
        net.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sampler.load_state_dict(state["sampler"])
        torch.set_rng_state(state["rng"])
        if device.type == "cuda" and state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(state["cuda_rng"], device)
        gen.set_state(state["ccs_rng"])
        epoch, batches, step = int(state["epoch"]), int(state["batches"]), int(state["step"])
        best = {"rsum": float(state["best_rsum"]), "epoch": int(state["best_epoch"])}
        if is_main():
            run.truncate_metrics(lambda r: r.get("step", 0) <= step)
    elif existed and is_main():
        run.truncate_metrics(lambda r: False)  # killed before its first checkpoint: start over
    elif is_main():
        run.create()
        if vocab is not None:  # before config.yaml, which marks the run as existing
            (run.path / "vocab.json").write_text(json.dumps(vocab.to_dict()))
        run.write_config({**to_dict(cfg), **store_rec,
                          "model_args": args, "region_dim": region_dim, "world_size": info.world_size})
    model = wrap_model(net, device, find_unused_parameters=net.has_unused_parameters)

    def save(name: str, **extra):
        if is_main():
            run.save_checkpoint(name, {
                "model": net.state_dict(), "optimizer": opt.state_dict(), "model_args": args,
                "vocab": vocab.to_dict() if vocab else None, "epoch": epoch, "batches": batches, "step": step,
                "sampler": sampler.state_dict(position=batches * cfg.batch_size), "rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                "ccs_rng": gen.get_state(), "best_rsum": best["rsum"], "best_epoch": best["epoch"],
                "world_size": info.world_size, "epoch_losses": epoch_losses.state(), **extra})

    started, stopped, last_val = time.time(), False, None
    epoch_losses = EpochLosses(state.get("epoch_losses") if state is not None else None)  # a resumed epoch's sums
    while epoch < cfg.epochs and not stopped:
        for g in opt.param_groups:
            g["lr"] = _lr(cfg, epoch)
        sampler.set_epoch(epoch)
        epoch_batches = batches + len(loader)  # len counts what is left of a resumed epoch
        net.train()
        for batch in loader:
            batch = to_device(encoder(batch) if encoder else batch, device)
            out = model(batch, attention=attention)
            res = match_losses(out, batch, cfg, gen, net=net)
            opt.zero_grad(set_to_none=True)
            res["loss"].backward()
            if cfg.grad_clip > 0:
                nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
            opt.step()
            family.after_step(net, out, batch)
            batches, step = batches + 1, step + 1
            epoch_losses.add(res)
            log_now = is_main() and (step % cfg.log_every == 0 or batches == 1)
            if log_now or on_step is not None:  # floats sync the GPU: only when someone reads them
                losses = {k: float(v.detach()) for k, v in res.items()}
                if log_now:
                    run.log(step=step, epoch=epoch, lr=opt.param_groups[0]["lr"], **losses,
                            words=int(batch["match_txt"].numel()))
                if on_step is not None:
                    on_step(step, losses, net)
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                save("last")
            if cfg.max_steps and step >= cfg.max_steps:
                stopped = True
                break
        if stopped and batches < epoch_batches:
            save("last")  # stopped mid-epoch: resume continues this epoch's order
            break
        epoch, batches = epoch + 1, 0
        epoch_rec = epoch_losses.pop()
        if is_main():
            run.log(step=step, epoch=epoch - 1, **epoch_rec)  # per epoch too: a 1-step epoch has a curve
            last_val = retrieval_metrics(net, val, device, cfg.val_rerank_top)
            run.log(step=step, epoch=epoch - 1, val_images=int(len(val["rows"])),
                    **{f"val_{k}": v for k, v in last_val.items()})
            if last_val["rsum"] > best["rsum"]:
                best = {"rsum": last_val["rsum"], "epoch": epoch - 1}
                save("best", val=last_val)
        save("last")
        barrier()
    if is_main():
        _curves(run)
        run.close()
    barrier()  # every rank returns once the run is written (a stop mid-epoch skips the epoch's barrier)
    return {"run_dir": str(run.path), "epochs_completed": epoch, "step": step, "stopped": stopped,
            "best_rsum": best["rsum"], "best_epoch": best["epoch"], "val": last_val,
            "seconds": round(time.time() - started, 2)}


def _curves(run: RunDir) -> None:
    recs = run.metrics()
    plot_curves(recs, ["loss", "triplet", "itc", "itm", "reg", "ccr", "ccs", "ica"],
                run.figures / "loss.png", title=run.path.name)
    plot_curves([r for r in recs if "val_rsum" in r], ["val_rsum", "val_i2t_r1", "val_t2i_r1"],
                run.figures / "val.png", x="epoch", title=run.path.name)


def load_match_run(run_dir, which: str = "best", device="cpu") -> tuple[MatchNet, Vocab | None, dict, MatchTrainConfig]:
    """(model in eval mode, vocab, checkpoint, config) of a run; ``best`` falls back to ``last``."""
    run = RunDir(run_dir)
    saved = run.read_config()
    cfg = from_dict(MatchTrainConfig, {k: v for k, v in saved.items() if k in
                                       {f.name for f in dataclasses.fields(MatchTrainConfig)}}, str(run.config_path))
    ckpt = run.load_checkpoint(which) or (run.load_checkpoint("last") if which == "best" else None)
    if ckpt is None:
        raise FileNotFoundError(f"run {run.path} has no checkpoint ({run.checkpoints}/{which}.pt or last.pt)")
    net = MatchNet(**ckpt["model_args"])
    net.load_state_dict(ckpt["model"])
    vocab = Vocab.from_dict(ckpt["vocab"]) if ckpt.get("vocab") else None
    return net.to(device).eval(), vocab, ckpt, cfg

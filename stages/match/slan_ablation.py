"""SLAN's self-locator ablation (seed 003 Tables 5-6; METHODS §9): frozen boxes (0 adaptor levels) vs 1, 2,
3 levels, and 3 levels without the filter threshold (the top T by saliency), each with the same seeds, on
the matching ablation's runner (``ablation``).
"""

from __future__ import annotations

from pathlib import Path

import yaml

from ...pipeline.config import load_config
from .ablation import ablation_rows, write_ablation
from .train import MatchTrainConfig

SLAN_VARIANTS = {
    "frozen boxes (L=0)": {"slan_levels": 0},
    "adaptor L=1": {"slan_levels": 1},
    "adaptor L=2": {"slan_levels": 2},
    "adaptor L=3": {"slan_levels": 3},
    "L=3, no threshold (top T)": {"slan_levels": 3, "slan_threshold": None},
}
SLAN_METRICS = ["i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5", "rsum", "attn_precision", "attn_recall", "attn_f1",
                "box_inside_before", "box_inside_after", "box_iou_before", "box_iou_after", "kept_regions"]
SLAN_LABELS = {"i2t_r1": "i→t R@1", "i2t_r5": "i→t R@5", "t2i_r1": "t→i R@1", "t2i_r5": "t→i R@5", "rsum": "rsum",
               "box_inside_before": "inside before", "box_inside_after": "inside after",
               "box_iou_before": "IoU before", "box_iou_after": "IoU after", "kept_regions": "kept"}
# Small enough for a CPU: the ablation's defaults (any can be overridden by options/overrides).
ABLATION_DEFAULTS = dict(epochs=4, batch_size=12, lr=1e-3, lr_decay_epoch=3, d=64, region_norm=True,
                         slan_regions=6, slan_samples=1, slan_queue=256, val_max_images=16, device="cpu",
                         log_every=20)


def run_slan_ablation(store: str, seeds: int = 3, *, name: str = "slan-ablation", runs_root="runs",
                      config_file=None, options: dict | None = None, overrides: list[str] | None = None,
                      split: str = "test", variants: dict | None = None, figures: int = 2) -> dict:
    """Seed 003 Tables 5-6 on ``store``: ``SLAN_VARIANTS`` (frozen boxes vs 1/2/3 adaptor levels, and
    threshold off at 3 levels), ``seeds`` seeds each (config seed, +1, ...), trained with ``train_match``
    and evaluated with ``evaluate_match`` on ``split``. Config precedence: ``ABLATION_DEFAULTS`` < built-in
    defaults < ``config_file`` < ``options`` < ``overrides``. The table (mean ± sample std,
    paired Δ against frozen boxes) goes to ``runs_root/name/ablation.md`` and ``ablation.json``; finished
    runs and evaluations are reused, so an interrupted experiment resumes."""
    if seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}")
    try:  # the ablation's small defaults sit below the config file: leave out what the file sets
        in_file = set(yaml.safe_load(Path(config_file).read_text()) or {}) if config_file else set()
    except (OSError, yaml.YAMLError, TypeError):
        in_file = set()  # load_config reports the bad file
    opts = {**{k: v for k, v in ABLATION_DEFAULTS.items() if k not in in_file},
            **{k: v for k, v in (options or {}).items() if v is not None}, "store": store, "model": "slan"}
    base = load_config(MatchTrainConfig, config_file, opts, overrides)
    variants = variants or SLAN_VARIANTS
    root = Path(runs_root) / name
    root.mkdir(parents=True, exist_ok=True)

    seed_list, rows = ablation_rows(base, variants, seeds, root, split, figures)
    intro = (f"SLAN on `{store}`, split **{split}**, seeds {seed_list}; mean ± sample std over seeds; Δ = paired "
             "per-seed difference against frozen boxes. Recalls in %; attention P/R/F1 of the word -> region "
             "attention against the pseudo reference (regions >= 50% inside the word's merged mask, METHODS §8); "
             "inside/IoU before/after: the word's highest-matching kept region's detector box and adapted box "
             "against its merged mask (fraction of the box inside it; box-mask IoU); kept: regions the filter "
             "kept per (image, caption) pair.")
    shared = (f"epochs {base.epochs}, batch {base.batch_size}, lr {base.lr} (×{base.lr_decay} from epoch "
              f"{base.lr_decay_epoch}), d {base.d}, K {base.slan_k}, T {base.slan_regions}, h {base.slan_threshold}, "
              f"pool {base.slan_pool}, samples {base.slan_samples}, queue {base.slan_queue}, captions/step "
              f"{base.captions}, region_norm {base.region_norm}, validation on the first {base.val_max_images or 'all'} "
              f"{base.val_split} images")
    return write_ablation(root, "SLAN self-locator ablation", intro, shared, base=base, store=store, model="slan",
                          split=split, seed_list=seed_list, variants=variants, rows=rows, metrics=SLAN_METRICS,
                          labels=SLAN_LABELS)

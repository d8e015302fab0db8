"""Matching ablations (METHODS §7, §10): train every variant x seed with ``train_match``, evaluate each with
``evaluate_match``, tabulate mean ± sample std and the paired Δ against the first variant. The model is
the config's ``model``; nothing here depends on which one it is (SLAN's own experiment, the self-locator
ablation, is ``slan_ablation``, on these same pieces).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from ...pipeline.config import load_config, to_dict
from ...pipeline.runs import write_strict_json
from ..common.experiment import format_table, paired_deltas, run_ablation, run_slug, summarize
from .evaluate import evaluate_match
from .train import MatchTrainConfig, train_match

ABLATION_VARIANTS = {"baseline": {"ccr": 0.0, "ccs": 0.0, "ica": 0.0}, "+CCR": {"ccr": 1.0, "ccs": 0.0, "ica": 0.0},
                     "+CCS": {"ccr": 0.0, "ccs": 1.0, "ica": 0.0}, "+CCR+CCS": {"ccr": 1.0, "ccs": 1.0, "ica": 0.0},
                     "+ICA": {"ccr": 0.0, "ccs": 0.0, "ica": 1.0}}
ABLATION_METRICS = ["i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum",
                    "attn_precision", "attn_recall", "attn_f1"]
ABLATION_LABELS = {"i2t_r1": "i→t R@1", "i2t_r5": "i→t R@5", "i2t_r10": "i→t R@10", "t2i_r1": "t→i R@1",
                   "t2i_r5": "t→i R@5", "t2i_r10": "t→i R@10", "rsum": "rsum"}


def ablation_rows(base, variants: dict, seeds: int, root: Path, split: str, figures: int) -> tuple[list, list]:
    """Train (or reuse) and evaluate every variant x seed of a matching ablation under ``root``.

    A run whose scores are newer than its best checkpoint is not re-evaluated, so an interrupted
    ablation resumes where it stopped. Returns (seeds, rows for experiment.format_table)."""
    def train_fn(variant: str, ov: dict, seed: int) -> Path:
        run_dir = root / f"{run_slug(variant)}-seed{seed}"
        train_match(dataclasses.replace(base, seed=seed, **ov), run_dir, resume=True)
        return run_dir

    def eval_fn(run_dir: Path) -> dict:
        scores, ckpt = run_dir / "eval" / f"scores_{split}.json", run_dir / "checkpoints" / "best.pt"
        if scores.is_file() and ckpt.is_file() and scores.stat().st_mtime >= ckpt.stat().st_mtime:
            return json.loads(scores.read_text())
        return evaluate_match(run_dir, split, figures=figures, device=base.device)

    seed_list = [base.seed + k for k in range(seeds)]
    return seed_list, run_ablation(variants, seed_list, train_fn, eval_fn)


def run_match_ablation(store: str, model: str = "scan", seeds: int = 3, *, name: str | None = None,
                       runs_root="runs", config_file=None, options: dict | None = None,
                       overrides: list[str] | None = None, split: str = "test", variants: dict | None = None,
                       weight: float | None = None, figures: int = 2) -> dict:
    """Baseline, +CCR, +CCS, +CCR+CCS, +ICA (``ABLATION_VARIANTS``; ``weight`` replaces their 1.0), each
    with ``seeds`` seeds (config seed, +1, ...), trained and evaluated on ``split``; the table (mean ± sample
    std, paired Δ against the baseline) goes to ``runs_root/name/ablation.md`` and ``ablation.json``.
    Finished runs and evaluations are reused, so an interrupted experiment resumes."""
    if seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}")
    base = load_config(MatchTrainConfig, config_file, {**(options or {}), "store": store, "model": model}, overrides)
    variants = variants or {k: {t: (w if weight is None or w == 0 else weight) for t, w in v.items()}
                            for k, v in ABLATION_VARIANTS.items()}
    root = Path(runs_root) / (name or f"{model}-ablation")
    root.mkdir(parents=True, exist_ok=True)

    seed_list, rows = ablation_rows(base, variants, seeds, root, split, figures)
    intro = (f"{model.upper()} on `{store}`, split **{split}**, seeds {seed_list}; mean ± sample std over seeds; "
             "Δ = paired per-seed difference against the baseline. Recalls in %, attention P/R/F1 against the pseudo "
             "reference (regions >= 50% inside the word's merged mask, METHODS §8).")
    shared = (f"epochs {base.epochs}, batch {base.batch_size}, lr {base.lr} (×{base.lr_decay} from epoch "
              f"{base.lr_decay_epoch}), margin {base.margin}, γr {base.gamma_r}, γs {base.gamma_s}, captions/step "
              f"{base.captions}, region_norm {base.region_norm}")
    return write_ablation(root, "Matching ablation", intro, shared, base=base, store=store, model=model, split=split,
                          seed_list=seed_list, variants=variants, rows=rows, metrics=ABLATION_METRICS,
                          labels=ABLATION_LABELS)


def write_ablation(root: Path, heading: str, intro: str, shared: str, *, base, store: str, model: str, split: str,
                   seed_list: list[int], variants: dict, rows: list[dict], metrics, labels) -> dict:
    """The table of a matching ablation (paired Δ against the first variant), written to ``root/ablation.md``
    and ``root/ablation.json``; returns the result dict (with ``path``). Shared by the matching and SLAN runners."""
    baseline = next(iter(variants))
    table = format_table(rows, metrics, baseline=baseline, labels=labels, digits=2)
    md = [f"# {heading}: {root.name}", "", intro, "", table, "", f"- variants: {json.dumps(variants)}",
          f"- shared: {shared}", ""]
    (root / "ablation.md").write_text("\n".join(md))
    result = {"name": root.name, "store": store, "model": model, "split": split, "seeds": seed_list,
              "variants": variants, "config": to_dict(base), "rows": rows,
              "summary": summarize(rows, metrics), "deltas": paired_deltas(rows, baseline, metrics), "table": table}
    result = write_strict_json(root / "ablation.json", result)
    result["path"] = str(root)
    return result

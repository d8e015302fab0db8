"""Seed 000's Table 1 on a store: Show-Attend-Tell with and without the ICA loss, same seeds, evaluated on
the test split, with caption and attention metrics (the table code: ``common.experiment``)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from ..common.experiment import (finite_number, format_table, paired_deltas, run_ablation, run_slug, score_cell,
                                 summarize)

ICA_VARIANTS = ("Show-Attend-Tell", "+ICA loss")


def _chance(rows: list[dict]) -> float:
    vals = [finite_number(r.get("attn_correctness_uniform")) for r in rows]
    vals = [v for v in vals if v is not None]
    return sum(vals) / len(vals) if vals else float("nan")


def run_ica_experiment(store: str, seeds: int = 3, *, name: str = "ica", runs_root="runs", config_file=None,
                       options: dict | None = None, overrides: list[str] | None = None, split: str = "test",
                       figures: int = 4, progress: bool = True, scorer=None) -> dict:
    """Seed 000's Table 1 on ``store``: baseline (ica_weight 0) and +ICA (the config's ica_weight, 0.1 by
    default), ``seeds`` seeds each (config seed, +1, ...), trained then evaluated on ``split``.

    Runs go to ``runs_root/name/<variant>-seed<k>/`` (an interrupted experiment resumes: finished runs
    are not retrained, evaluated runs not re-evaluated); the table to ``runs_root/name/ablation.md`` and
    ``ablation.json``. Config precedence as everywhere: defaults < ``config_file`` < ``options`` <
    ``overrides`` (``["epochs=5", ...]``). ``scorer``: an open ``CaptionScorer`` to reuse (else one is
    opened for the experiment: one METEOR JVM for all its evaluations).
    """
    from ...pipeline.config import load_config, to_dict
    from ..common.store_rows import store_fingerprint
    from .evaluate import TABLE_METRICS, evaluate_caption
    from .metrics import CaptionScorer
    from .train import CaptionTrainConfig, train_caption

    if seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}")
    base = load_config(CaptionTrainConfig, config_file, {**(options or {}), "store": store}, overrides)
    ica_weight = base.ica_weight if base.ica_weight > 0 else 0.1
    variants = {ICA_VARIANTS[0]: {"ica_weight": 0.0}, ICA_VARIANTS[1]: {"ica_weight": ica_weight}}
    root = Path(runs_root) / name
    root.mkdir(parents=True, exist_ok=True)

    def train_fn(variant: str, ov: dict, seed: int) -> Path:
        run_dir = root / f"{run_slug(variant)}-seed{seed}"
        train_caption(dataclasses.replace(base, seed=seed, **ov), run_dir, resume=True, progress=progress)
        return run_dir

    def eval_fn(run_dir: Path) -> dict:
        scores, ckpt = run_dir / "eval" / f"scores_{split}.json", run_dir / "checkpoints" / "best.pt"
        if scores.is_file() and (not ckpt.is_file() or scores.stat().st_mtime >= ckpt.stat().st_mtime):
            return json.loads(scores.read_text())
        return evaluate_caption(run_dir, split, figures=figures, device=base.device, progress=progress,
                                scorer=scorer)

    seed_list = [base.seed + k for k in range(seeds)]
    if scorer is None:
        with CaptionScorer() as scorer:  # one METEOR JVM for every evaluation
            rows = run_ablation(variants, seed_list, train_fn, eval_fn)
    else:
        rows = run_ablation(variants, seed_list, train_fn, eval_fn)
    table = format_table(rows, TABLE_METRICS, baseline=ICA_VARIANTS[0])
    fingerprint = store_fingerprint(store)
    notes = sorted({n for r in rows for n in json.loads((Path(r["run"]) / "eval" / f"scores_{split}.json")
                                                         .read_text()).get("notes", [])})
    md = [f"# ICA ablation: {name}", "",
          f"Show-Attend-Tell with and without the ICA loss (seed 000, Table 1), split **{split}**, "
          f"seeds {seed_list}; mean ± sample std over seeds; Δ = paired per-seed difference.", "", table, "",
          f"- store `{store}`, fingerprint `{fingerprint}`",
          f"- +ICA: ica_weight {ica_weight}, score threshold {base.ica_score_threshold}, cell threshold "
          f"{base.ica_cover_threshold}; both: epochs {base.epochs}, batch {base.batch_images} images, lr {base.lr}, "
          f"embed/attn/hidden {base.embed_dim}/{base.attn_dim}/{base.hidden_dim}, beam {base.beam_size}",
          "- attention metrics: METHODS.md section 8, teacher-forced on the ground-truth captions; chance level "
          f"(uniform attention) of the correctness: {_chance(rows):.4f}",
          *[f"- {n}" for n in notes], "", "## Runs", "",
          "| variant | seed | run | CIDEr | Attn corr. |", "|---|---|---|---|---|",
          *[f"| {r['variant']} | {r['seed']} | `{r['run']}` | {score_cell(r.get('CIDEr'))} | "
            f"{score_cell(r.get('attn_correctness'))} |" for r in rows], ""]
    (root / "ablation.md").write_text("\n".join(md))
    result = {"name": name, "store": store, "store_fingerprint": fingerprint, "split": split, "seeds": seed_list,
              "variants": variants, "config": to_dict(base), "rows": rows,
              "summary": summarize(rows, TABLE_METRICS), "deltas": paired_deltas(rows, ICA_VARIANTS[0], TABLE_METRICS),
              "table": table, "notes": notes}
    from ...pipeline.runs import write_strict_json

    result = write_strict_json(root / "ablation.json", result)
    result["path"] = str(root)
    return result

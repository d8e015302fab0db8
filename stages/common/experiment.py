"""Ablation experiments: train variants with the same seeds, evaluate each, tabulate mean ± std.

The table code is generic (:func:`run_ablation`, :func:`summarize`, :func:`format_table`); the captioning
ablation (``caption.experiment``) and the matching ablations (``match.ablation``) bring their own
train/eval functions.

Statistics: mean over seeds and the *sample* standard deviation (n - 1 in the denominator); with one
seed only the mean is shown. The paired difference row (variant minus baseline, matched by seed) is the
mean ± sample std of the per-seed differences, the quantity that says whether a gain exceeds seed noise.
"""

from __future__ import annotations

import math
import re
from typing import Callable, Mapping, Sequence

__all__ = ["run_ablation", "summarize", "paired_deltas", "format_table"]

METRIC_LABELS = {"Bleu_1": "BLEU-1", "Bleu_2": "BLEU-2", "Bleu_3": "BLEU-3", "Bleu_4": "BLEU-4",
                 "METEOR": "METEOR", "ROUGE_L": "ROUGE-L", "CIDEr": "CIDEr", "SPICE": "SPICE",
                 "attn_precision": "Attn P", "attn_recall": "Attn R", "attn_f1": "Attn F1",
                 "attn_correctness": "Attn corr."}


def finite_number(v) -> float | None:
    """``v`` as a float when it is a finite number (not a bool), else None."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v) if math.isfinite(v) else None


def run_ablation(variants: Mapping[str, dict], seeds: Sequence[int], train_fn: Callable, eval_fn: Callable) -> list[dict]:
    """Train and evaluate every variant with every seed.

    ``train_fn(variant_name, overrides, seed)`` returns a run (e.g. its directory); ``eval_fn(run)``
    returns a dict of metrics. Returns one row per (variant, seed): ``{"variant", "seed", "run", **metrics}``
    keeping the numeric metrics only.
    """
    if not variants or not seeds:
        raise ValueError("an ablation needs at least one variant and one seed")
    rows = []
    for name, overrides in variants.items():
        for seed in seeds:
            run = train_fn(name, dict(overrides), seed)
            metrics = eval_fn(run)
            rows.append({"variant": name, "seed": seed, "run": str(run),
                         **{k: v for k, v in metrics.items() if finite_number(v) is not None}})
    return rows


def _mean_std(values: list[float]) -> dict:
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
    return {"mean": mean, "std": std, "n": n}


def _metrics_of(rows: list[dict], metrics: Sequence[str] | None) -> list[str]:
    if metrics is not None:
        return [m for m in metrics if any(finite_number(r.get(m)) is not None for r in rows)]
    skip = {"variant", "seed", "run"}
    return sorted({k for r in rows for k, v in r.items() if k not in skip and finite_number(v) is not None})


def summarize(rows: list[dict], metrics: Sequence[str] | None = None) -> dict:
    """``{variant: {metric: {"mean", "std" (None when n == 1), "n"}}}``, variants in first-seen order.

    Missing or non-finite values (e.g. SPICE without its jars) are left out of a metric's statistics.
    """
    out: dict = {}
    for m in _metrics_of(rows, metrics):
        for r in rows:
            out.setdefault(r["variant"], {})
        for variant in out:
            vals = [finite_number(r.get(m)) for r in rows if r["variant"] == variant]
            vals = [v for v in vals if v is not None]
            if vals:
                out[variant][m] = _mean_std(vals)
    return out


def paired_deltas(rows: list[dict], baseline: str, metrics: Sequence[str] | None = None) -> dict:
    """``{variant: {metric: stats of (variant - baseline) over the seeds both have}}`` for non-baseline variants."""
    base = {r["seed"]: r for r in rows if r["variant"] == baseline}
    if not base:
        raise ValueError(f"baseline variant {baseline!r} has no rows; variants: {sorted({r['variant'] for r in rows})}")
    out: dict = {}
    for m in _metrics_of(rows, metrics):
        for r in rows:
            if r["variant"] == baseline:
                continue
            a, b = finite_number(r.get(m)), finite_number(base.get(r["seed"], {}).get(m))
            if a is not None and b is not None:
                out.setdefault(r["variant"], {}).setdefault(m, []).append(a - b)
    return {v: {m: _mean_std(d) for m, d in ms.items()} for v, ms in out.items()}


def _cell(stats: dict | None, digits: int, signed: bool = False) -> str:
    if not stats:
        return "n/a"
    fmt = f"{{:{'+' if signed else ''}.{digits}f}}"
    text = fmt.format(stats["mean"])
    return text if stats["std"] is None else f"{text} ± {stats['std']:.{digits}f}"


def format_table(rows: list[dict], metrics: Sequence[str] | None = None, *, baseline: str | None = None,
                 labels: Mapping[str, str] | None = None, digits: int = 4) -> str:
    """A markdown table: one line per variant, ``mean ± std`` over seeds per metric, the best mean of each
    column in bold (every metric here is higher-is-better), and with ``baseline`` one paired
    difference line per other variant (``Δ name``)."""
    labels = {**METRIC_LABELS, **(labels or {})}
    summary = summarize(rows, metrics)
    cols = _metrics_of(rows, metrics)
    seeds = {v: sorted({r["seed"] for r in rows if r["variant"] == v}) for v in summary}
    best = {m: max((s[m]["mean"] for s in summary.values() if m in s), default=None) for m in cols}
    lines = ["| Model | seeds | " + " | ".join(labels.get(m, m) for m in cols) + " |",
             "|---|---|" + "---|" * len(cols)]
    for variant, stats in summary.items():
        cells = []
        for m in cols:
            text = _cell(stats.get(m), digits)
            win = m in stats and len(summary) > 1 and stats[m]["mean"] == best[m]
            cells.append(f"**{text}**" if win else text)
        lines.append(f"| {variant} | {len(seeds[variant])} | " + " | ".join(cells) + " |")
    if baseline is not None and len(summary) > 1:
        for variant, stats in paired_deltas(rows, baseline, cols).items():
            n = max(s["n"] for s in stats.values())
            lines.append(f"| Δ {variant} − {baseline} | {n} | " +
                         " | ".join(_cell(stats.get(m), digits, signed=True) for m in cols) + " |")
    return "\n".join(lines)


def score_cell(v) -> str:
    """A score for a table: undefined ones (null in scores JSON, NaN) read n/a."""
    return "n/a" if finite_number(v) is None else f"{v:.4f}"


def run_slug(name: str) -> str:
    """A variant's name as a run folder name ("+CCR+CCS" -> "ccr-ccs")."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "variant"

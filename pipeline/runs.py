"""Run directories: ``runs/<name>/`` with config.yaml, metrics.jsonl, checkpoints/, eval/, figures/, report.md.

Checkpoints hold only tensors and plain containers and load with ``torch.load(weights_only=True)``
(DESIGN.md principle 7: no pickle). They are written to a temporary file and renamed, so a kill
never leaves a half-written checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
import yaml


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.checkpoints = self.path / "checkpoints"
        self.eval = self.path / "eval"
        self.figures = self.path / "figures"

    def create(self) -> "RunDir":
        for d in (self.path, self.checkpoints, self.eval, self.figures):
            d.mkdir(parents=True, exist_ok=True)
        return self

    @property
    def config_path(self) -> Path:
        return self.path / "config.yaml"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    def exists(self) -> bool:
        return self.config_path.is_file()

    def write_config(self, data: dict) -> None:
        _atomic_write_text(self.config_path, yaml.safe_dump(data, sort_keys=False))

    def read_config(self) -> dict:
        if not self.config_path.is_file():
            raise FileNotFoundError(f"{self.path} is not a run directory (no config.yaml)")
        return yaml.safe_load(self.config_path.read_text())

    def log(self, **record: Any) -> None:
        record.setdefault("time", time.time())
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(record, default=_jsonable) + "\n")
            f.flush()

    def metrics(self) -> list[dict]:
        if not self.metrics_path.is_file():
            return []
        lines = [line for line in self.metrics_path.read_text().splitlines() if line.strip()]
        records = []
        for k, line in enumerate(lines):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                if k == len(lines) - 1:  # a kill mid-append leaves at most a partial last line
                    break
                raise ValueError(f"{self.metrics_path}: line {k + 1} is not JSON") from None
        return records

    def truncate_metrics(self, keep: callable) -> None:
        """Keep only records for which ``keep(record)`` is true (used when resuming from a checkpoint,
        so steps logged after the checkpoint but lost with the process are not counted twice)."""
        kept = [r for r in self.metrics() if keep(r)]
        _atomic_write_text(self.metrics_path, "".join(json.dumps(r) + "\n" for r in kept))

    def save_checkpoint(self, name: str, state: dict) -> Path:
        path = self.checkpoints / f"{name}.pt"
        tmp = path.with_suffix(".pt.tmp")
        torch.save(state, tmp)
        os.replace(tmp, path)
        return path

    def load_checkpoint(self, name: str, map_location="cpu") -> dict | None:
        path = self.checkpoints / f"{name}.pt"
        if not path.is_file():
            return None
        return torch.load(path, map_location=map_location, weights_only=True)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _jsonable(x):
    if isinstance(x, torch.Tensor):
        return x.item() if x.numel() == 1 else x.tolist()
    if hasattr(x, "item"):
        return x.item()
    return str(x)


def plot_curves(records: list[dict], keys: list[str], path: str | Path, x: str = "step", title: str = "") -> Path:
    """Loss/metric curves from metrics.jsonl records, one panel per key, saved as PNG."""
    from matplotlib.figure import Figure

    keys = [k for k in keys if any(k in r for r in records)]
    fig = Figure(figsize=(4 * max(1, len(keys)), 3.2), dpi=100)
    for i, key in enumerate(keys):
        ax = fig.add_subplot(1, len(keys), i + 1)
        pts = [(r[x], r[key]) for r in records if key in r and x in r and _finite(r[key])]
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, lw=1.2)
        ax.set_xlabel(x)
        ax.set_title(key)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)
    return Path(path)


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)

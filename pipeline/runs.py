"""Run directories: ``runs/<name>/`` with config.yaml, metrics.jsonl, checkpoints/, eval/, figures/,
tensorboard/, report.md.

Checkpoints hold only tensors and plain containers and load with ``torch.load(weights_only=True)``
(DESIGN.md principle 7: no pickle). They are written to a temporary file and renamed, so a kill
never leaves a half-written checkpoint.

One epoch convention for captioning and matching: a metrics record's ``epoch`` is the 0-based index of
the epoch it belongs to (the first pass over the data is epoch 0, shown as "epoch 1/N" by the progress
bar); a checkpoint's ``epoch`` and a summary's ``epochs_completed`` count the epochs completed before it
was written, so evaluation reports say "after N epochs". Losses are logged every ``log_every`` steps
and, as ``epoch_<term>`` means over the epoch's steps, once per epoch, so a one-step epoch still has a
curve.

TensorBoard (on when the ``tensorboard`` package is installed, unless ``VLCACHE_TENSORBOARD=0``): every
metrics record is also written to ``tensorboard/`` as scalars (``train/*`` against the step,
``epoch/*`` and ``val/*`` against the epoch index), evaluation scores as ``eval_<split>/*``, and every
figure saved through :meth:`RunDir.save_figure` as an image. ``tensorboard --logdir runs/`` shows all runs.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from .config import ConfigError


def tensorboard_enabled() -> bool:
    """TensorBoard event files are written when the package is installed and not switched off."""
    if os.environ.get("VLCACHE_TENSORBOARD", "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    return importlib.util.find_spec("tensorboard") is not None


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.checkpoints = self.path / "checkpoints"
        self.eval = self.path / "eval"
        self.figures = self.path / "figures"
        self.tensorboard = self.path / "tensorboard"
        self._tb = None
        self._purge_step: int | None = None

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
        self._tb_record(record)

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
        # TensorBoard drops the dead process's events from this step on (its files are append-only)
        self._purge_step = 1 + max((int(r["step"]) for r in kept if "step" in r), default=0)

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

    # ------------------------------------------------------------------------ reports and figures
    def write_scores(self, name: str, scores: dict) -> Path:
        """``eval/<name>`` as strict JSON: a non-finite number is written as ``null``, and the scores'
        ``notes`` say which and why (JSON has no NaN; ``json.dumps`` would write a bare ``NaN``). ``scores``
        itself is cleaned the same way, in place, so the report and the printed scores agree with the file."""
        path = self.eval / name
        clean = write_strict_json(path, scores)
        scores.clear()
        scores.update(clean)
        step = scores.get("step") if isinstance(scores.get("step"), int) else 0
        if name.startswith("scores_"):  # scores.json repeats scores_test.json
            self._tb_scalars(f"eval_{Path(name).stem[len('scores_'):]}", clean, step)
        return path

    def save_figure(self, fig, path: str | Path, **savefig_kw) -> Path:
        """Save a matplotlib figure as PNG, and (TensorBoard on) as an image tagged with its file name."""
        path = Path(path)
        fig.savefig(path, **savefig_kw)
        writer = self._writer()
        if writer is not None:
            from PIL import Image

            import numpy as np

            with Image.open(path) as img:
                writer.add_image(f"figures/{path.stem}", np.asarray(img.convert("RGB")), dataformats="HWC")
            writer.flush()
        return path

    # -------------------------------------------------------------------------------- tensorboard
    def _writer(self):
        if self._tb is None and tensorboard_enabled():
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(self.tensorboard), purge_step=self._purge_step)
        return self._tb

    def _tb_record(self, record: dict) -> None:
        if "step" not in record or self._writer() is None:
            return
        epoch_wise = "epoch" in record and any(k.startswith(("val_", "epoch_")) for k in record)
        x = int(record["epoch"]) if epoch_wise else int(record["step"])
        for key, v in record.items():
            if key in ("step", "epoch", "time") or not _finite(v) or isinstance(v, bool):
                continue
            if key.startswith("val_"):
                tag = f"val/{key[4:]}"
            elif key.startswith("epoch_"):
                tag = f"epoch/{key[6:]}"
            else:
                tag = f"train/{key}"
            self._tb.add_scalar(tag, v, x)
        self._tb.flush()

    def _tb_scalars(self, prefix: str, data: dict, step: int) -> None:
        if self._writer() is None:
            return
        for key, v in _flat(data).items():
            if _finite(v) and not isinstance(v, bool) and key not in ("step", "epoch", "seconds"):
                self._tb.add_scalar(f"{prefix}/{key}", v, step)
        self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def epochs(n: int) -> str:
    """``"1 epoch"``, ``"3 epochs"``: how many epochs a checkpoint has seen, for reports."""
    return f"{n} epoch" if n == 1 else f"{n} epochs"


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_strict_json(path: Path, obj: dict) -> dict:
    """Write ``obj`` to ``path`` atomically as strict JSON: a non-finite number becomes ``null`` and a
    note in ``obj["notes"]`` says which and why (a bare ``NaN`` is not JSON). Returns the cleaned dict."""
    clean, nulls = finite_json(obj)
    if nulls:
        clean["notes"] = list(clean.get("notes") or []) + [null_note(nulls)]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    _atomic_write_text(Path(path), json.dumps(clean, indent=1, default=_jsonable, allow_nan=False))
    return clean


def _jsonable(x):
    if isinstance(x, torch.Tensor):
        return x.item() if x.numel() == 1 else x.tolist()
    if hasattr(x, "item"):
        return x.item()
    return str(x)


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v
    return out


def finite_json(x, path: str = "") -> tuple[Any, list[str]]:
    """``x`` with every non-finite float (NaN, ±inf, also numpy/tensor scalars) replaced by None, and
    the dotted paths of those values."""
    if isinstance(x, dict):
        out, nulls = {}, []
        for k, v in x.items():
            out[k], n = finite_json(v, f"{path}.{k}" if path else str(k))
            nulls += n
        return out, nulls
    if isinstance(x, (list, tuple)):
        out, nulls = [], []
        for i, v in enumerate(x):
            o, n = finite_json(v, f"{path}[{i}]")
            out.append(o)
            nulls += n
        return out, nulls
    if (isinstance(x, torch.Tensor) and x.numel() == 1) or (hasattr(x, "dtype") and getattr(x, "shape", None) == ()):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None, [path]
    return x, []


# Why a score can be undefined on small data, by key prefix (the first that matches).
_NULL_REASONS = (
    ("attn_", "no matched word with a reference region/cell in this split, so there is nothing to average"),
    ("entities", "no Flickr30k Entities phrase with a box in this split"),
    ("box_", "no matched word whose box could be measured in this split"),
    ("kept_regions", "no matched word whose box could be measured in this split"),
    ("", "the value is not a finite number (an average over nothing, or a division by zero)"),
)


def null_note(paths: list[str]) -> str:
    """One note per reason: which values are null and why."""
    groups: dict[str, list[str]] = {}
    for p in paths:
        reason = next(r for prefix, r in _NULL_REASONS if p.split(".")[-1].startswith(prefix) or
                      p.startswith(prefix))
        groups.setdefault(reason, []).append(p)
    return "; ".join(f"null ({', '.join(ps)}): {reason}" for reason, ps in groups.items())


class EpochLosses:
    """Sums of loss terms over an epoch's steps, as detached tensors (no GPU sync until :meth:`pop`).
    ``state`` (from :meth:`state`, kept in a mid-epoch checkpoint) continues a resumed epoch's sums, so
    a resumed run logs the same epoch means as an uninterrupted one."""

    def __init__(self, state: dict | None = None):
        self.sums: dict[str, Any] = dict((state or {}).get("sums", {}))
        self.steps = int((state or {}).get("steps", 0))

    def state(self) -> dict:
        return {"sums": {k: float(v) for k, v in self.sums.items()}, "steps": self.steps}

    def add(self, terms: dict) -> None:
        for k, v in terms.items():
            v = v.detach() if isinstance(v, torch.Tensor) else float(v)
            self.sums[k] = self.sums[k] + v if k in self.sums else v
        self.steps += 1

    def pop(self) -> dict:
        """``{"epoch_<term>": mean, "epoch_steps": n}`` (empty when no step ran), and reset."""
        out = {f"epoch_{k}": float(v) / self.steps for k, v in self.sums.items()}
        if self.steps:
            out["epoch_steps"] = self.steps
        self.sums, self.steps = {}, 0
        return out


def plot_curves(records: list[dict], keys: list[str], path: str | Path, x: str = "step", title: str = "") -> Path:
    """Loss/metric curves from metrics.jsonl records, one panel per key, saved as PNG.

    A key's ``epoch_<key>`` means (per-epoch records) are drawn too, as markers at the epoch's last step,
    so a run with fewer steps than ``log_every`` still shows its losses. Few points get markers."""
    from matplotlib.figure import Figure

    keys = [k for k in keys if any(k in r or f"epoch_{k}" in r for r in records)]
    fig = Figure(figsize=(4 * max(1, len(keys)), 3.2), dpi=100)
    for i, key in enumerate(keys):
        ax = fig.add_subplot(1, len(keys), i + 1)
        for name, style in ((key, dict(lw=1.2)), (f"epoch_{key}", dict(lw=1.0, ls="--", marker="o", ms=4))):
            pts = [(r[x], r[name]) for r in records if name in r and x in r and _finite(r[name])]
            if pts:
                xs, ys = zip(*pts)
                marker = style.pop("marker", "o" if len(pts) < 20 else None)
                ax.plot(xs, ys, marker=marker, label="epoch mean" if name != key else "every N steps", **style)
        if any(f"epoch_{key}" in r for r in records) and any(key in r for r in records):
            ax.legend(fontsize=7)
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


# ------------------------------------------------------------------------------------ partial stores
def store_record(url, allow_partial: bool = False) -> dict:
    """What a training run records about its store (``store_fingerprint``, and ``store_partial`` for an
    incomplete store), after refusing an incomplete store unless ``allow_partial``."""
    from ..storage.backends import open_backend
    from ..storage.fingerprint import fingerprint
    from ..storage.writer import done_mask

    with open_backend(os.fspath(url), "r") as be:
        attrs, total = be.attrs(), be.layout.num_rows
        complete = bool(attrs.get("complete"))
        done = total if complete else int(done_mask(be).sum())
    if not complete and not allow_partial:
        raise ConfigError(f"store {url} is incomplete: {done} of {total} rows extracted; finish the extraction "
                          "(rerun the same `vlcache extract` command) or pass --allow-partial (allow_partial=true) "
                          f"to train on the {done} rows done")
    record = {"store_fingerprint": fingerprint(os.fspath(url))}
    if not complete:
        record["store_partial"] = {"done_rows": done, "total_rows": total, "store_id": attrs.get("store_id")}
    return record


def check_run_store(run_path, config: dict, url, fp: str) -> list[str]:
    """Whether the store at ``url`` (fingerprint ``fp``) is the one the run was trained on; returns notes
    for the report. A run trained on a partial store accepts the same store once more rows are done
    (same ``store_id``; its fingerprint changed), so it is not stranded when the extraction finishes."""
    partial = config.get("store_partial")
    said = (f"trained on a partial store: {partial['done_rows']} of {partial['total_rows']} rows were extracted "
            "when training started") if partial else None
    if fp == config.get("store_fingerprint"):
        return [said] if said else []
    if partial and partial.get("store_id") and partial["store_id"] in _store_ids(url):
        return [f"{said} (fingerprint {config.get('store_fingerprint')}); evaluated on the same store since "
                f"extended (fingerprint {fp})"]
    raise ValueError(f"store {url} has fingerprint {fp}, but run {run_path} was trained on a store with "
                     f"fingerprint {config.get('store_fingerprint')}; evaluate on that store")


def _store_ids(url) -> set:
    from ..storage.backends import open_backend

    with open_backend(os.fspath(url), "r") as be:
        attrs = be.attrs()
    return {attrs.get("store_id"), (attrs.get("copied_from") or {}).get("store_id")} - {None}

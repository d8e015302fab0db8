"""One line per ablation setting: test-split paired deltas and train-split attention-energy diagnostics.

    python summarize.py NAME [NAME ...]     (run inside the work directory; reads runs/NAME/ablation.json)

The diagnostics come from ``vlcache evaluate caption --split train --max-images 96`` (run here when a
run has none): does a model fit its *own training* labels, and how peaked its attention is.
"""

import json
import statistics as st
import subprocess
import sys
from pathlib import Path

DIAG = ("attn_energy_spread", "attn_energy_gap", "attn_mass_on_labels", "attn_label_share", "attn_ica_loss",
        "attn_correctness")


def train_diagnostics(run: Path, vlcache: str) -> dict:
    path = run / "eval" / "scores_train.json"
    scores = json.loads(path.read_text()) if path.exists() else {}
    if "attn_energy_spread" not in scores:
        subprocess.run([vlcache, "evaluate", "caption", "--run", str(run), "--split", "train", "--max-images", "96",
                        "--figures", "0"], capture_output=True, check=True)
        scores = json.loads(path.read_text())
    return scores


def mean_std(values: list[float]) -> str:
    return f"{st.mean(values):+.4f} ± {st.stdev(values):.4f}" if len(values) > 1 else f"{values[0]:+.4f}"


def main(names: list[str], vlcache: str = "vlcache") -> None:
    for name in names:
        rows = json.loads(Path(f"runs/{name}/ablation.json").read_text())["rows"]
        base = {r["seed"]: r for r in rows if r["variant"] == "Show-Attend-Tell"}
        ica = {r["seed"]: r for r in rows if r["variant"] != "Show-Attend-Tell"}
        delta = {k: mean_std([ica[s][k] - base[s][k] for s in base])
                 for k in ("attn_correctness", "attn_precision", "CIDEr", "Bleu_4")}
        diag = {}
        for variant, runs in (("baseline", base), ("ica", ica)):
            scores = [train_diagnostics(Path(r["run"]), vlcache) for r in runs.values()]
            diag[variant] = {k: round(st.mean(s[k] for s in scores), 4) for k in DIAG}
        print(json.dumps({"setting": name, "baseline_correctness": round(st.mean(r["attn_correctness"] for r in base.values()), 4),
                          "uniform": round(st.mean(r["attn_correctness_uniform"] for r in base.values()), 4),
                          "baseline_CIDEr": round(st.mean(r["CIDEr"] for r in base.values()), 3),
                          "delta": delta, "train": diag}, ensure_ascii=False))


if __name__ == "__main__":
    main(sys.argv[1:])

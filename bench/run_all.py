"""`make bench`: every benchmark in sequence, one summary of every ratio, with the machine and the data.

    python bench/run_all.py [--device cpu|cuda] [--full] [--only stream extract ...] [--budget-min 15]
                            [--out bench]

Runs, each in its own subprocess with its own time limit and (unless ``--full``) a reduced size so the
whole run fits in ~15 minutes on a 2-core CPU machine:

    bench/stream.py        streaming reader: the store vs LMDB, HDF5, TSV, .npz, memory-mapped .npy, RAM; S3
    bench/train_caption.py training from the store vs with the detector online
    bench/extract.py       extraction loop vs bare model forward; bytes per image and per mask; 1 vs 2 workers
    bench/match_eval.py    MMCA exact vs shortlist-and-rerank evaluation
    bench/scaling.py       the streaming reader at 1x, 4x, 16x the data: samples/s and peak memory

Their output is shown as it comes; the figures are collected (from ``--json`` where a script writes one,
else parsed from its printed lines) into one table printed at the end and written to ``bench/results.json``
and ``bench/RESULTS.md`` with the machine (CPU model, cores, RAM, load), torch version and date. A step that
fails or runs out of time is reported as such and the others still run. ``--device cuda`` is passed to the
scripts that take it (training and matching; the readers and the extraction benchmark are CPU figures).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
NUM = r"([-+]?[\d,]*\.?\d+)"


def num(s: str) -> float:
    return float(s.replace(",", ""))


# ------------------------------------------------------------------------------------------ the steps
@dataclass
class Step:
    name: str
    script: str
    reduced: list[str]  # size flags for the default (~15 min) run
    budget_s: int  # time limit of this step
    takes_device: bool = False
    json_flag: bool = False  # the script writes its results with --json PATH
    data: str = ""  # what the figures were measured on, for the report


STEPS = [
    Step("stream", "stream.py", ["--images", "1024", "--workers", "0", "2", "--seconds", "1", "--remote-rows", "256"],
         420, json_flag=True,
         data="BUTD-style rows (36 x 2048 float16 + boxes), 1024 rows, in every layout of bench/layouts.py; batch 64; "
              "0 and 2 DataLoader workers, warm and cold page cache; S3 via moto"),
    Step("train_caption", "train_caption.py",
         ["--images", "16", "--store-steps", "4", "--online-batches", "1"], 330, takes_device=True, json_flag=True,
         data="synthetic images, 14x14x2048 grid store; SAT+ICA 512-d, batch 8 images; online = decode + "
              "Mask R-CNN v2 + ResNet-101 (random weights)"),
    Step("extract", "extract.py",
         ["--images", "16", "--size", "160", "--input-size", "128", "--proposals", "32", "--instances", "8",
          "--block", "4"], 330, takes_device=True,
         data="16 synthetic 160 px images; Mask R-CNN v2 + ResNet-101 random init, 36 fixed regions"),
    Step("match_eval", "match_eval.py",
         ["--images", "200", "--queries", "4", "--text-queries", "8", "--topk", "20", "50", "--train-steps", "10"],
         240, takes_device=True,
         data="synthetic 200 images x 5 captions with planted matches; MMCA d=256, 16 heads; sampled queries"),
    Step("scaling", "scaling.py", ["--base", "128", "--factors", "1", "4", "16", "--workers", "0", "2",
                                   "--seconds", "2"], 240, json_flag=True,
         data="BUTD-style rows, 128 / 512 / 2048 rows, 16-row blocks; batch 32"),
]


@dataclass
class Outcome:
    name: str
    status: str = "not run"  # ok | failed (rc N) | timed out | not run
    seconds: float = 0.0
    command: list[str] = field(default_factory=list)
    output: str = ""
    results: dict = field(default_factory=dict)  # parsed figures
    error: str = ""


def run_step(step: Step, args, limit_s: float, json_path: Path) -> Outcome:
    cmd = [sys.executable, str(HERE / step.script)]
    if not args.full:
        cmd += step.reduced
    if step.takes_device:
        cmd += ["--device", args.device]
    if step.json_flag:
        cmd += ["--json", str(json_path)]
    out = Outcome(step.name, command=cmd)
    print(f"\n=== {step.name}: {' '.join(cmd[1:])}  (limit {limit_s:.0f}s)", flush=True)
    t0 = time.perf_counter()
    # own session, so a timeout ends the script's DataLoader workers and children too
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                            start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines: list[str] = []

    def pump():
        for line in proc.stdout:
            lines.append(line)
            print(f"  | {line}", end="", flush=True)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        rc = proc.wait(timeout=max(limit_s, 1))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        rc = None
    reader.join(timeout=10)
    out.seconds = time.perf_counter() - t0
    out.output = "".join(lines)
    out.status = "ok" if rc == 0 else ("timed out" if rc is None else f"failed (rc {rc})")
    try:
        if step.json_flag and json_path.is_file():
            out.results = json.loads(json_path.read_text())
        out.results = PARSERS[step.name](out.output, out.results)
    except Exception as e:  # a changed output format must not lose the other steps' figures
        out.error = f"could not read its figures: {type(e).__name__}: {e}"
        if out.status == "ok":
            out.status = "ok, figures unreadable"
    print(f"=== {step.name}: {out.status} in {out.seconds:.0f}s", flush=True)
    return out


# ---------------------------------------------------------------------------------------- parsers
def parse_stream(text: str, results: dict) -> dict:
    if not results or not results.get("results"):
        raise ValueError("no JSON results")
    return results


def parse_train_caption(text: str, results: dict) -> dict:
    if not results:
        raise ValueError("no JSON results")
    return results


def parse_extract(text: str, _: dict) -> dict:
    def line(label: str) -> float:
        m = re.search(re.escape(label) + r"\s+" + NUM, text)
        if not m:
            raise ValueError(f"no line {label!r}")
        return num(m.group(1))

    return {
        "overhead_vs_bare": line("pipeline overhead, loop / separate bare run:"),
        "overhead_in_run": line("pipeline overhead, loop / its own model time:"),
        "overhead_vs_forward_only": line("loop / detector + ResNet forward only:"),
        "regions_vs_butd": line("regions bytes / BUTD float32:"),
        "workers_2_vs_1": line("2 vs 1 decode workers:"),
        "bare_s_per_image": line("bare model compute (models.run), s/image"),
        "loop_s_per_image": line("extraction loop, s/image"),
        "images_per_s_1_worker": line("loop images/s, 1 decode worker"),
        "images_per_s_2_workers": line("loop images/s, 2 decode workers"),
        "instances_bytes_per_image": line("instances/ bytes per image"),
        "regions_bytes_per_image": line("regions/ bytes per image (36 regions)"),
        "grid_bytes_per_image": line("grid/ bytes per image"),
        "butd_bytes_per_image": line("BUTD float32 layout, bytes per image"),
        "mask_bytes_random": line("masks bytes per instance (random detector)"),
        "mask_bytes_annotations": line("masks bytes per instance (synthetic annotations)"),
    }


def parse_match_eval(text: str, _: dict) -> dict:
    m = re.search(r"exact scoring: " + NUM + r" pairs/s", text) or re.search(r"= " + NUM + r" pairs/s", text)
    if not m:
        raise ValueError("no 'exact scoring: N pairs/s' line")
    out = {"exact_pairs_per_s": num(m.group(1)), "rerank": {}}
    for m in re.finditer(r"rerank top (\d+): x" + NUM + r" faster per query.*?\(x" + NUM
                         + r" fewer\).*?R@K difference vs exact: (.*)$", text, re.M):
        diffs = {k: num(v) for k, v in re.findall(r"(\w+) ([-+][\d.]+)", m.group(4))}
        out["rerank"][int(m.group(1))] = {"speedup_per_query": num(m.group(2)), "fewer_passes": num(m.group(3)),
                                          "recall_diff": diffs}
    for m in re.finditer(r"rerank top (\d+): (\d+) passes, [\d.]+ s \(x" + NUM + r" faster\); (.*)$", text, re.M):
        diffs = {k: num(v) for k, v in re.findall(r"(\w+) [\d.]+ \(([-+][\d.]+)\)", m.group(4))}
        out["rerank"][int(m.group(1))] = {"speedup_per_query": num(m.group(3)), "fewer_passes": None,
                                          "recall_diff": diffs}
    if not out["rerank"]:
        raise ValueError("no 'rerank top K' line")
    return out


def parse_scaling(text: str, results: dict) -> dict:
    if not results:
        raise ValueError("no JSON results")
    return results


PARSERS = {"stream": parse_stream, "train_caption": parse_train_caption, "extract": parse_extract,
           "match_eval": parse_match_eval, "scaling": parse_scaling}


# ---------------------------------------------------------------------------------------- summary
def summary_rows(outcomes: dict[str, Outcome]) -> list[dict]:
    """One row per figure: section, measure, value, target, met (None: no target), step."""
    rows = []

    def add(section, measure, value, target="", met=None, step=""):
        rows.append({"section": section, "measure": measure, "value": value, "target": target, "met": met,
                     "step": step})

    r = outcomes.get("stream")
    if r and r.results:
        goals = {"store/lmdb warm": 1.0, "store/npy-mmap warm": 0.8, "store/npy-mmap cold": 1.0,
                 "store-h5/h5raw": 1.0}
        for size, ratios in sorted(r.results["summary"].items()):
            if not isinstance(ratios, dict):
                continue
            for k, v in ratios.items():
                goal = next((g for p, g in goals.items() if k.startswith(p)), None)
                add("reader", f"{k} samples/s ({size} rows)", f"{v:.2f}x", f">= {goal}x" if goal else "",
                    None if goal is None else v >= goal, "stream")
        for res in r.results["results"]:
            if res["layout"] == "store" and not res["cold"]:
                who = "worker" if res["workers"] else "main"
                add("reader", f"store peak RSS / private memory, {'largest worker' if res['workers'] else 'main'} "
                    f"({res['rows']} rows, {res['workers']} workers)",
                    f"{res[f'rss_{who}_mb']:.0f} / {res.get(f'private_{who}_mb', float('nan')):.0f} MiB", "", None,
                    "stream")
        remote = r.results.get("remote")
        if remote:
            for w in ("0", "2"):
                x = remote[w]
                add("reader", f"S3 (moto, loopback) {remote['rows']} rows, {w} workers",
                    f"{x['samples_per_s']:.0f} samples/s, {x['requests_per_epoch']} requests/epoch", "", None, "stream")
    r = outcomes.get("train_caption")
    if r and r.results:
        x = r.results
        add("training", "time per sample, detector online / from the store", f"{x['speedup']:.1f}x", ">= 50x",
            x["speedup"] >= 50, "train_caption")
        add("training", "  same, one online forward shared by an image's captions", f"{x['speedup_amortised']:.1f}x",
            "", None, "train_caption")
        add("training", "store path: data wait share of step time", f"{100 * x['store']['data_wait_share']:.1f}%",
            "<= 10%", x["store"]["data_wait_share"] <= 0.10, "train_caption")
        add("training", f"store path: samples/s ({x.get('device', 'cpu')})", f"{1 / x['store']['sec_per_sample']:.1f}",
            "", None, "train_caption")
    r = outcomes.get("extract")
    if r and r.results:
        x = r.results
        add("extraction", "loop / bare model compute (separate runs)", f"{x['overhead_vs_bare']:.3f}", "<= 1.15",
            x["overhead_vs_bare"] <= 1.15, "extract")
        add("extraction", "loop / its own model time (same run)", f"{x['overhead_in_run']:.3f}", "<= 1.15",
            x["overhead_in_run"] <= 1.15, "extract")
        add("extraction", "loop / detector + ResNet forward only (no pooling)", f"{x['overhead_vs_forward_only']:.3f}",
            "", None, "extract")
        add("storage", "regions/ bytes per image vs BUTD float32", f"{x['regions_vs_butd']:.3f}x", "<= 0.5x",
            x["regions_vs_butd"] <= 0.5, "extract")
        add("storage", "store bytes per image (instances + regions + grid)",
            f"{x['instances_bytes_per_image'] + x['regions_bytes_per_image'] + x['grid_bytes_per_image']:,.0f} B "
            f"(BUTD {x['butd_bytes_per_image']:,.0f} B)", "", None, "extract")
        add("storage", "mask bytes per instance (real masks / random detector)",
            f"{x['mask_bytes_annotations']:,.0f} / {x['mask_bytes_random']:,.0f} B (raw 784 B)", "", None, "extract")
    r = outcomes.get("match_eval")
    if r and r.results:
        x = r.results
        add("matching", "MMCA exact scoring, pairs/s", f"{x['exact_pairs_per_s']:,.0f}", "", None, "match_eval")
        for k, v in sorted(x["rerank"].items()):
            rsum = v["recall_diff"].get("rsum")
            add("matching", f"rerank top {k} vs exact: speed-up per query", f"{v['speedup_per_query']:.1f}x", "",
                None, "match_eval")
            if rsum is not None:
                add("matching", f"rerank top {k} vs exact: rsum difference", f"{rsum:+.1f}", "", None, "match_eval")
    r = outcomes.get("scaling")
    if r and r.results:
        x = r.results
        lo, hi = min(x["factors"]), max(x["factors"])
        for w, s in sorted(x["summary"].items()):
            who = "worker" if int(w) else "main"
            add("scaling", f"peak private memory {hi}x / {lo}x rows ({w} workers, {who})",
                f"{s['private_growth']:.3f}x", "<= 1.10x", s["flat"], "scaling")
            add("scaling", f"peak RSS {hi}x / {lo}x rows ({w} workers, {who}; mapped chunk pages included)",
                f"{s['rss_growth']:.3f}x", "", None, "scaling")
            sps = " / ".join(f"{s['samples_per_s'][str(f)]:.0f}" for f in x["factors"])  # JSON keys
            add("scaling", f"samples/s at {' / '.join(f'{f}x' for f in x['factors'])} ({w} workers)", sps, "", None,
                "scaling")
    r = outcomes.get("extract")
    if r and r.results:
        add("scaling", "extraction images/s, 2 vs 1 decode worker processes",
            f"{r.results['workers_2_vs_1']:.2f}x", "", None, "extract")
    return rows


def machine(device: str) -> dict:
    import torch

    cpu = platform.processor() or platform.machine()
    ram = None
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
        kib = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                   if line.startswith("MemTotal"))
        ram = round(kib / 2**20, 1)
    except (OSError, StopIteration, ValueError):
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "ram_gib": ram, "torch": torch.__version__,
            "python": platform.python_version(), "platform": platform.platform(), "device": device,
            "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "load_avg_start": [round(x, 2) for x in os.getloadavg()]}
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    head = HERE.parent / ".git" / "HEAD"
    try:  # the commit measured, read from .git without running git
        ref = head.read_text().strip()
        info["commit"] = ((HERE.parent / ".git" / ref[5:]).read_text().strip() if ref.startswith("ref: ") else ref)[:12]
    except OSError:
        pass
    return info


def table(rows: list[dict]) -> str:
    mark = {True: "met", False: "NOT met", None: ""}
    w = max(len(r["measure"]) for r in rows)
    v = max(len(str(r["value"])) for r in rows)
    lines = [f"{'section':<11} {'measure':<{w}}  {'value':>{v}}  {'target':<9} result"]
    lines.append("-" * len(lines[0]))
    lines += [f"{r['section']:<11} {r['measure']:<{w}}  {r['value']:>{v}}  {r['target']:<9} {mark[r['met']]}"
              for r in rows]
    return "\n".join(lines)


def markdown(info: dict, rows: list[dict], outcomes: dict[str, Outcome], total_s: float) -> str:
    mark = {True: "met", False: "**not met**", None: ""}
    out = ["# Benchmark results", "",
           f"Produced by `make bench` (`python bench/run_all.py`) on {info['date']}"
           + (f", commit `{info['commit']}`" if info.get("commit") else "") + f"; total {total_s / 60:.1f} min.", "",
           f"Machine: {info['cpu']}, {info['cores']} cores, {info['ram_gib']} GiB RAM; {info['platform']}; "
           f"python {info['python']}, torch {info['torch']}; device {info['device']}"
           + (f" ({info['gpu']})" if info.get("gpu") else "") + f". Load average at start "
           f"{info['load_avg_start'][0]}, at end {info['load_avg_end'][0]} (a shared machine makes times noisy; "
           "every figure below is a ratio measured side by side in one run).", "",
           "| section | measure | value | target | result |", "|---|---|---|---|---|"]
    out += [f"| {r['section']} | {r['measure'].strip()} | {r['value']} | {r['target']} | {mark[r['met']]} |"
            for r in rows]
    out += ["", "## Steps", "", "| step | status | seconds | data | command |", "|---|---|---|---|---|"]
    for step in STEPS:
        o = outcomes.get(step.name)
        if o:
            cmd = " ".join(["python", f"bench/{step.script}", *o.command[2:]])
            out.append(f"| {step.name} | {o.status} | {o.seconds:.0f} | {step.data} | `{cmd}` |")
    errors = [f"- {o.name}: {o.error}" for o in outcomes.values() if o.error]
    if errors:
        out += ["", "## Problems", "", *errors]
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", help="passed to the scripts that take it (cpu | cuda)")
    ap.add_argument("--full", action="store_true", help="each script's own default sizes (slower)")
    ap.add_argument("--only", nargs="+", choices=[s.name for s in STEPS], help="run only these steps")
    ap.add_argument("--budget-min", type=float, default=15.0, help="whole run's time limit, minutes")
    ap.add_argument("--out", type=Path, default=HERE, help="folder for results.json and RESULTS.md")
    args = ap.parse_args(argv)
    info = machine(args.device)
    print(f"machine: {json.dumps(info)}", flush=True)
    t0 = time.perf_counter()
    deadline = t0 + args.budget_min * 60
    outcomes: dict[str, Outcome] = {}
    with tempfile.TemporaryDirectory(prefix="vlcache-bench-all-") as tmp:
        for step in STEPS:
            if args.only and step.name not in args.only:
                continue
            left = deadline - time.perf_counter()
            if left < 30:
                outcomes[step.name] = Outcome(step.name, status="not run (time budget spent)")
                continue
            outcomes[step.name] = run_step(step, args, min(step.budget_s * (4 if args.full else 1), left),
                                           Path(tmp) / f"{step.name}.json")
    total = time.perf_counter() - t0
    info["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
    rows = summary_rows(outcomes)
    print("\n" + "=" * 100)
    print(f"SUMMARY ({total / 60:.1f} min) on {info['cpu']}, {info['cores']} cores, {info['ram_gib']} GiB RAM, "
          f"torch {info['torch']}, device {info['device']}, {info['date']}, load {info['load_avg_start'][0]} -> "
          f"{info['load_avg_end'][0]}")
    for step in STEPS:
        if step.name in outcomes:
            o = outcomes[step.name]
            print(f"  {step.name:<14} {o.status:<28} {o.seconds:5.0f}s  data: {step.data}")
    print()
    print(table(rows) if rows else "no figures collected")
    args.out.mkdir(parents=True, exist_ok=True)
    doc = {"machine": info, "total_s": round(total, 1), "full": args.full, "summary": rows,
           "steps": {n: {"status": o.status, "seconds": round(o.seconds, 1), "command": o.command[1:],
                         "results": o.results, "error": o.error} for n, o in outcomes.items()}}
    (args.out / "results.json").write_text(json.dumps(doc, indent=1, default=str))
    (args.out / "RESULTS.md").write_text(markdown(info, rows, outcomes, total))
    print(f"\nwrote {args.out / 'results.json'} and {args.out / 'RESULTS.md'}")
    return 0 if all(o.status.startswith("ok") for o in outcomes.values()) else 1


if __name__ == "__main__":
    sys.exit(main())

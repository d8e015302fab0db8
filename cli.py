"""The `vlcache` command line. Thin on purpose: it parses, resolves configs and calls library code.

Config precedence for commands that take one: built-in defaults < --config FILE < the command's own
options < --set key=value overrides (see vlcache.pipeline.config).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer

app = typer.Typer(
    help="vlcache: extract Mask R-CNN masks, region and grid features once into a checksummed store, "
    "then train captioning and image-text matching models by streaming it.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
datasets_app = typer.Typer(help="Datasets: generate the built-in synthetic dataset.", no_args_is_help=True)
store_app = typer.Typer(help="Inspect, verify, import, copy and compare stores.", no_args_is_help=True)
train_app = typer.Typer(help="Stage two: train models by streaming a store.", no_args_is_help=True)
evaluate_app = typer.Typer(help="Evaluate a run directory on a split.", no_args_is_help=True)
experiment_app = typer.Typer(help="Ablations over seeds, with mean ± std tables.", no_args_is_help=True)
app.add_typer(datasets_app, name="datasets")
app.add_typer(store_app, name="store")
app.add_typer(train_app, name="train")
app.add_typer(evaluate_app, name="evaluate")
app.add_typer(experiment_app, name="experiment")

CONFIG_HELP = "YAML config file (precedence: defaults < file < options < --set)."
SET_HELP = "Override any config key: key=value (parsed as YAML)."


def _fail(message: str, code: int = 1) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


@datasets_app.command("synth")
def datasets_synth(
    out: Path = typer.Option(..., help="Output directory (images/, dataset_synth.json, instances.json)."),
    images: int = typer.Option(200, help="Number of images."),
    seed: int = typer.Option(0, help="Random seed; the same seed gives the same bytes."),
    size: int = typer.Option(128, help="Image side in pixels."),
):
    """Generate the synthetic shapes dataset (Karpathy JSON + COCO instances, 5 captions per image)."""
    from .pipeline.synth import generate

    path = generate(out, n_images=images, seed=seed, size=(size, size))
    typer.echo(f"wrote {images} images and captions: {path}")


@store_app.command("info")
def store_info(
    url: str = typer.Argument(..., help="Store path or URL (directory, .h5 file, s3://..., memory://...)."),
    as_json: bool = typer.Option(False, "--json", help="Print the raw info as JSON."),
):
    """Schema, config, counts, done/total, size on disk, errors and match statistics of a store."""
    from .storage.errors import StoreError
    from .storage.verify import format_info, info

    try:
        data = info(url)
    except StoreError as e:
        _fail(str(e))
    typer.echo(json.dumps(data, indent=2, default=str) if as_json else format_info(data))


@store_app.command("verify")
def store_verify(url: str = typer.Argument(..., help="Store path or URL.")):
    """Read every chunk and check its checksum; list damaged chunks; exit code 1 if any."""
    from .storage.errors import StoreError
    from .storage.verify import verify

    try:
        report = verify(url, progress=True)
    except StoreError as e:
        _fail(str(e))
    typer.echo(report.describe())
    if not report.ok:
        raise typer.Exit(1)


@store_app.command("import")
def store_import(
    dataset: Path = typer.Argument(..., help="Karpathy JSON, COCO captions JSON or JSONL of the images."),
    source: str = typer.Argument(..., help="BUTD TSV file/dir/glob, directory of .npz, or SCAN *_ims.npy."),
    out: str = typer.Argument(..., help="Store to create."),
    fmt: str = typer.Option("auto", "--format", help="auto | tsv | npz | scan."),
    ids_file: Optional[Path] = typer.Option(None, help="SCAN: the *_ids.txt beside *_ims.npy."),
    image_root: Optional[Path] = typer.Option(None, help="Image folder (default: beside the dataset file)."),
    regions: int = typer.Option(36, help="Region capacity per image (more are truncated, counted)."),
    block_size: int = typer.Option(64, help="Rows per block (chunk)."),
    match: bool = typer.Option(True, "--match/--no-match", help="Also match COCO class words in captions."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing store."),
):
    """Import existing bottom-up features (BUTD TSV, per-image .npz, SCAN .npy) without re-extraction.

    Ids that do not match the dataset are reported (count and examples), never dropped silently.
    """
    from .pipeline.datasets import DatasetError, load_dataset
    from .stages.extract.importers import FeatureImportError, format_import_report, import_features
    from .stages.extract.matching import ClassWordMatcher
    from .storage.errors import StoreError

    try:
        data = load_dataset(dataset, image_root, check_images=False)
        matcher = ClassWordMatcher.coco() if match else None
        report = import_features(data, source, out, fmt=fmt, ids_file=ids_file, block_size=block_size,
                                 regions=regions, matcher=matcher, overwrite=overwrite)
    except (DatasetError, FeatureImportError, StoreError, ValueError, FileNotFoundError) as e:
        _fail(str(e))
    typer.echo(format_import_report(report))


@store_app.command("copy")
def store_copy(
    src: str = typer.Argument(..., help="Source store (path or URL)."),
    dst: str = typer.Argument(..., help="Destination (path or URL; .h5 for one HDF5 file)."),
    force: bool = typer.Option(False, "--force", help="Overwrite a complete destination store."),
    workers: int = typer.Option(4, help="Blocks copied in parallel (threads)."),
):
    """Copy a store between any two locations (local, s3://, gs://; Zarr <-> HDF5), block by block.

    Resumable after interruption; every block is read back and compared on arrival.
    """
    from .storage.sharing import copy_store

    rep = _run_guarded(copy_store, src, dst, force=force, progress=True, workers=workers)
    typer.echo(rep.summary())
    raise typer.Exit(0 if rep.complete else 3)


@store_app.command("diff")
def store_diff(a: str = typer.Argument(...), b: str = typer.Argument(...)):
    """Same schema? same config? same rows? which arrays differ? Exit 0 when identical, 1 otherwise."""
    from .storage.sharing import diff_stores

    rep = _run_guarded(diff_stores, a, b, progress=True)
    typer.echo(rep.summary())
    raise typer.Exit(0 if rep.identical else 1)


@app.command("inspect")
def inspect_cmd(
    url: str = typer.Argument(..., help="Store path or URL."),
    image: str = typer.Option(..., "--image", help="Image id, or row number."),
    caption: int = typer.Option(0, help="Caption index."),
    word: Optional[str] = typer.Option(None, help="Highlight this matched word's merged mask."),
    out: Path = typer.Option(Path("fig.png"), help="PNG to write."),
    image_root: Optional[Path] = typer.Option(None, help="Image folder, if the images moved."),
):
    """Draw one image with its cached masks, classes, scores and matched caption words to a PNG."""
    from .storage.figures import inspect_image

    typer.echo(_run_guarded(inspect_image, url, image, caption=caption, word=word, out=out, image_root=image_root))


@app.command("extract")
def extract_cmd(
    dataset: Path = typer.Option(..., help="Karpathy JSON, COCO captions JSON or JSONL file."),
    out: str = typer.Option(..., help="Store to create or resume (directory, .h5 file or URL)."),
    image_root: Optional[Path] = typer.Option(None, help="Image folder (default: beside the dataset file)."),
    instances: Optional[Path] = typer.Option(None, help="COCO instances JSON (COCO captions input)."),
    config: Optional[Path] = typer.Option(None, help="YAML config file."),
    detector: Optional[str] = typer.Option(None, help="Detector backend: torchvision | detectron2 | annotations."),
    weights: Optional[str] = typer.Option(None, help="Detector weights: DEFAULT | PATH | none (random init)."),
    backbone_weights: Optional[str] = typer.Option(None, help="ResNet weights for features: DEFAULT | PATH | none."),
    match: Optional[str] = typer.Option(None, help="Class-word matching: synonyms | exact."),
    class_words: Optional[Path] = typer.Option(None, help="Synonym table (class, word, word...) per line."),
    split: Optional[str] = typer.Option(None, help="Only this split (train | val | test)."),
    limit: Optional[int] = typer.Option(None, help="Only the first N images."),
    batch_size: Optional[int] = typer.Option(None, help="Images per forward pass."),
    num_workers: Optional[int] = typer.Option(None, help="Image-decoding worker processes."),
    device: Optional[str] = typer.Option(None, help="cpu | cuda | cuda:N."),
    strict: bool = typer.Option(False, "--strict", help="Stop at the first bad image."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Start over if the store has another config."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="Override any config key: key.sub=value."),
):
    """Stage one: detector masks, bottom-up regions, grid features and class-word matches into a store.

    Resumes automatically: rerunning on the same store continues with the blocks not done.
    Multi-GPU / multi-node: launch with torchrun; ranks own disjoint blocks.
    """
    from .pipeline.config import ConfigError, load_config
    from .pipeline.datasets import DatasetError, load_dataset
    from .stages.extract.config import ExtractConfig
    from .stages.extract.loop import StrictModeError, extract
    from .storage.errors import StoreError

    options = {
        "detector.backend": detector, "detector.weights": weights, "features.weights": backbone_weights,
        "match": match, "split": split, "limit": limit, "runtime.batch_size": batch_size,
        "runtime.num_workers": num_workers, "runtime.device": device, "runtime.strict": strict or None,
    }
    try:
        cfg = load_config(ExtractConfig, config, options, set_)
        data = load_dataset(dataset, image_root, instances=instances, check_images=False)
        summary = extract(data, out, cfg, overwrite=overwrite, class_words=class_words)
    except (ConfigError, DatasetError, StoreError, StrictModeError, ValueError) as e:
        _fail(str(e))
    typer.echo(summary.describe())


def _run_guarded(fn, *args, **kwargs):
    """Call library code; turn the errors users can fix into one clear line and exit code 1."""
    from .pipeline.config import ConfigError
    from .storage.errors import StoreError

    try:
        return fn(*args, **kwargs)
    except (ConfigError, StoreError, ValueError, FileNotFoundError) as e:
        _fail(str(e))


@store_app.command("text-cache")
def store_text_cache(
    store: str = typer.Option(..., help="The main store (complete)."),
    out: str = typer.Option(..., help="Where to write the text cache store (row-aligned to the main one)."),
    bert: Optional[str] = typer.Option(None, help="BERT name or local dir (default: bundled all-MiniLM-L6-v2)."),
    max_len: int = typer.Option(32, help="Subword tokens per caption."),
    device: str = typer.Option("cpu", help="cpu | cuda."),
    overwrite: bool = typer.Option(False, "--overwrite"),
):
    """Precompute the frozen BERT's token outputs for every caption once (MMCA/SLAN train from it)."""
    from .stages.train.text_cache import build_text_cache

    res = _run_guarded(build_text_cache, store, out, bert=bert, max_len=max_len, device=device,
                       overwrite=overwrite, progress=True)
    typer.echo(f"text cache {res['url']}: {res['blocks_written']} blocks written, complete={res['complete']}")


@train_app.command("caption")
def train_caption_cmd(
    store: Optional[str] = typer.Option(None, help="Store URL or path."),
    run: Path = typer.Option(..., help="Run directory (created, or resumed)."),
    config: Optional[Path] = typer.Option(None, help=CONFIG_HELP),
    ica_weight: Optional[float] = typer.Option(None, help="ICA loss weight lambda_aux (0 = baseline)."),
    epochs: Optional[int] = typer.Option(None),
    batch_images: Optional[int] = typer.Option(None, help="Images per step (all their captions are samples)."),
    device: Optional[str] = typer.Option(None, help="auto | cpu | cuda."),
    num_workers: Optional[int] = typer.Option(None),
    set_: Optional[List[str]] = typer.Option(None, "--set", help=SET_HELP),
):
    """Show-Attend-Tell (+ ICA loss) on the store's grid features; resumes from RUN if it exists."""
    from .pipeline.config import load_config
    from .stages.train.caption_train import CaptionTrainConfig, train_caption

    opts = {"store": store, "ica_weight": ica_weight, "epochs": epochs, "batch_images": batch_images,
            "device": device, "num_workers": num_workers}
    cfg = _run_guarded(load_config, CaptionTrainConfig, config, opts, set_)
    summary = _run_guarded(train_caption, cfg, run)
    typer.echo(json.dumps(summary, indent=2, default=str))


@evaluate_app.command("caption")
def evaluate_caption_cmd(
    run: Path = typer.Option(..., help="Run directory."),
    split: str = typer.Option("test"),
    beam_size: Optional[int] = typer.Option(None),
    max_images: Optional[int] = typer.Option(None),
    figures: int = typer.Option(8, help="Attention figures to draw."),
):
    """Beam search + pycocoevalcap (BLEU, METEOR, ROUGE-L, CIDEr; SPICE if its jars exist) + attention metrics."""
    from .stages.train.caption_eval import evaluate_caption

    scores = _run_guarded(evaluate_caption, run, split, beam_size=beam_size, max_images=max_images,
                          figures=figures, progress=True)
    typer.echo(json.dumps(scores, indent=2, default=str))
    typer.echo(f"report: {run / 'report.md'}")


@experiment_app.command("ica")
def experiment_ica_cmd(
    store: str = typer.Option(...),
    seeds: int = typer.Option(3),
    name: str = typer.Option("ica", help="Runs go to RUNS_ROOT/NAME/."),
    runs_root: Path = typer.Option(Path("runs")),
    config: Optional[Path] = typer.Option(None, help=CONFIG_HELP),
    set_: Optional[List[str]] = typer.Option(None, "--set", help=SET_HELP),
):
    """Baseline vs +ICA captioning with the same seeds; table of mean ± std (seed 000, Table 1)."""
    from .stages.train.experiment import run_ica_experiment

    res = _run_guarded(run_ica_experiment, store, seeds, name=name, runs_root=runs_root, config_file=config,
                       overrides=set_)
    typer.echo(res.get("table", ""))


@train_app.command("match")
def train_match_cmd(
    model: str = typer.Option("scan", help="scan | mmca | slan."),
    store: Optional[str] = typer.Option(None, help="Store URL or path."),
    run: Path = typer.Option(..., help="Run directory (created, or resumed)."),
    text_cache: Optional[str] = typer.Option(None, help="Text cache store (MMCA/SLAN)."),
    ccr: Optional[float] = typer.Option(None, help="CCR constraint weight."),
    ccs: Optional[float] = typer.Option(None, help="CCS constraint weight."),
    ica: Optional[float] = typer.Option(None, help="ICA (Lovász) attention loss weight."),
    epochs: Optional[int] = typer.Option(None),
    batch_size: Optional[int] = typer.Option(None),
    device: Optional[str] = typer.Option(None),
    config: Optional[Path] = typer.Option(None, help=CONFIG_HELP),
    set_: Optional[List[str]] = typer.Option(None, "--set", help=SET_HELP),
):
    """Image-text matching (SCAN, MMCA, SLAN) with optional CCR/CCS/ICA attention terms."""
    from .pipeline.config import load_config
    from .stages.train.match_train import MatchTrainConfig, train_match

    opts = {"model": model, "store": store, "text_cache": text_cache, "ccr": ccr, "ccs": ccs, "ica": ica,
            "epochs": epochs, "batch_size": batch_size, "device": device}
    cfg = _run_guarded(load_config, MatchTrainConfig, config, opts, set_)
    summary = _run_guarded(train_match, cfg, run)
    typer.echo(json.dumps(summary, indent=2, default=str))


@evaluate_app.command("match")
def evaluate_match_cmd(
    run: Path = typer.Option(..., help="Run directory."),
    split: str = typer.Option("test"),
    rerank_top: Optional[int] = typer.Option(None, help="MMCA: shortlist by i0·c0, rerank the top K exactly."),
    entities: Optional[Path] = typer.Option(None, help="Flickr30k Entities directory (Annotations/, Sentences/)."),
    figures: int = typer.Option(6),
):
    """R@1/5/10 both ways, rsum (COCO 1K/5K, Flickr 1K), attention P/R/F1, figures, report.md."""
    from .stages.train.match_eval import evaluate_match

    scores = _run_guarded(evaluate_match, run, split, rerank_top=rerank_top, entities=entities, figures=figures)
    typer.echo(json.dumps(scores, indent=2, default=str))
    typer.echo(f"report: {run / 'report.md'}")


@experiment_app.command("match")
def experiment_match_cmd(
    store: str = typer.Option(...),
    model: str = typer.Option("scan"),
    seeds: int = typer.Option(3),
    name: Optional[str] = typer.Option(None),
    runs_root: Path = typer.Option(Path("runs")),
    weight: Optional[float] = typer.Option(None, help="Weight of each constraint (default 1.0)."),
    config: Optional[Path] = typer.Option(None, help=CONFIG_HELP),
    set_: Optional[List[str]] = typer.Option(None, "--set", help=SET_HELP),
):
    """Baseline, +CCR, +CCS, +CCR+CCS, +ICA with the same seeds; table of R@K and attention metrics."""
    from .stages.train.match_eval import run_match_ablation

    res = _run_guarded(run_match_ablation, store, model, seeds, name=name, runs_root=runs_root,
                       config_file=config, overrides=set_, weight=weight)
    typer.echo(res.get("table", "") if isinstance(res, dict) else str(res))


@experiment_app.command("slan")
def experiment_slan_cmd(
    store: str = typer.Option(..., help="Store with grid features (G >= 7) and region boxes."),
    text_cache: Optional[str] = typer.Option(None, help="Text cache store (vlcache store text-cache)."),
    seeds: int = typer.Option(3),
    name: str = typer.Option("slan-ablation"),
    runs_root: Path = typer.Option(Path("runs")),
    config: Optional[Path] = typer.Option(None, help=CONFIG_HELP),
    set_: Optional[List[str]] = typer.Option(None, "--set", help=SET_HELP),
):
    """SLAN: frozen boxes vs 1, 2, 3 adaptor levels, and the filter threshold on/off (seed 003, Tables 5-6)."""
    from .stages.train.slan_train import run_slan_ablation

    res = _run_guarded(run_slan_ablation, store, seeds, name=name, runs_root=runs_root, config_file=config,
                       options={"text_cache": text_cache}, overrides=set_)
    typer.echo(res.get("table", "") if isinstance(res, dict) else str(res))


@train_app.command("detector")
def train_detector_cmd(
    run: Path = typer.Option(..., help="Run directory (created, or resumed from its last checkpoint)."),
    instances: Optional[List[Path]] = typer.Option(None, help="COCO instances JSON (repeatable): training images, "
                                                   "or all splits when --dataset names them."),
    dataset: Optional[Path] = typer.Option(None, help="Karpathy/COCO-captions/JSONL file whose train/val splits to use."),
    val_instances: Optional[List[Path]] = typer.Option(None, help="Without --dataset: COCO instances JSON of the "
                                                       "validation images."),
    image_root: Optional[Path] = typer.Option(None, help="Image folder (default: beside the dataset/instances file)."),
    val_image_root: Optional[Path] = typer.Option(None, help="Validation image folder (default: --image-root)."),
    backbone: Optional[str] = typer.Option(None, help="resnet18 | resnet34 | resnet50 | resnet101 (default resnet50)."),
    weights: Optional[str] = typer.Option(None, help="Detector init: none | DEFAULT (torchvision COCO R50-FPN) | PATH."),
    backbone_weights: Optional[str] = typer.Option(None, help="Backbone init: none | DEFAULT (ImageNet) | PATH."),
    epochs: Optional[int] = typer.Option(None, help="Epochs (default 26, lr x0.1 at 16 and 22)."),
    batch_size: Optional[int] = typer.Option(None, help="Images per step (default 2)."),
    device: Optional[str] = typer.Option(None, help="cpu | cuda | cuda:N."),
    config: Optional[Path] = typer.Option(None, help=CONFIG_HELP),
    set_: Optional[List[str]] = typer.Option(None, "--set", help=SET_HELP),
):
    """Train (or fine-tune) a torchvision Mask R-CNN on COCO-format instances; RUN/detector.pt loads in
    `vlcache extract --weights RUN/detector.pt`."""
    from .pipeline.config import load_config
    from .stages.detect.train import DetectorTrainConfig, train_detector

    opts = {"instances": [str(p) for p in instances] if instances else None,
            "val_instances": [str(p) for p in val_instances] if val_instances else None,
            "dataset": str(dataset) if dataset else None, "image_root": str(image_root) if image_root else None,
            "val_image_root": str(val_image_root) if val_image_root else None, "backbone": backbone,
            "weights": weights, "backbone_weights": backbone_weights, "epochs": epochs, "batch_size": batch_size,
            "device": device}
    cfg = _run_guarded(load_config, DetectorTrainConfig, config, opts, set_)
    summary = _run_guarded(train_detector, cfg, run)
    typer.echo(json.dumps(summary, indent=2, default=str))


@evaluate_app.command("detector")
def evaluate_detector_cmd(
    run: Path = typer.Option(..., help="Run directory of `vlcache train detector`."),
    checkpoint: Optional[Path] = typer.Option(None, help="Detector checkpoint (default RUN/detector.pt)."),
    max_images: Optional[int] = typer.Option(None, help="Only the first N validation images."),
    device: str = typer.Option("cpu", help="cpu | cuda."),
):
    """COCO bbox and segm AP (pycocotools COCOeval) on the run's validation images."""
    from .stages.detect.evaluate import evaluate_detector

    scores = _run_guarded(evaluate_detector, run, checkpoint=str(checkpoint) if checkpoint else None,
                          device=device, max_images=max_images)
    typer.echo(json.dumps(scores, indent=2, default=str))


@app.command("demo")
def demo_cmd(
    out: Path = typer.Option(Path("demo"), help="Working directory for the demo's dataset, store and runs."),
    images: int = typer.Option(200, help="Synthetic images."),
    device: str = typer.Option("cpu", help="cpu | cuda."),
):
    """The whole pipeline on the built-in synthetic dataset: generate, extract, inspect, train, evaluate."""
    from .pipeline.demo import run_demo

    run_demo(out, n_images=images, device=device)


def main() -> None:
    app(prog_name="vlcache")


if __name__ == "__main__":
    sys.exit(main())

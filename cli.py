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
app.add_typer(datasets_app, name="datasets")
app.add_typer(store_app, name="store")


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


@app.command("demo")
def demo_cmd(
    out: Path = typer.Option(Path("demo"), help="Working directory for the demo's dataset, store and runs."),
    images: int = typer.Option(240, help="Synthetic images."),
    device: str = typer.Option("cpu", help="cpu | cuda."),
):
    """The whole pipeline on the built-in synthetic dataset: generate, extract, inspect, train, evaluate."""
    from .pipeline.demo import run_demo

    run_demo(out, n_images=images, device=device)


def main() -> None:
    app(prog_name="vlcache")


if __name__ == "__main__":
    sys.exit(main())

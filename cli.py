"""The `vlcache` command line. Thin on purpose: it parses, resolves configs and calls library code.
(Over 400 lines only because there are twenty-odd commands, each a typer signature and one call.)

Config precedence for commands that take one: built-in defaults < --config FILE < the command's own
options < --set key=value overrides (see vlcache.pipeline.config).
"""

from __future__ import annotations

import functools
import json
import os
import re
import shlex
import sys
import traceback
from pathlib import Path
from typing import List, Optional

import typer
from typer.exceptions import TyperException

from .pipeline.signals import Terminated
from .stages.extract.config import ExtractConfig

app = typer.Typer(
    help="vlcache: extract Mask R-CNN masks, region and grid features once into a checksummed store, "
    "then train captioning and image-text matching models by streaming it.\n\nExit codes: 0 done, 1 an error "
    "(one line naming the input and the fix; --debug adds the traceback), 2 a usage error, 3 extraction finished "
    "but some images failed (listed; --retry-errors redoes them), 130 interrupted by Ctrl-C, 143 stopped by SIGTERM "
    "(extraction stops as on Ctrl-C; the message gives the command that resumes).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain errors: "Error: ..." on one line, and help that greps
)
datasets_app = typer.Typer(help="Datasets: generate the built-in synthetic dataset.", no_args_is_help=True, rich_markup_mode=None)
store_app = typer.Typer(help="Inspect, verify, import, copy and compare stores.", no_args_is_help=True, rich_markup_mode=None)
train_app = typer.Typer(help="Stage two: train models by streaming a store.", no_args_is_help=True, rich_markup_mode=None)
evaluate_app = typer.Typer(help="Evaluate a run directory on a split.", no_args_is_help=True, rich_markup_mode=None)
experiment_app = typer.Typer(help="Ablations over seeds, with mean ± std tables.", no_args_is_help=True, rich_markup_mode=None)
app.add_typer(datasets_app, name="datasets")
app.add_typer(store_app, name="store")
app.add_typer(train_app, name="train")
app.add_typer(evaluate_app, name="evaluate")
app.add_typer(experiment_app, name="experiment")

CONFIG_HELP = "YAML config file (precedence: defaults < file < options < --set)."
SET_HELP = "Override any config key: key=value (parsed as YAML)."
ALLOW_PARTIAL_HELP = "Train on the rows done of a store whose extraction is unfinished (the run records it)."
EXIT_ERROR, EXIT_USAGE, EXIT_BAD_IMAGES, EXIT_INTERRUPTED, EXIT_TERMINATED = 1, 2, 3, 130, 143
_state = {"debug": bool(os.environ.get("VLCACHE_DEBUG"))}


@app.callback()
def _options(debug: bool = typer.Option(False, "--debug", help="On an error, also print its traceback.")):
    _state["debug"] = _state["debug"] or debug


def _fail(message: str, code: int = EXIT_ERROR) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def _usage(message: str) -> None:
    """A usage error (exit 2), raised before anything is imported or written."""
    raise typer.BadParameter(message)


def _expected(e: BaseException) -> bool:
    """Errors a user can fix (bad input, config, store, device): one line. Anything else is a bug: traceback."""
    return isinstance(e, (ValueError, FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError,
                          NotADirectoryError)) or type(e).__module__.startswith("vlcache.")


def _train(config_cls, train_fn, config, opts: dict, overrides, run) -> None:
    """A train command's body: resolve the config (defaults < --config file < options < --set), check its
    device, train into ``run`` (resuming it if it exists), print the summary as JSON."""
    from .pipeline.config import load_config

    cfg = load_config(config_cls, config, opts, overrides)
    _check_device(cfg.device, "device (config)")
    typer.echo(json.dumps(train_fn(cfg, run), indent=2, default=str))


def _resume_hint() -> str:
    return "rerun the same command to resume: " + shlex.join(["vlcache", *sys.argv[1:]])


def _guarded(fn):
    """Every command: expected errors become one line and exit 1 (traceback only with --debug); Ctrl-C
    stops with where it stopped and the command that resumes."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, TyperException):  # usage errors: typer's own message, exit 2
            raise
        except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM where a command turns it into Terminated
            where = str(e) if str(e) else "interrupted"
            typer.secho(f"\n{where}; {_resume_hint()}", fg=typer.colors.YELLOW, err=True)
            raise typer.Exit(EXIT_TERMINATED if isinstance(e, Terminated) else EXIT_INTERRUPTED) from None
        except Exception as e:
            if not _expected(e):
                raise
            if _state["debug"]:
                traceback.print_exc()
            _fail("; ".join(line.strip() for line in str(e).splitlines() if line.strip()) or type(e).__name__)

    return wrapper


def _command(group: typer.Typer, name: str):
    """``@group.command(name)`` with the error handling of :func:`_guarded`."""

    def deco(fn):
        return group.command(name)(_guarded(fn))

    return deco


_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def _check_device(device: Optional[str], flag: str = "--device") -> None:
    """Refuse a device this machine lacks before anything is written. Without an NVIDIA driver this needs no
    torch import (the cheap check); with one, torch says whether CUDA (and that GPU index) is usable."""
    if device is None:
        return
    if not _DEVICE.match(device):
        _usage(f"{flag} {device!r}: expected cpu, cuda, cuda:N or auto")
    if not device.startswith("cuda"):
        return
    no_driver = sys.platform.startswith("linux") and not any(
        os.path.exists(p) for p in ("/dev/nvidiactl", "/dev/nvidia0", "/proc/driver/nvidia/version"))
    if not no_driver:
        import torch

        index = int(device.split(":")[1]) if ":" in device else 0
        if torch.cuda.is_available() and index < torch.cuda.device_count():
            return
    _fail(f"{flag} {device}: CUDA is not available on this machine"
          + (" (no NVIDIA driver)" if no_driver else "") + f"; use {flag} cpu")


@_command(datasets_app, "synth")
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


@_command(store_app, "info")
def store_info(
    url: str = typer.Argument(..., help="Store path or URL (directory, .h5 file, s3://..., memory://...)."),
    as_json: bool = typer.Option(False, "--json", help="Print the raw info as JSON."),
):
    """Schema, config, counts, done/total, size on disk, errors and match statistics of a store."""
    from .storage.verify import format_info, info

    data = info(url)
    typer.echo(json.dumps(data, indent=2, default=str) if as_json else format_info(data))


@_command(store_app, "verify")
def store_verify(url: str = typer.Argument(..., help="Store path or URL.")):
    """Read every chunk and check its checksum; list damaged chunks; exit code 1 if any."""
    from .storage.verify import verify

    report = verify(url, progress=True)
    typer.echo(report.describe())
    if not report.ok:
        raise typer.Exit(1)


@_command(store_app, "import")
def store_import(
    dataset: Path = typer.Argument(..., help="Karpathy JSON, COCO captions JSON or JSONL of the images."),
    source: str = typer.Argument(..., help="BUTD TSV file/dir/glob, directory of .npz, or SCAN *_ims.npy."),
    out: str = typer.Argument(..., help="Store to create."),
    fmt: str = typer.Option("auto", "--format", help="auto | tsv | npz | scan."),
    ids_file: Optional[Path] = typer.Option(None, help="SCAN: the *_ids.txt beside *_ims.npy.",
                                            show_default="none"),
    image_root: Optional[Path] = typer.Option(None, help="Image folder.", show_default="beside the dataset file"),
    regions: int = typer.Option(36, help="Region capacity per image (more are truncated, counted)."),
    block_size: int = typer.Option(64, help="Rows per block (chunk)."),
    match: bool = typer.Option(True, "--match/--no-match", help="Also match COCO class words in captions."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing store."),
):
    """Import existing bottom-up features (BUTD TSV, per-image .npz, SCAN .npy) without re-extraction.

    Ids that do not match the dataset are reported (count and examples), never dropped silently.
    """
    from .pipeline.datasets import load_dataset
    from .stages.extract.importers import format_import_report, import_features
    from .stages.extract.matching import ClassWordMatcher

    data = load_dataset(dataset, image_root, check_images=False)
    matcher = ClassWordMatcher.coco() if match else None
    report = import_features(data, source, out, fmt=fmt, ids_file=ids_file, block_size=block_size,
                             regions=regions, matcher=matcher, overwrite=overwrite)
    typer.echo(format_import_report(report))


@_command(store_app, "copy")
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

    rep = copy_store(src, dst, force=force, progress=True, workers=workers)
    typer.echo(rep.summary())
    raise typer.Exit(0 if rep.complete else 3)


@_command(store_app, "diff")
def store_diff(a: str = typer.Argument(...), b: str = typer.Argument(...)):
    """Same schema? same config? same rows? which arrays differ? Exit 0 when identical, 1 otherwise."""
    from .storage.sharing import diff_stores

    rep = diff_stores(a, b, progress=True)
    typer.echo(rep.summary())
    raise typer.Exit(0 if rep.identical else 1)


@_command(app, "inspect")
def inspect_cmd(
    url: str = typer.Argument(..., help="Store path or URL."),
    image: Optional[str] = typer.Option(None, "--image", help="Image id (images/id; for COCO the image id).",
                                        show_default="none: give --image or --row"),
    row: Optional[int] = typer.Option(None, "--row", help="Row number in the store (0..N-1).",
                                      show_default="none: give --image or --row"),
    caption: int = typer.Option(0, help="Caption index."),
    word: Optional[str] = typer.Option(None, help="Highlight this matched word's merged mask.", show_default="all"),
    out: Path = typer.Option(Path("fig.png"), help="PNG to write."),
    image_root: Optional[Path] = typer.Option(None, help="Image folder, if the images moved.",
                                              show_default="the store's"),
):
    """Draw one image with its cached masks, classes, scores and matched caption words to a PNG."""
    if (image is None) == (row is None):
        _usage("give the image as --image ID or as --row N (one of them)")
    from .storage.inspect_png import inspect_image
    from .storage.store import open_store

    with open_store(url, image_root=image_root) as store:
        n = len(store)
        if row is not None and not 0 <= row < n:
            _fail(f"--row {row}: store {url} has {n} rows (0..{n - 1})")
        if image is not None:
            try:
                row = store.index_of(image)
            except KeyError:
                examples = ", ".join(repr(str(i)) for i in store.ids[:3])
                _fail(f"store {url} has no image with id {image!r} (its ids look like {examples}); "
                      f"for a row number use --row (0..{n - 1})")
    typer.echo(inspect_image(url, row, caption=caption, word=word, out=out, image_root=image_root))


_X = ExtractConfig()  # the defaults --help shows (a plain dataclass: no torch import)
@_command(app, "extract")
def extract_cmd(
    dataset: List[Path] = typer.Option(..., help="Karpathy JSON, COCO captions JSON or JSONL file. COCO captions "
                                       "come one file per split: repeat --dataset for each, or give their folder "
                                       "(captions_*.json); images of captions_X.json are looked up in "
                                       "IMAGE_ROOT/X/ when it exists."),
    out: str = typer.Option(..., help="Store to create or resume (directory, .h5 file or URL)."),
    image_root: Optional[Path] = typer.Option(None, help="Image folder.", show_default="beside the dataset file"),
    instances: Optional[List[Path]] = typer.Option(
        None, help="COCO instances JSON (repeatable), for any dataset format: attached by COCO image id where "
        "the dataset has them (Karpathy cocoid, COCO captions), else by file name. Needed by --detector "
        "annotations; gives the class names.", show_default="none"),
    config: Optional[Path] = typer.Option(None, help=CONFIG_HELP, show_default="none"),
    detector: Optional[str] = typer.Option(None, help="Detector backend: torchvision | detectron2 | annotations.",
                                           show_default=_X.detector.backend),
    weights: Optional[str] = typer.Option(
        None, help="Weights of EVERY model (detector and feature backbone): DEFAULT = torchvision's pretrained "
        "(downloaded once into the torch hub cache), none = random init (nothing downloaded; offline), PATH = a "
        "`vlcache train detector` checkpoint (it holds both). --detector-weights / --backbone-weights override "
        "it per model (a plain state dict fits one model).", show_default=_X.detector.weights),
    detector_weights: Optional[str] = typer.Option(None, help="Detector weights: DEFAULT | PATH | none.",
                                                   show_default="--weights"),
    backbone_weights: Optional[str] = typer.Option(None, help="Feature backbone (ResNet-101) weights: DEFAULT | "
                                                   "PATH | none.", show_default="--weights"),
    match: Optional[str] = typer.Option(None, help="Class-word matching: synonyms | exact.", show_default=_X.match),
    class_words: Optional[Path] = typer.Option(None, help="Synonym table (class, word, word...) per line.",
                                               show_default="class_words.txt beside the dataset, else the COCO table"),
    split: Optional[str] = typer.Option(None, help="Only this split (train | val | test).", show_default="all"),
    limit: Optional[int] = typer.Option(None, help="Only the first N images.", show_default="all"),
    batch_size: Optional[int] = typer.Option(None, help="Images per forward pass.",
                                             show_default=str(_X.runtime.batch_size)),
    num_workers: Optional[int] = typer.Option(None, help="Image-decoding worker processes.",
                                              show_default=str(_X.runtime.num_workers)),
    device: Optional[str] = typer.Option(None, help="cpu | cuda | cuda:N.", show_default=_X.runtime.device),
    strict: bool = typer.Option(False, "--strict", help="Stop at the first bad image (default: record it in "
                                "images/error, go on, exit 3 at the end)."),
    retry_errors: bool = typer.Option(False, "--retry-errors", help="Also redo the rows whose image failed "
                                      "(e.g. after fixing --image-root); the other rows stay as they are."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Start over if the store has another config."),
    set_: Optional[List[str]] = typer.Option(None, "--set", show_default="none", help="Override any config key: key.sub=value "
                                             "(e.g. detector.min_size=480; every key: stages/extract/config.py)."),
):
    """Stage one: detector masks, bottom-up regions, grid features and class-word matches into a store.

    Resumes automatically: rerunning on the same store continues with the blocks not done.
    Multi-GPU / multi-node: launch with torchrun; ranks own disjoint blocks.
    """
    from .pipeline.config import load_config
    from .pipeline.dataset_files import check_image_root, load_datasets, select_records

    _check_device(device)
    options = {
        "detector.backend": detector, "detector.weights": detector_weights or weights,
        "features.weights": backbone_weights or weights, "match": match, "split": split, "limit": limit,
        "runtime.batch_size": batch_size, "runtime.num_workers": num_workers, "runtime.device": device,
        "runtime.strict": strict or None,
    }
    cfg = load_config(ExtractConfig, config, options, set_)
    _check_device(cfg.runtime.device, "runtime.device")
    data = load_datasets(dataset, image_root, instances=instances, check_images=False)
    check_image_root(data.image_root, select_records(data, cfg.split, cfg.limit)[: cfg.block_size])

    from .stages.extract.loop import extract  # imports torch: after the cheap checks

    summary = extract(data, out, cfg, overwrite=overwrite, class_words=class_words, retry_errors=retry_errors)
    typer.echo(summary.describe())
    if summary.error_rows:
        raise typer.Exit(EXIT_BAD_IMAGES)


@_command(store_app, "text-cache")
def store_text_cache(
    store: str = typer.Option(..., help="The main store (complete)."),
    out: str = typer.Option(..., help="Where to write the text cache store (row-aligned to the main one)."),
    bert: Optional[str] = typer.Option(None, help="BERT name or local dir.",
                                       show_default="the bundled all-MiniLM-L6-v2"),
    max_len: int = typer.Option(32, help="Subword tokens per caption."),
    device: str = typer.Option("cpu", help="cpu | cuda | cuda:N."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing text cache."),
):
    """Precompute the frozen BERT's token outputs for every caption once (MMCA/SLAN train from it)."""
    _check_device(device)
    _check_store(store)
    from .stages.match.text_cache import build_text_cache

    res = build_text_cache(store, out, bert=bert, max_len=max_len, device=device, overwrite=overwrite,
                           progress=True)
    typer.echo(f"text cache {res['url']}: {res['blocks_written']} blocks written, complete={res['complete']}")


@_command(train_app, "caption")
def train_caption_cmd(
    store: Optional[str] = typer.Option(None, help="Store URL or path.", show_default="from --config"),
    run: Path = typer.Option(..., help="Run directory (created, or resumed)."),
    config: Optional[Path] = typer.Option(None, help=CONFIG_HELP, show_default="none"),
    # show_default: CaptionTrainConfig's defaults (its module imports torch; a test keeps these equal)
    ica_weight: Optional[float] = typer.Option(None, help="ICA loss weight lambda_aux (0 = baseline).",
                                               show_default="0.1"),
    epochs: Optional[int] = typer.Option(None, help="Epochs.", show_default="20"),
    batch_images: Optional[int] = typer.Option(None, help="Images per step (all their captions are samples).",
                                               show_default="16"),
    device: Optional[str] = typer.Option(None, help="auto | cpu | cuda | cuda:N.", show_default="auto"),
    num_workers: Optional[int] = typer.Option(None, help="Data-loading worker processes.", show_default="2"),
    allow_partial: bool = typer.Option(False, "--allow-partial", help=ALLOW_PARTIAL_HELP),
    set_: Optional[List[str]] = typer.Option(None, "--set", show_default="none", help=SET_HELP + " Every key: vlcache/stages/caption/"
                                             "train.py (CaptionTrainConfig)."),
):
    """Show-Attend-Tell (+ ICA loss) on the store's grid features; resumes from RUN if it exists."""
    _check_device(device)
    _check_store(store)
    from .stages.caption.train import CaptionTrainConfig, train_caption

    opts = {"store": store, "ica_weight": ica_weight, "epochs": epochs, "batch_images": batch_images,
            "device": device, "num_workers": num_workers, "allow_partial": allow_partial or None}
    _train(CaptionTrainConfig, train_caption, config, opts, set_, run)


@_command(evaluate_app, "caption")
def evaluate_caption_cmd(
    run: Path = typer.Option(..., help="Run directory (of vlcache train caption)."),
    split: str = typer.Option("test", help="train | val | test."),
    beam_size: Optional[int] = typer.Option(None, help="Beam width.", show_default="the run's beam_size (3)"),
    max_images: Optional[int] = typer.Option(None, help="Only the split's first N images.", show_default="all"),
    figures: int = typer.Option(8, help="Attention figures to draw."),
):
    """Beam search + pycocoevalcap (BLEU, METEOR, ROUGE-L, CIDEr; SPICE if its jars exist) + attention metrics."""
    _check_run(run, "caption")
    from .stages.caption.evaluate import evaluate_caption

    scores = evaluate_caption(run, split, beam_size=beam_size, max_images=max_images, figures=figures,
                              progress=True)
    typer.echo(json.dumps(scores, indent=2, default=str))
    typer.echo(f"report: {run / 'report.md'}")


@_command(experiment_app, "ica")
def experiment_ica_cmd(
    store: str = typer.Option(..., help="Store URL or path."),
    seeds: int = typer.Option(3, help="Seeds 0..N-1, each trained as baseline and +ICA."),
    name: str = typer.Option("ica", help="Runs go to RUNS_ROOT/NAME/."),
    runs_root: Path = typer.Option(Path("runs"), help="Folder of run directories."),
    config: Optional[Path] = typer.Option(None, help=CONFIG_HELP, show_default="none"),
    set_: Optional[List[str]] = typer.Option(None, "--set", show_default="none", help=SET_HELP),
):
    """Baseline vs +ICA captioning with the same seeds; table of mean ± std (seed 000, Table 1)."""
    from .stages.caption.experiment import run_ica_experiment

    res = run_ica_experiment(store, seeds, name=name, runs_root=runs_root, config_file=config, overrides=set_)
    typer.echo(res.get("table", ""))


@_command(train_app, "match")
def train_match_cmd(
    # show_default: MatchTrainConfig's defaults (its module imports torch; a test keeps these equal)
    model: Optional[str] = typer.Option(None, help="scan | mmca | slan.", show_default="scan"),
    store: Optional[str] = typer.Option(None, help="Store URL or path.", show_default="from --config"),
    run: Path = typer.Option(..., help="Run directory (created, or resumed)."),
    text_cache: Optional[str] = typer.Option(None, help="Text cache store (MMCA/SLAN).",
                                             show_default="BERT runs online"),
    ccr: Optional[float] = typer.Option(None, help="CCR constraint weight.", show_default="0.0"),
    ccs: Optional[float] = typer.Option(None, help="CCS constraint weight.", show_default="0.0"),
    ica: Optional[float] = typer.Option(None, help="ICA (Lovász) attention loss weight.", show_default="0.0"),
    epochs: Optional[int] = typer.Option(None, help="Epochs.", show_default="20"),
    batch_size: Optional[int] = typer.Option(None, help="Images per step.", show_default="64"),
    device: Optional[str] = typer.Option(None, help="auto | cpu | cuda | cuda:N.", show_default="auto"),
    allow_partial: bool = typer.Option(False, "--allow-partial", help=ALLOW_PARTIAL_HELP),
    config: Optional[Path] = typer.Option(None, help=CONFIG_HELP, show_default="none"),
    set_: Optional[List[str]] = typer.Option(None, "--set", show_default="none", help=SET_HELP + " Every key: vlcache/stages/match/"
                                             "train.py (MatchTrainConfig)."),
):
    """Image-text matching (SCAN, MMCA, SLAN) with optional CCR/CCS/ICA attention terms."""
    _check_device(device)
    _check_store(store)
    from .stages.match.train import MatchTrainConfig, train_match

    opts = {"model": model, "store": store, "text_cache": text_cache, "ccr": ccr, "ccs": ccs, "ica": ica,
            "epochs": epochs, "batch_size": batch_size, "device": device, "allow_partial": allow_partial or None}
    _train(MatchTrainConfig, train_match, config, opts, set_, run)


@_command(evaluate_app, "match")
def evaluate_match_cmd(
    run: Path = typer.Option(..., help="Run directory (of vlcache train match)."),
    split: str = typer.Option("test", help="train | val | test."),
    rerank_top: Optional[int] = typer.Option(None, help="MMCA: shortlist by i0·c0, rerank the top K exactly.",
                                             show_default="exact scoring"),
    entities: Optional[Path] = typer.Option(None, help="Flickr30k Entities directory (Annotations/, Sentences/).",
                                            show_default="none"),
    figures: int = typer.Option(6, help="Attention figures to draw."),
    protocol: str = typer.Option("auto", help="auto | coco (1K folds + 5K; needs a 5,000-image split) | full."),
):
    """R@1/5/10 both ways, rsum (COCO 1K/5K, Flickr 1K), attention P/R/F1, figures, report.md."""
    _check_run(run, "match")
    from .stages.match.evaluate import evaluate_match

    scores = evaluate_match(run, split, rerank_top=rerank_top, entities=entities, figures=figures, protocol=protocol)
    typer.echo(json.dumps(scores, indent=2, default=str))
    typer.echo(f"report: {run / 'report.md'}")


@_command(experiment_app, "match")
def experiment_match_cmd(
    store: str = typer.Option(..., help="Store URL or path."),
    model: str = typer.Option("scan", help="scan | mmca | slan."),
    seeds: int = typer.Option(3, help="Seeds 0..N-1, each trained for every variant."),
    name: Optional[str] = typer.Option(None, help="Runs go to RUNS_ROOT/NAME/.", show_default="MODEL-ablation"),
    runs_root: Path = typer.Option(Path("runs"), help="Folder of run directories."),
    weight: Optional[float] = typer.Option(None, help="Weight of each constraint.", show_default="1.0"),
    config: Optional[Path] = typer.Option(None, help=CONFIG_HELP, show_default="none"),
    set_: Optional[List[str]] = typer.Option(None, "--set", show_default="none", help=SET_HELP),
):
    """Baseline, +CCR, +CCS, +CCR+CCS, +ICA with the same seeds; table of R@K and attention metrics."""
    from .stages.match.ablation import run_match_ablation

    res = run_match_ablation(store, model, seeds, name=name, runs_root=runs_root,
                       config_file=config, overrides=set_, weight=weight)
    typer.echo(res.get("table", "") if isinstance(res, dict) else str(res))


@_command(experiment_app, "slan")
def experiment_slan_cmd(
    store: str = typer.Option(..., help="Store with grid features (G >= 7) and region boxes."),
    text_cache: Optional[str] = typer.Option(None, help="Text cache store (vlcache store text-cache).",
                                             show_default="BERT runs online"),
    seeds: int = typer.Option(3, help="Seeds 0..N-1, each trained for every variant."),
    name: str = typer.Option("slan-ablation", help="Runs go to RUNS_ROOT/NAME/."),
    runs_root: Path = typer.Option(Path("runs"), help="Folder of run directories."),
    config: Optional[Path] = typer.Option(None, help=CONFIG_HELP, show_default="none"),
    set_: Optional[List[str]] = typer.Option(None, "--set", show_default="none", help=SET_HELP),
):
    """SLAN: frozen boxes vs 1, 2, 3 adaptor levels, and the filter threshold on/off (seed 003, Tables 5-6)."""
    from .stages.match.slan_ablation import run_slan_ablation

    res = run_slan_ablation(store, seeds, name=name, runs_root=runs_root, config_file=config,
                       options={"text_cache": text_cache}, overrides=set_)
    typer.echo(res.get("table", "") if isinstance(res, dict) else str(res))


@_command(train_app, "detector")
def train_detector_cmd(
    run: Path = typer.Option(..., help="Run directory (created, or resumed from its last checkpoint)."),
    instances: Optional[List[Path]] = typer.Option(None, help="COCO instances JSON (repeatable): training images, "
                                                   "or all splits when --dataset names them.", show_default="none"),
    dataset: Optional[Path] = typer.Option(None, help="Karpathy/COCO-captions/JSONL file whose train/val splits to use.",
                                           show_default="none"),
    val_instances: Optional[List[Path]] = typer.Option(None, help="Without --dataset: COCO instances JSON of the "
                                                       "validation images.", show_default="none"),
    image_root: Optional[Path] = typer.Option(None, help="Image folder.",
                                              show_default="beside the dataset/instances file"),
    val_image_root: Optional[Path] = typer.Option(None, help="Validation image folder.",
                                                  show_default="--image-root"),
    backbone: Optional[str] = typer.Option(None, help="resnet18 | resnet34 | resnet50 | resnet101.",
                                          show_default="resnet50"),
    weights: Optional[str] = typer.Option(None, help="Detector init: none | DEFAULT (torchvision COCO R50-FPN) | PATH.",
                                          show_default="none"),
    backbone_weights: Optional[str] = typer.Option(None, help="Backbone init: none | DEFAULT (ImageNet) | PATH.",
                                                   show_default="none"),
    epochs: Optional[int] = typer.Option(None, help="Epochs (lr x0.1 at 16 and 22).", show_default="26"),
    batch_size: Optional[int] = typer.Option(None, help="Images per step.", show_default="2"),
    device: Optional[str] = typer.Option(None, help="cpu | cuda | cuda:N.", show_default="cpu"),
    config: Optional[Path] = typer.Option(None, help=CONFIG_HELP, show_default="none"),
    set_: Optional[List[str]] = typer.Option(None, "--set", show_default="none", help=SET_HELP),
):
    """Train (or fine-tune) a torchvision Mask R-CNN on COCO-format instances; RUN/detector.pt loads in
    `vlcache extract --weights RUN/detector.pt`."""
    _check_device(device)
    from .stages.detect.train import DetectorTrainConfig, train_detector

    opts = {"instances": [str(p) for p in instances] if instances else None,
            "val_instances": [str(p) for p in val_instances] if val_instances else None,
            "dataset": str(dataset) if dataset else None, "image_root": str(image_root) if image_root else None,
            "val_image_root": str(val_image_root) if val_image_root else None, "backbone": backbone,
            "weights": weights, "backbone_weights": backbone_weights, "epochs": epochs, "batch_size": batch_size,
            "device": device}
    _train(DetectorTrainConfig, train_detector, config, opts, set_, run)


@_command(evaluate_app, "detector")
def evaluate_detector_cmd(
    run: Path = typer.Option(..., help="Run directory of `vlcache train detector`."),
    checkpoint: Optional[Path] = typer.Option(None, help="Detector checkpoint.",
                                              show_default="RUN/detector.pt"),
    max_images: Optional[int] = typer.Option(None, help="Only the first N validation images.",
                                             show_default="all"),
    device: str = typer.Option("cpu", help="cpu | cuda."),
):
    """COCO bbox and segm AP (pycocotools COCOeval) on the run's validation images."""
    from .stages.detect.evaluate import evaluate_detector

    _check_device(device)
    scores = evaluate_detector(run, checkpoint=str(checkpoint) if checkpoint else None, device=device,
                               max_images=max_images)
    typer.echo(json.dumps(scores, indent=2, default=str))


@_command(app, "demo")
def demo_cmd(
    out: Path = typer.Option(Path("demo"), help="Working directory for the demo's dataset, store and runs."),
    images: int = typer.Option(200, help="Synthetic images."),
    device: str = typer.Option("cpu", help="cpu | cuda | cuda:N."),
):
    """The whole pipeline on the built-in synthetic dataset: generate, extract, inspect, train, evaluate."""
    _check_device(device)
    from .demo import run_demo

    run_demo(out, n_images=images, device=device)


def _check_store(url: Optional[str], flag: str = "--store") -> None:
    """A local store that does not exist: one line before torch is imported (URLs are checked when opened)."""
    if url and "://" not in url and not os.path.exists(url):
        _fail(f"{flag} {url}: no such store (build one with vlcache extract --out {url})")


def _check_run(run: Path, kind: str) -> None:
    """A run directory of the right kind (caption or match), checked before torch is imported."""
    import yaml

    path = run / "config.yaml"
    if not path.is_file():
        _fail(f"{run} is not a run directory (no config.yaml); train one first: vlcache train {kind} --run {run} ...")
    cfg = yaml.safe_load(path.read_text()) or {}
    found = "match" if isinstance(cfg.get("model"), str) else "caption"  # a matching run names its model
    if found != kind:
        what = f"matching run ({cfg['model']})" if found == "match" else "captioning run"
        _fail(f"{run} is a {what}: evaluate it with vlcache evaluate {found} --run {run}")


def main() -> None:
    app(prog_name="vlcache")


if __name__ == "__main__":
    sys.exit(main())

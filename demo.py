"""`vlcache demo`: the whole pipeline on the built-in synthetic dataset, on CPU in a few minutes.

Steps: generate the synthetic dataset -> extract (annotations oracle for instances, ResNet-101 for
grid and region features) -> store info -> train + evaluate Show-Attend-Tell (baseline and +ICA)
-> train + evaluate a SCAN matcher. Offline, the ResNet is random-initialised (recorded in the store);
where torchvision's ImageNet weights are in the torch hub cache they are used instead.
"""

from __future__ import annotations

import time
from pathlib import Path

from .pipeline.config import load_config
from .pipeline.datasets import load_dataset
from .pipeline.synth import generate


def _weights_available() -> bool:
    """Whether torchvision's ResNet-101 weights are already cached (no download is attempted)."""
    import torch
    from torchvision.models import ResNet101_Weights

    name = Path(ResNet101_Weights.DEFAULT.url).name
    return (Path(torch.hub.get_dir()) / "checkpoints" / name).is_file()


def _banner(text: str) -> None:
    print(f"\n=== {text} ===", flush=True)


def extract_demo_store(out: Path, n_images: int, device: str) -> tuple[str, Path]:
    from .stages.extract.config import ExtractConfig
    from .stages.extract.loop import extract

    data_dir = out / "data"
    if not (data_dir / "dataset_synth.json").is_file():
        _banner(f"1/5 generating {n_images} synthetic images -> {data_dir}")
        generate(data_dir, n_images=n_images, seed=0, size=(128, 128))
    dataset = load_dataset(data_dir / "dataset_synth.json", instances=data_dir / "instances.json")
    weights = "DEFAULT" if _weights_available() else "none"
    _banner(f"2/5 extracting (annotations oracle + ResNet-101 weights={weights}) -> {out / 'store.zarr'}")
    cfg = load_config(ExtractConfig, overrides=[
        "detector.backend=annotations", f"features.weights={weights}", "features.input_size=192",
        "features.grid_size=6", "features.max_regions=16", "features.min_regions=4", "block_size=32",
        # toy 128-px square images: regions pooled from the grid's 192x192 pass (no second backbone pass)
        "features.region_scale=square",
        f"runtime.device={device}", "runtime.batch_size=8", "runtime.num_workers=1",
    ])
    url = str(out / "store.zarr")
    summary = extract(dataset, url, cfg)
    print(summary.describe())
    return url, data_dir


def run_demo(out: str | Path = "demo", n_images: int = 200, device: str = "cpu") -> None:
    from .storage.verify import format_info, info

    start = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    url, data_dir = extract_demo_store(out, n_images, device)
    _banner("3/5 vlcache store info")
    print(format_info(info(url)))
    caption_table = train_demo_captioners(url, out, device)
    match_scores = train_demo_matcher(url, out, device)
    _banner("results")
    print("captioning (test split; baseline vs +ICA, 1 seed; standardised features):\n"
          + caption_table)
    print("\nmatching (SCAN t2i, test split): " + ", ".join(
        f"{k} {match_scores[k]:.1f}" for k in ("i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5", "rsum") if k in match_scores))
    print(f"\nfigures: {out / 'runs'}/*/*/figures/ and {out / 'runs'}/scan/figures/")
    print(f"demo finished in {time.perf_counter() - start:.0f}s; outputs under {out}/")


# Small models so the demo trains in minutes on two CPU cores; the method is the paper's, the sizes are not.
# The loss is the default recipe (sgrvinod's: doubly stochastic term averaged over cells, alpha_c = 1);
# grid features are standardised because random-init ResNet features are tiny (README, "Results").
DEMO_CAPTION = ["epochs=8", "batch_images=16", "embed_dim=128", "attn_dim=128", "hidden_dim=128",
                "dropout=0.3", "num_workers=1", "patience=0", "checkpoint_every=0", "log_every=10",
                "feat_norm=standardize"]
DEMO_MATCH = ["epochs=12", "batch_size=16", "embed=256", "word_dim=128", "region_norm=true", "lr=5e-4",
              "lr_decay_epoch=10", "captions=one", "num_workers=0"]


def train_demo_captioners(url: str, out: Path, device: str) -> str:
    from .stages.caption.experiment import run_ica_experiment

    _banner("4/5 Show-Attend-Tell: baseline and +ICA (vlcache experiment ica)")
    res = run_ica_experiment(url, seeds=1, name="ica", runs_root=out / "runs", figures=4,
                             overrides=DEMO_CAPTION + [f"device={device}"])
    return res["table"]


def train_demo_matcher(url: str, out: Path, device: str) -> dict:
    from .stages.match.evaluate import evaluate_match
    from .stages.match.train import MatchTrainConfig, train_match

    _banner("5/5 SCAN image-text matching (vlcache train match / evaluate match)")
    run = out / "runs" / "scan"
    cfg = load_config(MatchTrainConfig, options={"model": "scan", "store": url},
                      overrides=DEMO_MATCH + [f"device={device}"])
    train_match(cfg, run)
    return evaluate_match(run, "test", figures=4)

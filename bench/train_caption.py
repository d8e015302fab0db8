"""Benchmark: a captioning training step fed from the store vs. the same step computing its inputs online.

    python bench/train_caption.py [--device cpu] [--images 64] [--json out.json]

Both paths train the same Show-Attend-Tell (+ICA) model (512-d, as METHODS.md section 1) with the same
step (``caption_train.step_losses`` + Adam) on the same synthetic images:

* **store**: batches streamed by ``CaptionBatches`` from a store (grid features, instances, matches),
  DataLoader workers building captions and ICA targets; we time whole steps and the part spent waiting
  for the next batch (target: at most 10% of step time).
* **online**: what the store saves, per batch: decode the image files, run Mask R-CNN
  (torchvision maskrcnn_resnet50_fpn_v2, random weights, score threshold 0 so the mask head sees a
  full set of boxes, as trained weights would give) and ResNet-101 C5 -> grid features, then the same
  transform and training step. Captions and matches come from the store (text work, not the saving).

Reported: seconds per training sample (one caption of one image) for each path and their ratio (target
>= 50x on CPU). Online "per sample" runs the detector and backbone once per (image, caption) sample, as
a loader that shuffles caption samples (Show-Attend-Tell's) must; "amortised" is the best case of one
forward shared by all of an image's captions (about 5), i.e. image-level batches. Also the data-wait
share of the store path, and machine info. The store is built once (cached in the temp dir) from the
synthetic dataset with the annotations detector and a random-init ResNet-101.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def build_store(n_images: int, size: int, input_size: int, grid: int, workdir: Path) -> tuple[str, Path]:
    from vlcache.pipeline.config import load_config
    from vlcache.pipeline.datasets import load_dataset
    from vlcache.pipeline.synth import generate
    from vlcache.stages.extract.config import ExtractConfig
    from vlcache.stages.extract.loop import extract

    tag = hashlib.sha1(json.dumps([n_images, size, input_size, grid]).encode()).hexdigest()[:10]
    root = workdir / tag
    url, data = str(root / "store.zarr"), root / "data"
    if (root / "ready").is_file():
        return url, data
    generate(data, n_images=n_images, seed=0, size=(size, size))
    dataset = load_dataset(data / "dataset_synth.json", instances=data / "instances.json")
    cfg = load_config(ExtractConfig, overrides=[
        "detector.backend=annotations", "features.weights=none", f"features.input_size={input_size}",
        f"features.grid_size={grid}", "block_size=16", "runtime.num_workers=0", "runtime.batch_size=8",
        'groups=["instances","grid","matches"]'])
    extract(dataset, url, cfg, overwrite=True, progress=False)
    (root / "ready").write_text(url)
    return url, data


def _setup(url: str, device: torch.device):
    from vlcache.stages.common.store_rows import split_rows, train_tokens
    from vlcache.stages.caption.data import store_info
    from vlcache.stages.caption.train import CaptionTrainConfig
    from vlcache.stages.caption.sat import ShowAttendTell
    from vlcache.stages.common.vocab import Vocab

    info = store_info(url)
    vocab = Vocab.build(train_tokens(url, split_rows(url, "train")), min_count=5)
    cfg = CaptionTrainConfig(store=url, device=str(device))
    torch.manual_seed(0)
    model = ShowAttendTell(len(vocab), info["grid_dim"], cfg.embed_dim, cfg.attn_dim, cfg.hidden_dim, cfg.dropout,
                           vocab.pad_id, vocab.start_id, vocab.end_id).to(device)
    return cfg, vocab, info, model, torch.optim.Adam(model.parameters(), lr=cfg.lr)


def _train_step(model, opt, batch, cfg, device) -> int:
    from vlcache.stages.caption.train import step_losses

    terms = step_losses(model, batch, cfg, device)
    opt.zero_grad(set_to_none=True)
    terms["loss"].backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return int(batch["captions"].shape[0])


def bench_store(url: str, device: torch.device, batch_images: int, steps: int, workers: int) -> dict:
    from vlcache.stages.caption.data import CaptionBatches, CaptionTransform, caption_loader

    cfg, vocab, info, model, opt = _setup(url, device)
    tf = CaptionTransform(vocab, info["grid_size"], ica=True, url=url)
    loader, sampler = caption_loader(CaptionBatches(url, tf, split="train"), batch_images, shuffle=True,
                                     num_workers=workers, pin_memory=device.type == "cuda")
    warmup, done, samples, wait, total, epoch = 1, 0, 0, 0.0, 0.0, 0
    while done < steps + warmup:
        sampler.set_epoch(epoch)
        it = iter(loader)
        while done < steps + warmup:
            t0 = time.perf_counter()
            batch = next(it, None)
            if batch is None:
                break
            t1 = time.perf_counter()
            n = _train_step(model, opt, batch, cfg, device)
            if done >= warmup:  # worker start-up and first-touch costs are not steady state
                samples, wait, total = samples + n, wait + (t1 - t0), total + (time.perf_counter() - t0)
            done += 1
        epoch += 1
    return {"steps": steps, "samples": samples, "seconds": total, "sec_per_sample": total / samples,
            "data_wait_share": wait / total}


def bench_online(url: str, data: Path, device: torch.device, batch_images: int, batches: int) -> dict:
    from PIL import Image

    from vlcache.stages.extract.detector_torchvision import TorchvisionDetector
    from vlcache.stages.extract.features import FeatureExtractor, grid_features
    from vlcache.stages.caption.data import CaptionTransform, caption_fields
    from vlcache.stages.common.store_rows import split_rows
    from vlcache.storage.streaming import StoreBatchDataset

    cfg, vocab, info, model, opt = _setup(url, device)
    torch.manual_seed(0)
    detector = TorchvisionDetector("v2", weights="none", score_threshold=0.0, device=str(device), amp=False)
    extractor = FeatureExtractor(weights="none", input_size=448).to(device)
    tf = CaptionTransform(vocab, info["grid_size"], ica=True, url=url)
    text = StoreBatchDataset(url, [f for f in caption_fields(True) if f.split("/")[0] in ("captions", "matches", "images")],
                             split="train")
    rows = split_rows(url, "train")
    paths = text.reader.backend().read("images/path", slice(None))
    samples, images_done, total, parts = 0, 0, 0.0, {"decode": 0.0, "detector": 0.0, "backbone": 0.0, "step": 0.0}
    for k in range(batches + 1):  # the first batch warms up the models and is not counted
        sel = rows[k * batch_images:(k + 1) * batch_images]
        t0 = time.perf_counter()
        raw = text[sel]
        images = [np.asarray(Image.open(data / str(paths[r])).convert("RGB")) for r in raw["row"].tolist()]
        t1 = time.perf_counter()
        with torch.inference_mode():
            dets = detector.detect(images)
            t2 = time.perf_counter()
            grid = grid_features(extractor(extractor.prepare(images)).float(), info["grid_size"]).half().cpu()
        t3 = time.perf_counter()
        cap = 32  # the store's instance capacity: the same padded layout the transform reads
        raw["grid/feats"] = grid
        raw["instances/count"] = torch.tensor([min(len(d), cap) for d in dets])
        for name, fill, shape in (("labels", -1, ()), ("scores", 0, ()), ("boxes", 0, (4,)), ("masks", 0, (28, 28))):
            arr = np.full((len(dets), cap, *shape), fill, dtype=np.float32)
            for i, d in enumerate(dets):
                v = getattr(d, name)[:cap]
                arr[i, :len(v)] = v * 255 if name == "masks" else v
            raw[f"instances/{name}"] = torch.from_numpy(arr.astype(np.uint8) if name == "masks" else arr)
        batch = tf(raw)
        n = _train_step(model, opt, batch, cfg, device)
        t4 = time.perf_counter()
        if k > 0:
            samples, images_done, total = samples + n, images_done + len(images), total + (t4 - t0)
            for key, dt in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                parts[key] += dt
    per_image = (parts["decode"] + parts["detector"] + parts["backbone"]) / images_done
    step = parts["step"] / samples
    return {"batches": batches, "images": images_done, "samples": samples, "seconds": total,
            "sec_per_image_extraction": per_image, "sec_per_sample_step": step,
            "sec_per_sample": per_image + step,  # one detector + backbone forward per caption sample
            "sec_per_sample_amortised": total / samples,  # one forward shared by all captions of an image
            "share": {k: v / total for k, v in parts.items()}}


def machine() -> dict:
    info = {"python": sys.version.split()[0], "platform": platform.platform(), "cpu_count": os.cpu_count(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "load_avg": os.getloadavg() if hasattr(os, "getloadavg") else None}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--images", type=int, default=64, help="synthetic images in the store")
    p.add_argument("--size", type=int, default=160, help="synthetic image side")
    p.add_argument("--grid", type=int, default=14)
    p.add_argument("--batch-images", type=int, default=8)
    p.add_argument("--store-steps", type=int, default=5)
    p.add_argument("--online-batches", type=int, default=2)
    p.add_argument("--online-batch-images", type=int, default=1)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), f"vlcache-bench-{os.getuid()}"))
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    t0 = time.time()
    url, data = build_store(args.images, args.size, 448, args.grid, Path(args.workdir))
    built = time.time() - t0
    store = bench_store(url, device, args.batch_images, args.store_steps, args.workers)
    online = bench_online(url, data, device, args.online_batch_images, args.online_batches)
    ratio = online["sec_per_sample"] / store["sec_per_sample"]
    amortised = online["sec_per_sample_amortised"] / store["sec_per_sample"]
    result = {"machine": machine(), "device": str(device), "store_url": url, "store_build_s": round(built, 1),
              "store": store, "online": online, "speedup": ratio, "speedup_amortised": amortised,
              "targets": {"speedup>=50": ratio >= 50, "data_wait<=10%": store["data_wait_share"] <= 0.10}}
    print(f"machine: {json.dumps(result['machine'])}")
    print(f"device {device}; grid {args.grid}x{args.grid} x 2048; model 512-d SAT + ICA; batch {args.batch_images} images")
    print(f"store : {1e3 * store['sec_per_sample']:8.2f} ms/sample over {store['samples']} samples, "
          f"data wait {100 * store['data_wait_share']:.1f}% of step time (target <= 10%)")
    print(f"online: {1e3 * online['sec_per_image_extraction']:8.2f} ms/image for decode + Mask R-CNN + ResNet-101 "
          f"({online['images']} images; Mask R-CNN {100 * online['share']['detector']:.0f}%, ResNet-101 "
          f"{100 * online['share']['backbone']:.0f}% of the online time), step {1e3 * online['sec_per_sample_step']:.2f} ms/sample")
    print(f"online per sample (a forward per caption sample): {1e3 * online['sec_per_sample']:8.2f} ms/sample")
    print(f"online amortised (one forward per image, {online['samples'] / online['images']:.1f} captions): "
          f"{1e3 * online['sec_per_sample_amortised']:8.2f} ms/sample")
    print(f"speedup: {ratio:.1f}x per sample (target >= 50x); {amortised:.1f}x amortised over an image's captions")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1, default=str))
    return result


if __name__ == "__main__":
    main()

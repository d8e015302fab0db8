"""Build stage one's models from a config, and run them on a batch of decoded images."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ...pipeline.config import check_choices
from ...pipeline.records import Dataset, ImageRecord
from .config import ExtractConfig
from .detectors import DETECTORS, Detections
from .features import FeatureExtractor, grid_features, region_features, to_float16_checked
from .matching import ClassWordMatcher, load_class_words, load_not_class_phrases
from .regions import select_regions
from .rows import RowOutput


@dataclass
class ExtractionModels:
    cfg: ExtractConfig
    detector: object | None
    extractor: FeatureExtractor | None
    matcher: ClassWordMatcher | None
    class_names: list[str]
    class_words_source: str
    # host wall seconds spent in run(), by part: detector, backbone (ResNet C5), post (pooling, regions)
    seconds: dict = field(default_factory=lambda: {"detector": 0.0, "backbone": 0.0, "post": 0.0})

    @property
    def dims(self) -> dict:
        width = self.extractor.channels if self.extractor is not None else 2048
        from_detector = self.cfg.features.region_source == "detector" and self.detector is not None
        return {"region_dim": self.detector.roi_feature_dim if from_detector else width, "grid_dim": width}

    def describe(self) -> dict:
        return {
            "detector": self.detector.config() if self.detector is not None else None,
            "features": self.extractor.config() if self.extractor is not None else None,
            "regions": self._region_description() if "regions" in self.cfg.groups else None,
            "matching": {"mode": self.cfg.match, "class_words": self.class_words_source},
        }

    def _region_description(self) -> dict:
        f = self.cfg.features
        count = (f"fixed {f.fixed_regions}" if f.region_mode == "fixed"
                 else f"adaptive: conf >= {f.region_conf}, {f.min_regions}..{f.max_regions}")
        scale = (f"butd: shorter side {f.region_min_size}, longer <= {f.region_max_size}, aspect kept"
                 if f.region_scale == "butd" else f"square {f.input_size}x{f.input_size} (the grid pass)")
        source = (f"detector box head ({self.dims['region_dim']}-d representation of each RoI)"
                  if f.region_source == "detector"
                  else f"{f.backbone} C5, RoIAlign 7x7, mean-pooled ({self.dims['region_dim']}-d)")
        return {"selection": "BUTD generate_tsv.py: RoIs scored by the box head, per-class NMS 0.3, "
                             "confidence = max kept class score; label = arg-max class",
                "count": count, "feature_source": source, "feature_dim": self.dims["region_dim"],
                "feature_scale": scale if f.region_source == "backbone" else "the detector's input"}

    @torch.inference_mode()
    def run(self, images: list[np.ndarray], records: list[ImageRecord]) -> list[RowOutput]:
        groups, f = set(self.cfg.groups), self.cfg.features
        outs = [RowOutput() for _ in images]
        dets: list[Detections] | None = None
        t0 = time.perf_counter()
        if self.detector is not None:
            dets = self.detector.detect(images, records=records)
            self.seconds["detector"] += time.perf_counter() - t0
            if "instances" in groups:
                for out, d in zip(outs, dets):
                    out.inst_boxes, out.inst_labels, out.inst_scores, out.inst_masks = d.boxes, d.labels, d.scores, d.masks
        if "regions" in groups and f.region_source == "detector":
            self._regions(images, records, dets, None, outs)
        if self.extractor is None:
            return outs
        square = None
        if "grid" in groups or (f.region_scale == "square" and f.region_source == "backbone"):
            square = self._timed_c5(self.extractor.prepare(images))
        t = time.perf_counter()
        if "grid" in groups:
            grid = grid_features(square, f.grid_size)
            for k, (out, rec) in enumerate(zip(outs, records)):
                out.grid_feats = to_float16_checked(grid[k], f"grid features of image {rec.id} ({rec.path})")
        self.seconds["post"] += time.perf_counter() - t
        if "regions" in groups and f.region_source == "backbone":
            self._regions(images, records, dets, square, outs)
        return outs

    def _timed_c5(self, batch: torch.Tensor) -> torch.Tensor:
        """The backbone's C5 of a prepared batch; its wall time goes to ``seconds["backbone"]``."""
        t = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.float16, enabled=self.cfg.runtime.amp and batch.is_cuda):
            c5 = self.extractor(batch).float()
        if c5.is_cuda:
            torch.cuda.synchronize(c5.device)  # so the split between backbone and post is honest
        self.seconds["backbone"] += time.perf_counter() - t
        return c5

    def _regions(self, images, records, dets: list[Detections], square, outs: list[RowOutput]) -> None:
        """BUTD region selection (METHODS section 11), then RoIAlign on C5 at ``features.region_scale``."""
        f = self.cfg.features
        t, backbone_before = time.perf_counter(), self.seconds["backbone"]
        fixed = f.fixed_regions if f.region_mode == "fixed" else None
        chosen = [select_regions(d, conf=f.region_conf, min_regions=f.min_regions, max_regions=f.max_regions,
                                 fixed=fixed) for d in dets]
        sizes = [img.shape[:2] for img in images]
        if f.region_source == "detector":  # the box head's representation of each chosen RoI
            feats = [d.roi_feats[c[0]] for d, c in zip(dets, chosen)]
        elif f.region_scale == "square":
            feats = region_features(square, [c[1] for c in chosen], sizes, self.extractor.input_size)
        else:  # BUTD's test scale: one image at a time, as generate_tsv.py
            feats = []
            for img, c, size in zip(images, chosen, sizes):
                batch, scaled = self.extractor.prepare_scaled(img, f.region_min_size, f.region_max_size)
                feats += region_features(self._timed_c5(batch), [c[1]], [size], [scaled])
        for out, (_, b, l, s), x, rec in zip(outs, chosen, feats, records):
            out.reg_boxes, out.reg_labels, out.reg_scores = b, l, s
            out.reg_feats = to_float16_checked(x, f"region features of image {rec.id} ({rec.path})")
        self.seconds["post"] += time.perf_counter() - t - (self.seconds["backbone"] - backbone_before)


def _resolve_class_words(class_names: list[str], dataset: Dataset, explicit: str | Path | None):
    """Synonym table: an explicit file > ``class_words.txt`` beside the dataset > the curated COCO table."""
    if explicit is not None:
        return load_class_words(explicit), str(explicit)
    beside = [Path(s).parent / "class_words.txt" for s in dataset.sources]
    for path in beside:
        if path.is_file():
            table = load_class_words(path)
            if set(table) == set(class_names):
                return table, str(path)
    curated = load_class_words()
    if set(class_names) <= set(curated):
        return curated, "curated COCO table (stages/extract/class_words.txt)"
    return {}, "class names only (no synonym table found)"


def build_models(cfg: ExtractConfig, dataset: Dataset, class_words: str | Path | None = None) -> ExtractionModels:
    """Build the detector, feature extractor and matcher ``cfg`` asks for.

    Models are built under ``torch.manual_seed(cfg.seed)`` inside a forked RNG state, so random-init
    weights (``none``) are identical on every run and every rank (resumed and multi-rank stores then
    equal an uninterrupted single-process one), and the caller's RNG state is left untouched.
    """
    check_choices(cfg)  # a config built in Python gets the same check as one from --set or a file
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return _build_models(cfg, dataset, class_words)


def _build_models(cfg: ExtractConfig, dataset: Dataset, class_words: str | Path | None) -> ExtractionModels:
    groups, d, f = set(cfg.groups), cfg.detector, cfg.features
    device = cfg.runtime.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available on this machine")
    detector = None
    if groups & {"instances", "regions", "matches"}:
        if d.backend == "annotations":
            if not dataset.classes:
                raise ValueError(f"detector 'annotations' needs instance annotations; {dataset.name} has none "
                                 "(pass --instances FILE)")
            detector = DETECTORS.build("annotations", class_names=dataset.classes, max_instances=d.max_instances)
        elif d.backend == "torchvision":
            detector = DETECTORS.build("torchvision", arch=d.arch, weights=d.weights,
                                       score_threshold=d.score_threshold, max_instances=d.max_instances,
                                       min_size=d.min_size, max_size=d.max_size, proposals=d.proposals,
                                       device=device, amp=cfg.runtime.amp,
                                       roi_features="regions" in groups and f.region_source == "detector")
        else:
            detector = DETECTORS.build(d.backend, config=d.config_file, weights=d.weights,
                                       score_threshold=d.score_threshold, max_instances=d.max_instances,
                                       min_size=d.min_size, max_size=d.max_size, proposals=d.proposals,
                                       device=device, amp=cfg.runtime.amp,
                                       **({"roi_features": True} if "regions" in groups and f.region_source == "detector"
                                          else {}))  # asked only when needed: a plugin backend may not take it
    if "regions" in groups and f.region_source == "detector" and not getattr(detector, "roi_features", False):
        raise ValueError(f"features.region_source=detector needs a detector that gives its box head's RoI "
                         f"features (torchvision, detectron2 with standard RoI heads); detector.backend={d.backend} "
                         "does not")
    extractor = None
    if "grid" in groups or ("regions" in groups and f.region_source == "backbone"):
        extractor = FeatureExtractor(weights=f.weights, input_size=f.input_size, backbone=f.backbone).to(device)
    class_names = list(detector.class_names) if detector is not None else list(dataset.classes or [])
    matcher, source = None, "none"
    if "matches" in groups:
        table, source = _resolve_class_words(class_names, dataset, class_words)
        synonyms = {c: w for c, w in table.items() if c in class_names}
        own = Path(source) if Path(source).is_file() else None  # a table file of its own: its own ! line
        matcher = ClassWordMatcher(class_names, synonyms, mode=cfg.match,
                                   not_classes=load_not_class_phrases(own) if own else None)
    return ExtractionModels(cfg, detector, extractor, matcher, class_names, source)

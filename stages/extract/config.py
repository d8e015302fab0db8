"""The extraction config: everything that decides a store's content, plus runtime knobs.

Content fields are recorded in the store's attributes and compared on resume; runtime fields
(``runtime.*``: batch size, workers, device, ...) are not, so a rerun may change them freely.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Group = Literal["instances", "regions", "grid", "matches"]  # what a store holds besides images/captions


@dataclass
class DetectorConfig:
    backend: str = "torchvision"  # torchvision | detectron2 | annotations
    arch: Literal["v2", "v1"] = "v2"  # torchvision: v2 (maskrcnn_resnet50_fpn_v2) | v1
    weights: str = "DEFAULT"  # DEFAULT (torchvision enum) | PATH | none (random init)
    config_file: str | None = None  # detectron2: model-zoo name or a config file
    score_threshold: float = 0.05  # low on purpose: thresholds are choices made at training time
    max_instances: int = 32
    min_size: int = 800  # input size (torchvision GeneralizedRCNNTransform)
    max_size: int = 1333
    proposals: int = 1000  # RPN proposals kept per image at test time (pre- and post-NMS top-n)


@dataclass
class FeatureConfig:
    backbone: Literal["resnet101", "resnet50", "resnet34", "resnet18"] = "resnet101"  # C5 of ResNet-101, as
    # BUTD and Show-Attend-Tell use (a `vlcache train detector` checkpoint as weights brings its own trunk)
    weights: str = "DEFAULT"  # DEFAULT | PATH | none
    input_size: int = 448  # grid features: images resized to input_size^2 for the C5 map (SAT convention)
    grid_size: int = 14
    # adaptive: confidence >= region_conf, min_regions..max_regions per image (BUTD) | fixed: fixed_regions
    region_mode: Literal["adaptive", "fixed"] = "adaptive"
    region_conf: float = 0.2
    min_regions: int = 10
    max_regions: int = 100  # adaptive: at most this many (BUTD: 10..100); the store's capacity R
    # butd: C5 of a pass at shorter side region_min_size, longer <= region_max_size, aspect kept (BUTD's
    # test scale) | square: pooled from the grid's input_size^2 pass (cheaper)
    region_scale: Literal["butd", "square"] = "butd"
    # backbone: RoIAlign on the C5 of the backbone above (2048-d for ResNet-50/101) | detector: the
    # detector's box-head representation of each region ("FPN fc7", 1024-d for torchvision)
    region_source: Literal["backbone", "detector"] = "backbone"
    region_min_size: int = 600
    region_max_size: int = 1000
    fixed_regions: int = 36


@dataclass
class RuntimeConfig:
    batch_size: int = 4
    num_workers: int = 2
    device: str = "cpu"
    amp: bool = True  # autocast on CUDA only
    strict: bool = False  # stop at the first bad image


@dataclass
class ExtractConfig:
    groups: tuple[Group, ...] = ("instances", "regions", "grid", "matches")
    block_size: int = 64  # rows per chunk; a dataset of fewer rows gets one block of its own size
    match: Literal["synonyms", "exact"] = "synonyms"  # synonyms | exact
    split: str | None = None  # only this split
    limit: int | None = None  # only the first N images (after the split filter)
    seed: int = 0  # torch seed for building models: random-init (weights none) stores are reproducible
    detector: DetectorConfig = field(default_factory=DetectorConfig)
    features: FeatureConfig = field(default_factory=FeatureConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

"""The ``vlcache train detector`` config: what a detector run trains with (saved as its config.yaml)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class DetectorTrainConfig:
    dataset: str | None = None  # Karpathy/COCO-captions/JSONL file giving the train/val splits (optional)
    instances: list[str] = field(default_factory=list)  # COCO instances JSON (training, or all splits)
    val_instances: list[str] = field(default_factory=list)  # without --dataset: the validation images
    image_root: str | None = None
    val_image_root: str | None = None
    backbone: Literal["resnet18", "resnet34", "resnet50", "resnet101"] = "resnet50"
    weights: str = "none"  # none | DEFAULT (torchvision COCO Mask R-CNN R50-FPN) | PATH (a detector to fine-tune)
    backbone_weights: str = "none"  # none | DEFAULT (torchvision ImageNet) | PATH (a resnet state dict)
    trainable_layers: int | None = None  # ResNet stages trained: 5 from scratch, 3 from ImageNet (torchvision)
    fpn_channels: int = 256  # torchvision's width; smaller (e.g. 64) narrows FPN and heads for CPU
    min_size: int = 800
    max_size: int = 1333
    rpn_batch_size_per_image: int = 256
    box_batch_size_per_image: int = 512
    rpn_pre_nms_top_n_train: int = 2000
    rpn_post_nms_top_n_train: int = 2000
    epochs: int = 26
    lr_steps: list[int] = field(default_factory=lambda: [16, 22])
    lr_gamma: float = 0.1
    batch_size: int = 2
    lr: float | None = None  # default 0.02 * batch_size / 16 (the reference's linear scaling)
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_iters: int = 1000
    warmup_factor: float = 0.001
    hflip: float = 0.5
    aspect_grouping: bool = True
    max_iters: int | None = None  # stop after this many steps in all (recipes, tests)
    checkpoint_every: int = 200
    log_every: int = 20
    eval_every: int = 1  # epochs between validation AP evaluations (0: only at the end)
    eval_max_images: int | None = None
    amp: bool = True  # CUDA only
    device: str = "cpu"
    num_workers: int = 2
    seed: int = 0

    @property
    def base_lr(self) -> float:
        return self.lr if self.lr is not None else 0.02 * self.batch_size / 16

"""Instance detectors for stage one: one registry, one output type (:class:`Detections`), and the types
and helpers every backend shares.

Backends (``DETECTORS.build(name, **cfg)``), each in its own module, registered here by where it lives
and imported on first use (this module imports none of them):

- ``torchvision`` (``detector_torchvision``): Mask R-CNN R50-FPN v2 (default) or v1. The model's own modules are called in order
  (transform, backbone, RPN, RoI heads) and ``transform.postprocess`` is skipped, so the 28x28 mask
  probabilities come out exactly as the mask head produced them, before any pasting; boxes are mapped
  back to original pixels with torchvision's ``resize_boxes``. Pasting our output with torchvision's
  ``paste_masks_in_image`` reproduces the full model's output (tested).
- ``detectron2`` (``detector_detectron2``): any model-zoo config or config file; detectron2 itself is
  imported only when the backend is built (optional dependency).
- ``annotations`` (``detector_annotations``): a dataset's own COCO-format instance annotations in the
  same box + 28x28 form (the oracle run, and what the synthetic demo uses).

Defaults (ours): ``score_threshold=0.05`` so that stored instances keep low-scoring detections and the
score used for merged masks stays a training-time choice (METHODS section 2 uses 0.5);
``max_instances=32`` = the store's instance capacity.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Sequence, runtime_checkable

import numpy as np
import torch
from torch import Tensor

from ...pipeline.registry import Registry

DETECTORS = Registry("detector")
MASK_SIZE = 28

# how to get going offline, naming the per-model flag (and config key) that needs a local file
NO_INTERNET = ("no internet: pass {flag} PATH (a local copy of that file; config key {key}), "
               "or --weights none for random init of every model")
D2_MISSING = (
    "detectron2 is not installed (it is not on PyPI); build it from source into this environment: "
    "pip install --no-build-isolation 'git+https://github.com/facebookresearch/detectron2.git' "
    "(a C++ compiler is all a CPU build needs; README.md's detectron2 section has the tested commit and the GPU build)"
)


class DetectorError(ValueError):
    """Bad detector configuration, weights or input; the message names what is wrong."""


class ImageDataError(DetectorError):
    """One image's own data is wrong (e.g. its annotations are for another size): extraction records it for
    that image and goes on, unless --strict."""


@dataclass
class Detections:
    """One image's detections; every array is numpy on the CPU.

    boxes (n,4) float32 xyxy in original image pixels; labels (n,) int64 contiguous class indices
    0..K-1 into the detector's ``class_names`` (no background); scores (n,) float32; masks (n,M,M)
    float32 box-relative probabilities in [0, 1] as the mask head produced them (not pasted);
    image_size (h, w). Optional proposals (p,4) float32 in original pixels with their objectness
    ``proposal_scores`` (p,), best first, used to top up bottom-up regions when no RoI scores are given.

    Bottom-up regions (METHODS section 11) are chosen from ``roi_boxes`` (q,4) float32 (original
    pixels): every RoI the box head scored, with ``roi_scores`` (q,K) float32, its foreground class
    probabilities (softmax, background dropped; columns = ``class_names``), and optionally
    ``roi_feats`` (q,D) float32, the box head's representation of each RoI.
    """

    boxes: np.ndarray
    labels: np.ndarray
    scores: np.ndarray
    masks: np.ndarray
    image_size: tuple[int, int]
    proposals: np.ndarray | None = None
    proposal_scores: np.ndarray | None = None
    roi_boxes: np.ndarray | None = None
    roi_scores: np.ndarray | None = None
    roi_feats: np.ndarray | None = None

    def __post_init__(self):
        self.boxes = _np(self.boxes, np.float32).reshape(-1, 4)
        self.labels = _np(self.labels, np.int64).reshape(-1)
        self.scores = _np(self.scores, np.float32).reshape(-1)
        self.masks = _np(self.masks, np.float32)
        n = len(self.boxes)
        if self.masks.size == 0:
            self.masks = self.masks.reshape(0, MASK_SIZE, MASK_SIZE) if n == 0 else self.masks
        if len(self.labels) != n or len(self.scores) != n or self.masks.ndim != 3 or len(self.masks) != n:
            raise DetectorError(
                f"inconsistent detections: boxes {self.boxes.shape}, labels {self.labels.shape}, "
                f"scores {self.scores.shape}, masks {self.masks.shape}"
            )
        self.image_size = (int(self.image_size[0]), int(self.image_size[1]))
        if self.proposals is not None:
            self.proposals = _np(self.proposals, np.float32).reshape(-1, 4)
            if self.proposal_scores is None:
                self.proposal_scores = np.zeros(len(self.proposals), np.float32)
            self.proposal_scores = _np(self.proposal_scores, np.float32).reshape(-1)
            if len(self.proposal_scores) != len(self.proposals):
                raise DetectorError("proposal_scores and proposals differ in length")
        if (self.roi_boxes is None) != (self.roi_scores is None):
            raise DetectorError("roi_boxes and roi_scores come together")
        if self.roi_boxes is not None:
            self.roi_boxes = _np(self.roi_boxes, np.float32).reshape(-1, 4)
            self.roi_scores = _np(self.roi_scores, np.float32)
            q = len(self.roi_boxes)
            if self.roi_scores.ndim != 2 or len(self.roi_scores) != q:
                raise DetectorError(f"roi_scores {self.roi_scores.shape} must be (q, K) for {q} roi_boxes")
            if self.roi_feats is not None:
                self.roi_feats = _np(self.roi_feats, np.float32)
                if self.roi_feats.ndim != 2 or len(self.roi_feats) != q:
                    raise DetectorError(f"roi_feats {self.roi_feats.shape} must be (q, D) for {q} roi_boxes")

    def __len__(self) -> int:
        return len(self.boxes)


@runtime_checkable
class Detector(Protocol):
    class_names: list[str]
    weights_id: str
    weights_sha256: str | None

    def detect(self, images: Sequence[np.ndarray] | Sequence[Tensor], records=None) -> list[Detections]: ...

    def config(self) -> dict[str, Any]: ...


def _np(x, dtype) -> np.ndarray:
    if isinstance(x, Tensor):
        x = x.detach().float().cpu().numpy() if x.is_floating_point() else x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_state_dict(path: str | os.PathLike, what: str) -> dict[str, Tensor]:
    """A state dict from ``path`` (``torch.load(weights_only=True)``; also accepts {"model": sd})."""
    p = Path(path)
    if not p.is_file():
        raise DetectorError(f"{what} weights file not found: {p} (or pass 'DEFAULT' or 'none')")
    try:
        sd = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        raise DetectorError(f"{p}: not a loadable weights-only checkpoint ({type(e).__name__}: {e})") from None
    for key in ("model", "state_dict"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(isinstance(v, Tensor) for v in sd.values()):
        raise DetectorError(f"{p}: expected a state dict of tensors")
    return sd


def to_chw_float(img, index: int = 0) -> Tensor:
    """(H,W,3) uint8 numpy / (3,H,W) uint8 or float-in-[0,1] tensor -> (3,H,W) float32 in [0,1]."""
    if isinstance(img, np.ndarray):
        if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
            raise DetectorError(f"image {index}: expected (H, W, 3) uint8, got {img.shape} {img.dtype}")
        # decoded images are read-only views of PIL buffers; torch warns on those, so copy them first
        arr = np.ascontiguousarray(img) if img.flags.writeable else np.array(img, order="C")
        return torch.from_numpy(arr).permute(2, 0, 1).float().div_(255)
    if isinstance(img, Tensor):
        if img.ndim != 3 or img.shape[0] != 3:
            raise DetectorError(f"image {index}: expected a (3, H, W) tensor, got {tuple(img.shape)}")
        return img.float().div(255) if img.dtype == torch.uint8 else img.float()
    raise DetectorError(f"image {index}: expected a numpy array or tensor, got {type(img).__name__}")


def to_hwc_uint8(img, index: int = 0) -> np.ndarray:
    if isinstance(img, np.ndarray):
        to_chw_float(img, index)  # validates
        return img
    return (to_chw_float(img, index).clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()


def grid_boxes(height: int, width: int, levels: Sequence[int] = (1, 2, 3, 4)) -> np.ndarray:
    """Deterministic multi-scale grid of boxes (the whole image, then 2x2, 3x3, ... cells), xyxy."""
    out = []
    for n in levels:
        xs, ys = np.linspace(0, width, n + 1), np.linspace(0, height, n + 1)
        out += [(xs[j], ys[i], xs[j + 1], ys[i + 1]) for i in range(n) for j in range(n)]
    return np.asarray(out, np.float32).reshape(-1, 4)


def fetch_torchvision_weights(weights, flag: str = "--detector-weights", key: str = "detector.weights") -> str:
    """Download torchvision ``weights`` into the torch hub cache (a no-op when cached), before any model
    is built, so that offline use fails fast with a message naming ``flag`` (the model's own option);
    returns the file's sha256."""
    try:
        torch.hub.load_state_dict_from_url(weights.url, progress=True, check_hash=True, weights_only=True)
    except OSError as e:  # URLError and socket errors
        raise DetectorError(f"could not fetch {weights.url} ({e}); "
                            + NO_INTERNET.format(flag=flag, key=key)) from None
    return sha256_file(Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url))


def coco_class_map(categories: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """torchvision COCO labels (ids 1..90 with 'N/A' gaps) -> contiguous names and a label lookup table.

    ``lut[torchvision_label]`` is the contiguous index, or -1 for '__background__' and 'N/A'.
    """
    names, lut = [], np.full(len(categories), -1, np.int64)
    for i, name in enumerate(categories):
        if name not in ("__background__", "N/A"):
            lut[i] = len(names)
            names.append(name)
    return names, lut


def _autocast(device: torch.device, amp: bool):
    return torch.autocast("cuda", dtype=torch.float16, enabled=amp and device.type == "cuda")


# The backends, each in its own module below this one, imported when first built (so this module imports
# none of them: no cycle, and detectron2 stays optional).
DETECTORS.register_lazy("torchvision", f"{__package__}.detector_torchvision:TorchvisionDetector")
DETECTORS.register_lazy("detectron2", f"{__package__}.detector_detectron2:Detectron2Detector")
DETECTORS.register_lazy("annotations", f"{__package__}.detector_annotations:AnnotationsDetector")

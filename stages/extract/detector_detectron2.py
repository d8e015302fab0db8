"""The ``detectron2`` detector backend (registered in ``detectors.DETECTORS``): any model-zoo config or
config file. detectron2 is not on PyPI; it is imported only when the backend is built
(:func:`import_detectron2`), with install instructions when it is absent.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from .detectors import (
    D2_MISSING,
    NO_INTERNET,
    Detections,
    DetectorError,
    _autocast,
    sha256_file,
    to_hwc_uint8,
)


class Detectron2MissingError(DetectorError, ImportError):
    """detectron2 is not importable; the message says how to build it (a ValueError too, so the CLI
    prints it as one line)."""


def import_detectron2():
    """Import detectron2 or raise the install instructions (it is an optional, source-built dependency)."""
    try:
        import detectron2  # noqa: F401
    except ImportError:
        raise Detectron2MissingError(D2_MISSING) from None
    return detectron2


ZOO_EXAMPLE = "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml"


def _model_zoo_dir() -> Path:
    """detectron2's ``model_zoo`` package folder, found without importing it: ``detectron2.model_zoo``
    imports ``pkg_resources``, which setuptools >= 81 no longer ships."""
    import importlib.util

    spec = importlib.util.find_spec("detectron2.model_zoo")
    if spec is None or not spec.submodule_search_locations:
        raise DetectorError("this detectron2 build has no model_zoo package; pass a config file instead of a zoo name")
    return Path(list(spec.submodule_search_locations)[0])


def zoo_config_file(name: str) -> Path:
    """The file of model-zoo config ``name`` (what ``model_zoo.get_config_file`` returns)."""
    path = _model_zoo_dir() / "configs" / name
    if not path.is_file():
        raise DetectorError(f"{name!r} is neither a config file nor a detectron2 model-zoo name "
                            f"(zoo names look like {ZOO_EXAMPLE!r})")
    return path


def zoo_checkpoint_url(name: str) -> str:
    """The trained checkpoint URL of model-zoo config ``name`` (what ``model_zoo.get_checkpoint_url``
    returns), read from ``model_zoo.py``'s own table without importing it (see :func:`_model_zoo_dir`)."""
    import ast

    source = (_model_zoo_dir() / "model_zoo.py").read_text()
    found = {}
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            if node.targets[0].id in ("S3_PREFIX", "CONFIG_PATH_TO_URL_SUFFIX"):
                found[node.targets[0].id] = ast.literal_eval(node.value)
    if set(found) != {"S3_PREFIX", "CONFIG_PATH_TO_URL_SUFFIX"}:
        raise DetectorError("cannot read detectron2's model-zoo checkpoint table; pass --detector-weights PATH")
    key = name.replace(".yaml", "").replace(".py", "")
    if key not in found["CONFIG_PATH_TO_URL_SUFFIX"]:
        raise DetectorError(f"{name}: detectron2's model zoo has no trained checkpoint for it; pass --detector-weights PATH")
    return f"{found['S3_PREFIX']}{key}/{found['CONFIG_PATH_TO_URL_SUFFIX'][key]}"


def _standard_heads(heads) -> bool:
    """RoI heads whose inference is ``StandardROIHeads``' own (not a cascade or another subclass's)."""
    from detectron2.modeling.roi_heads import StandardROIHeads

    return type(heads) is StandardROIHeads and heads.mask_on


def _is_remote(source: str) -> bool:
    return "://" in source  # http(s)://, detectron2://, catalog:// ... (detectron2's PathManager handlers)


class Detectron2Detector:
    """detectron2 Mask R-CNN from a model-zoo config name or a yacs (``.yaml``) config file.

    ``weights``: "DEFAULT" (the zoo checkpoint for a zoo name, or the config's MODEL.WEIGHTS), a PATH or
    URL detectron2's checkpointer reads, or "none". Inference runs the model's modules (preprocess,
    backbone, proposal generator, RoI heads) and then what ``detector_postprocess`` does to boxes —
    rescale to original pixels, clip, drop boxes left empty — but not its mask pasting, so the kept
    ``pred_masks`` are the (n,1,M,M) box-relative probabilities; the store pastes them detectron2's way
    (``mask_paste``, METHODS.md section 12). The instances kept are exactly ``DefaultPredictor``'s.
    """

    DEFAULT_CONFIG = ZOO_EXAMPLE

    def __init__(self, config: str | None = None, weights: str = "DEFAULT", score_threshold: float = 0.05,
                 max_instances: int = 32, min_size: int | None = None, max_size: int | None = None,
                 proposals: int | None = None,
                 device: str = "cpu", amp: bool = True, class_names: Sequence[str] | None = None,
                 roi_features: bool = False):
        import_detectron2()
        from detectron2.config import get_cfg
        from detectron2.data import MetadataCatalog
        from detectron2.data import transforms as T
        from detectron2.modeling import build_model

        config = str(config or self.DEFAULT_CONFIG)
        from_zoo = not Path(config).is_file()
        if config.endswith(".py"):
            raise DetectorError(f"{config}: a LazyConfig (.py) config; the detectron2 backend reads yacs .yaml "
                                f"configs (e.g. {ZOO_EXAMPLE!r})")
        cfg = get_cfg()
        path = zoo_config_file(config) if from_zoo else Path(config)
        try:
            cfg.merge_from_file(str(path))
        except Exception as e:  # yaml syntax errors, unknown keys (KeyError), bad values, a missing _BASE_
            raise DetectorError(f"{path}: not a detectron2 yacs config ({type(e).__name__}: "
                                f"{str(e).splitlines()[0] if str(e) else ''})") from None
        if not cfg.MODEL.MASK_ON:
            raise DetectorError(f"{config}: not an instance-segmentation config (MODEL.MASK_ON is False)")
        cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = float(score_threshold)
        cfg.TEST.DETECTIONS_PER_IMAGE = int(max_instances)
        cfg.MODEL.DEVICE = str(device)
        if min_size is not None:
            cfg.INPUT.MIN_SIZE_TEST = int(min_size)
        if max_size is not None:
            cfg.INPUT.MAX_SIZE_TEST = int(max_size)
        if proposals is not None:
            cfg.MODEL.RPN.PRE_NMS_TOPK_TEST = cfg.MODEL.RPN.POST_NMS_TOPK_TEST = int(proposals)
        source = None
        if weights == "DEFAULT":
            source = zoo_checkpoint_url(config) if from_zoo else cfg.MODEL.WEIGHTS
            if not source:
                raise DetectorError(f"{config}: no MODEL.WEIGHTS in the config; pass --detector-weights PATH, or "
                                    "--weights none")
        elif weights != "none":
            source = str(weights)
        if source and not _is_remote(source) and not Path(source).is_file():  # before the model is built
            raise DetectorError(f"detectron2 weights file not found: {source} (pass --detector-weights PATH to a "
                                "detectron2 checkpoint, DEFAULT or none)")
        cfg.MODEL.WEIGHTS = source or ""
        cfg.freeze()
        self.cfg, self.device, self.amp = cfg, torch.device(device), bool(amp)
        self.model = build_model(cfg).eval()
        self.weights_id, self.weights_sha256 = source or "none (random init)", None
        if source:
            self.weights_sha256 = self._load_weights(source, config)
        num = cfg.MODEL.ROI_HEADS.NUM_CLASSES
        names = list(class_names) if class_names is not None else None
        if names is None and cfg.DATASETS.TEST:
            names = MetadataCatalog.get(cfg.DATASETS.TEST[0]).get("thing_classes", None)
        if names is None or len(names) != num:
            raise DetectorError(f"{config}: cannot tell the {num} class names; pass class_names")
        self.class_names = list(names)
        self.config_name = config
        self.aug = T.ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST] * 2, cfg.INPUT.MAX_SIZE_TEST)
        # BUTD region selection needs every RoI's class probabilities: read where StandardROIHeads computes
        # them (Cascade and other heads keep their own forward, and regions fall back to the proposals)
        self.scores_rois = _standard_heads(self.model.roi_heads)
        self.roi_features = bool(roi_features) and self.scores_rois
        self.roi_feature_dim = (self.model.roi_heads.box_head.output_shape.channels if self.scores_rois else None)

    def _load_weights(self, source: str, config: str) -> str | None:
        """Load a detectron2 checkpoint (local file or URL) into the model; return the file's sha256.

        Every model parameter must come from the checkpoint: detectron2's checkpointer only logs missing
        keys, which would silently leave a random head."""
        from urllib.parse import urlparse

        from detectron2.checkpoint import DetectionCheckpointer
        from detectron2.utils.file_io import PathManager

        class Checkpointer(DetectionCheckpointer):
            incompatible = None

            def _load_model(self, checkpoint):  # keep what load() would only log
                self.incompatible = super()._load_model(checkpoint)
                return self.incompatible

        try:  # as load() does: the query string is an option, not part of the file name
            local = PathManager.get_local_path(urlparse(source)._replace(query="").geturl())
        except OSError as e:  # downloads a URL into detectron2's cache
            raise DetectorError(f"could not fetch {source} ({e}); "
                                + NO_INTERNET.format(flag="--detector-weights", key="detector.weights")) from None
        checkpointer = Checkpointer(self.model)
        try:
            checkpointer.load(source)
        except Exception as e:  # pickle/zip errors, a dict without weights, tensors of the wrong type
            first = str(e).splitlines()[0] if str(e) else ""
            raise DetectorError(f"{source}: not a detectron2 checkpoint ({type(e).__name__}: {first}); pass "
                                "--detector-weights PATH to a .pkl/.pth saved by detectron2, DEFAULT or none") from None
        inc = checkpointer.incompatible
        bad = list(getattr(inc, "missing_keys", [])) + [k for k, *_ in getattr(inc, "incorrect_shapes", [])]
        if bad:
            raise DetectorError(f"{source}: does not fit {config} ({len(bad)} parameters missing or of another "
                                f"shape, e.g. {bad[:3]}); pass the checkpoint trained with this config")
        return sha256_file(local) if Path(local).is_file() else None

    def config(self) -> dict[str, Any]:
        import detectron2

        c = self.cfg
        return {"backend": "detectron2", "config": self.config_name, "config_yaml": c.dump(),
                "weights_id": self.weights_id, "weights_sha256": self.weights_sha256,
                "score_threshold": c.MODEL.ROI_HEADS.SCORE_THRESH_TEST,
                "max_instances": c.TEST.DETECTIONS_PER_IMAGE, "min_size": c.INPUT.MIN_SIZE_TEST,
                "max_size": c.INPUT.MAX_SIZE_TEST, "nms_iou": c.MODEL.ROI_HEADS.NMS_THRESH_TEST,
                "proposals": c.MODEL.RPN.POST_NMS_TOPK_TEST, "mask_size": c.MODEL.ROI_MASK_HEAD.POOLER_RESOLUTION * 2,
                "mask_paste": "detectron2", "num_classes": len(self.class_names), "amp": self.amp,
                "roi_scores": self.scores_rois, "roi_features": self.roi_features,
                "roi_feature_dim": self.roi_feature_dim, "detectron2": detectron2.__version__}

    @torch.inference_mode()
    def detect(self, images, records=None) -> list[Detections]:
        from detectron2.structures import Boxes

        if len(images) == 0:
            return []
        inputs = []
        for i, img in enumerate(images):
            rgb = to_hwc_uint8(img, i)
            pixels = rgb[:, :, ::-1] if self.cfg.INPUT.FORMAT == "BGR" else rgb
            resized = self.aug.get_transform(pixels).apply_image(np.ascontiguousarray(pixels))
            inputs.append({"image": torch.as_tensor(resized.astype("float32").transpose(2, 0, 1)),
                           "height": rgb.shape[0], "width": rgb.shape[1]})
        m = self.model
        with _autocast(self.device, self.amp):
            batch = m.preprocess_image(inputs)
            features = m.backbone(batch.tensor)
            proposals, _ = m.proposal_generator(batch, features, None)
            if self.scores_rois:
                results, rois = self._roi_heads(features, proposals)
            else:
                results, _ = m.roi_heads(batch, features, proposals, None)
                rois = [(None, None)] * len(proposals)
        out = []
        for res, props, inp, (probs, feats) in zip(results, proposals, inputs, rois):
            h, w = inp["height"], inp["width"]
            # detector_postprocess's box steps, with detectron2's own Boxes ops: scale, clip, drop empty
            boxes = Boxes(res.pred_boxes.tensor.float().clone())
            boxes.scale(w / res.image_size[1], h / res.image_size[0])
            boxes.clip((h, w))
            keep = boxes.nonempty().cpu()
            masks = res.pred_masks.float().cpu()
            if masks.ndim != 4 or masks.shape[1] != 1:
                raise DetectorError(f"{self.config_name}: pred_masks of shape {tuple(masks.shape)}, expected (n,1,M,M)")
            pboxes = props.proposal_boxes.tensor.float().cpu() * torch.tensor(
                [w / props.image_size[1], h / props.image_size[0]] * 2)
            out.append(Detections(
                boxes=boxes.tensor.cpu()[keep], labels=res.pred_classes.cpu()[keep],
                scores=res.scores.float().cpu()[keep], masks=masks[keep, 0], image_size=(h, w),
                proposals=pboxes, proposal_scores=props.objectness_logits.float().sigmoid().cpu(),
                roi_boxes=None if probs is None else pboxes,
                roi_scores=None if probs is None else probs[:, :-1].float().cpu(),  # background is the last column
                roi_feats=feats.float().cpu() if self.roi_features else None))
        return out

    def _roi_heads(self, features, proposals):
        """``StandardROIHeads`` inference as detectron2 runs it (the box head once, ``box_predictor.inference``,
        then the mask head on the kept boxes: ``_forward_box`` + ``forward_with_given_boxes``), keeping what
        its own forward drops: per image, every proposal's class probabilities (``predict_probs``, K + 1
        columns, background last) and box-head features (the 1024-d "fc7" of FPN models)."""
        heads = self.model.roi_heads
        box_feats = heads.box_head(heads.box_pooler([features[f] for f in heads.box_in_features],
                                                    [p.proposal_boxes for p in proposals]))
        predictions = heads.box_predictor(box_feats)
        instances, _ = heads.box_predictor.inference(predictions, proposals)
        results = heads.forward_with_given_boxes(features, instances)
        probs = heads.box_predictor.predict_probs(predictions, proposals)
        return results, list(zip(probs, box_feats.split([len(p) for p in proposals])))

"""Nearest-neighbour class accuracy of a store's region features, against random-init trunks on the
same boxes.

How it is measured: every stored region whose box overlaps a ground-truth object with IoU >= 0.5 takes
that object's class (the best-overlapping one); others are left out. Each such region of a *test*
image is matched to its nearest *train*-split region by cosine similarity of the features; the
accuracy is the share whose neighbour has the same class. Chance is the accuracy of a neighbour drawn
at random from the train regions, sum_c p_test(c) p_train(c); "majority" always answers the most
frequent train class. For the random-init rows, the same boxes are pooled again with the store's own
extraction code (``FeatureExtractor`` + ``region_features``, same input size) from a randomly
initialised trunk, so only the trunk's weights differ.

    python examples/synth_detector/nn_accuracy.py STORE --instances data/instances.json [--random resnet18 resnet101]
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch


def gt_boxes(store, instances: str) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Row -> (boxes xyxy, class index) of its ground-truth objects (matched by file name)."""
    data = json.load(open(instances))
    cats = {c["id"]: k for k, c in enumerate(sorted(data["categories"], key=lambda c: c["id"]))}
    by_file: dict[str, list] = {}
    names = {img["id"]: img["file_name"].split("/")[-1] for img in data["images"]}
    for a in data["annotations"]:
        if not a.get("iscrowd", 0):
            x, y, w, h = a["bbox"]
            by_file.setdefault(names[a["image_id"]], []).append((x, y, x + w, y + h, cats[a["category_id"]]))
    out = {}
    for k in store.rows():
        objs = np.asarray(by_file.get(store.image_path(int(k)).split("/")[-1], []), np.float32).reshape(-1, 5)
        out[int(k)] = (objs[:, :4], objs[:, 4].astype(np.int64))
    return out


def labelled_regions(store, gt, rows) -> tuple[list[tuple[int, np.ndarray]], np.ndarray, np.ndarray]:
    """For ``rows``: (row, kept region indices) pairs, the kept regions' features and GT classes."""
    from torchvision.ops import box_iou

    keep, feats, labels = [], [], []
    for k in rows:
        reg = store.regions(int(k))
        boxes, (gb, gl) = reg["boxes"], gt[int(k)]
        if not len(boxes) or not len(gb):
            continue
        iou = box_iou(torch.from_numpy(boxes.astype(np.float32)), torch.from_numpy(gb)).numpy()
        best, ok = iou.argmax(1), iou.max(1) >= 0.5
        idx = np.flatnonzero(ok)
        keep.append((int(k), idx))
        feats.append(reg["feats"][idx].astype(np.float32))
        labels.append(gl[best[idx]])
    return keep, np.concatenate(feats), np.concatenate(labels)


def nn_accuracy(train_x, train_y, test_x, test_y) -> dict:
    a = train_x / np.maximum(np.linalg.norm(train_x, axis=1, keepdims=True), 1e-8)
    b = test_x / np.maximum(np.linalg.norm(test_x, axis=1, keepdims=True), 1e-8)
    pred = train_y[(b @ a.T).argmax(1)]
    classes = np.union1d(train_y, test_y)
    p_train = np.array([(train_y == c).mean() for c in classes])
    p_test = np.array([(test_y == c).mean() for c in classes])
    return {"accuracy": float((pred == test_y).mean()), "chance": float(p_train @ p_test),
            "majority": float((test_y == classes[p_train.argmax()]).mean()),
            "train_regions": len(train_y), "test_regions": len(test_y)}


@torch.inference_mode()
def repooled(store, keep, backbone: str, input_size: int, seed: int = 0) -> np.ndarray:
    """The kept regions' features from a random-init ``backbone`` trunk, pooled as extraction pools."""
    from vlcache.stages.extract.features import FeatureExtractor, region_features

    torch.manual_seed(seed)
    net = FeatureExtractor(weights="none", input_size=input_size, backbone=backbone)
    out = []
    for k, idx in keep:
        img = np.asarray(store.image(k).convert("RGB"))
        c5 = net(net.prepare([img]))
        boxes = store.regions(k)["boxes"][idx]
        out.append(region_features(c5, [boxes], [img.shape[:2]], input_size)[0].numpy())
    return np.concatenate(out)


def main() -> None:
    import vlcache

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("store")
    ap.add_argument("--instances", required=True)
    ap.add_argument("--random", nargs="*", default=["resnet18", "resnet101"], help="random-init trunks to compare")
    ap.add_argument("--max-train-images", type=int, help="gallery: only the first N train images (CPU time)")
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args()
    store = vlcache.open(args.store)
    gt = gt_boxes(store, args.instances)
    tr_keep, tr_x, tr_y = labelled_regions(store, gt, store.rows("train")[:args.max_train_images])
    te_keep, te_x, te_y = labelled_regions(store, gt, store.rows("test"))
    feats = store.attrs["models"]["features"]
    source = store.attrs["models"].get("regions", {}).get("feature_source", f"{feats['backbone']} C5")
    results = {f"store ({source}; weights {feats['weights_id']})": nn_accuracy(tr_x, tr_y, te_x, te_y)}
    for bb in args.random:
        rx = repooled(store, tr_keep, bb, feats["input_size"])
        ex = repooled(store, te_keep, bb, feats["input_size"])
        results[f"{bb} random init, same boxes"] = nn_accuracy(rx, tr_y, ex, te_y)
    for name, r in results.items():
        print(f"{name}: 1-NN accuracy {r['accuracy']:.3f} (chance {r['chance']:.3f}, majority {r['majority']:.3f}; "
              f"{r['test_regions']} test / {r['train_regions']} train regions)")
    if args.out:
        open(args.out, "w").write(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

#!/usr/bin/env bash
# A store from the trained synthetic detector: detected instances (not the annotations oracle),
# bottom-up regions and grid features from the detector's own trained ResNet-18 trunk; then the
# nearest-neighbour class accuracy of its region features against random-init trunks on the same boxes.
# Usage: [LIMIT=N] build_store.sh [WORKDIR]   (after train.sh; LIMIT: only the first N images)
set -euo pipefail
W=${1:-work/synth_detector}
PY=${PYTHON:-python}
CKPT=${CKPT:-$W/detector/detector.pt}  # or a resume checkpoint, RUN/checkpoints/last.pt (it carries the same metadata)
$PY -m vlcache extract --dataset "$W/data/dataset_synth.json" --instances "$W/data/instances.json" \
    --out "$W/synth-trained.zarr" --weights "$CKPT" --num-workers 0 ${LIMIT:+--limit $LIMIT} \
    --set detector.min_size=128 --set detector.max_size=128 \
    --set features.input_size=224 --set features.grid_size=7
$PY -m vlcache store info "$W/synth-trained.zarr"
$PY "$(dirname "$0")/nn_accuracy.py" "$W/synth-trained.zarr" --instances "$W/data/instances.json" \
    --random resnet18 resnet101 --max-train-images ${NN_TRAIN_IMAGES:-300} --out "$W/nn_accuracy.json"

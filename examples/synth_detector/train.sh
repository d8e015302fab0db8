#!/usr/bin/env bash
# Train a Mask R-CNN (ResNet-18-FPN, narrowed to 64 channels for CPU) from scratch on the synthetic
# dataset's train split and report COCO AP on its val split. Usage: train.sh [WORKDIR] [EPOCHS]
set -euo pipefail
W=${1:-work/synth_detector}
EPOCHS=${2:-4}
PY=${PYTHON:-python}
[ -f "$W/data/dataset_synth.json" ] || $PY -m vlcache datasets synth --out "$W/data" --images 1000 --size 128 --seed 0
$PY -m vlcache train detector --run "$W/detector" --dataset "$W/data/dataset_synth.json" \
    --instances "$W/data/instances.json" --backbone resnet18 --epochs "$EPOCHS" --batch-size 4 \
    --set fpn_channels=64 --set min_size=128 --set max_size=128 --set lr=0.01 --set warmup_iters=200 \
    --set "lr_steps=[$((EPOCHS * 3 / 4))]" --set rpn_pre_nms_top_n_train=600 --set rpn_post_nms_top_n_train=300 \
    --set rpn_batch_size_per_image=128 --set box_batch_size_per_image=128 --set num_workers=0 \
    --set checkpoint_every=100 --set log_every=10
$PY -m vlcache evaluate detector --run "$W/detector"

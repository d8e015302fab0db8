#!/usr/bin/env bash
# Stores from the trained synthetic detector (after train.sh), all on the same dataset, and the
# nearest-neighbour class accuracy of each store's region features against a random-init trunk on the same boxes:
#   trained.zarr  the trained detector's own instances (not the annotations oracle); regions: its BUTD-selected
#                 boxes with the box head's representation (features.region_source=detector); grid: its trunk
#   random.zarr   the README ablations' protocol: the annotations as detector, a random-init ResNet-18
#   trunk.zarr    the annotations as detector, the trained detector's ResNet-18 trunk (only the features differ
#                 from random.zarr)
# Usage: build_store.sh [WORKDIR]   (CKPT: the detector, default WORKDIR/detector/detector.pt)
set -euo pipefail
W=${1:-work/synth_detector}
PY=${PYTHON:-python}
V="$PY -m vlcache"
HERE="$(cd "$(dirname "$0")" && pwd)"
CKPT=${CKPT:-$W/detector/detector.pt}  # or a resume checkpoint, RUN/checkpoints/last.pt (same metadata)
case "$CKPT" in /*) ;; *) CKPT="$PWD/$CKPT" ;; esac
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
cd "$W"
D=(--dataset data/dataset_synth.json --instances data/instances.json --num-workers 0)
F=(--set features.input_size=224 --set features.grid_size=7 --set features.min_regions=6 --set features.max_regions=16
   --set features.region_min_size=224 --set features.region_max_size=448 --set block_size=64)
[ -f trained.done ] || { $V extract "${D[@]}" --out trained.zarr --weights "$CKPT" --set detector.min_size=128 \
  --set detector.max_size=128 --set features.region_source=detector "${F[@]}" && touch trained.done; }
[ -f random.done ] || { $V extract "${D[@]}" --out random.zarr --detector annotations --weights none \
  --set features.backbone=resnet18 "${F[@]}" && touch random.done; }
[ -f trunk.done ] || { $V extract "${D[@]}" --out trunk.zarr --detector annotations --weights "$CKPT" \
  --set features.backbone=resnet18 "${F[@]}" && touch trunk.done; }
for s in trained random trunk; do
  [ -f nn_$s.json ] || $PY "$HERE/nn_accuracy.py" $s.zarr --instances data/instances.json --random resnet18 \
    --out nn_$s.json
done

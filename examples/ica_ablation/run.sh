#!/bin/bash
# The captioning ablation of the README ("Results on the synthetic dataset"), 3 seeds per setting.
# Usage: examples/ica_ablation/run.sh [WORKDIR]   (EPOCHS=12 by default; the README's table used EPOCHS=5)
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
WORK="${1:-ica_ablation}"
mkdir -p "$WORK" && cd "$WORK"
V="${VLCACHE:-vlcache}"
PY="${PYTHON:-python}"
EPOCHS="${EPOCHS:-12}"
# One torch thread per process: on a loaded machine tiny ops otherwise wait on the OpenMP pool.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

[ -f data/dataset_synth.json ] || $V datasets synth --out data --images 600 --seed 1 --size 128
[ -d store.zarr ] || $V extract --dataset data/dataset_synth.json --instances data/instances.json --out store.zarr \
  --detector annotations --backbone-weights none --batch-size 8 --num-workers 1 --device cpu \
  --set features.input_size=224 --set features.grid_size=7 --set features.max_regions=16 \
  --set features.region_min_size=224 --set features.region_max_size=448 \
  --set features.min_regions=4 --set block_size=32
# diagnostic copy whose grid features encode each cell's class coverage (an upper bound, not a result)
[ -d oracle.zarr ] || $PY "$HERE/oracle_features.py" store.zarr oracle.zarr

COMMON=(--seeds 3 --runs-root runs --set epochs=$EPOCHS --set batch_images=16 --set embed_dim=128
        --set attn_dim=128 --set hidden_dim=128 --set dropout=0.3 --set num_workers=1 --set patience=0
        --set checkpoint_every=0 --set log_every=10)
STD=(--set feat_norm=standardize)
XU=(--set loss_recipe=xu-theano)
L1=(--set ica_weight=1)
# defaults: sgrvinod's loss recipe (METHODS §1), raw features, lambda 0.1
$V experiment ica --store store.zarr  --name ica          "${COMMON[@]}"
$V experiment ica --store store.zarr  --name std          "${COMMON[@]}" "${STD[@]}"
$V experiment ica --store store.zarr  --name std-l1       "${COMMON[@]}" "${STD[@]}" "${L1[@]}"
$V experiment ica --store store.zarr  --name std-xu       "${COMMON[@]}" "${STD[@]}" "${XU[@]}"
$V experiment ica --store oracle.zarr --name oracle       "${COMMON[@]}"
$V experiment ica --store oracle.zarr --name oracle-l1    "${COMMON[@]}" "${L1[@]}"
$PY "$HERE/summarize.py" ica std std-l1 std-xu oracle oracle-l1

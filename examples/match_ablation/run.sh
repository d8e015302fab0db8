#!/bin/bash
# The matching and SLAN ablations of the README ("Results on the synthetic dataset"), 3 seeds each.
# Usage: examples/match_ablation/run.sh [WORKDIR]
# Seeds run as parallel processes (each its own run directories); a last sequential pass of each
# experiment finds every run trained and evaluated and writes the combined table (ablation.md/json).
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
PY="${PYTHON:-python}"
WORK="${1:-match_ablation}"
mkdir -p "$WORK" && cd "$WORK"
V="${VLCACHE:-vlcache}"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # one thread a process: several processes share the cores

[ -f data/dataset_synth.json ] || $V datasets synth --out data --images 200 --seed 1 --size 96
[ -f store.done ] || { $V extract --dataset data/dataset_synth.json --instances data/instances.json \
  --out store.zarr --detector annotations --backbone-weights none --batch-size 8 --num-workers 0 --device cpu \
  --set features.input_size=224 --set features.grid_size=7 --set features.max_regions=4 \
  --set features.min_regions=4 --set features.fixed_regions=4 --set block_size=32 && touch store.done; }
[ -f text.done ] || { $V store text-cache --store store.zarr --out text.zarr && touch text.done; }

# Caption-level epochs (the default): 800 training captions, so 4 epochs of batch 32 = 100 steps.
SCAN=(--store store.zarr --model scan --name scan-ablation --runs-root runs --set epochs=4 --set lr_decay_epoch=3
      --set batch_size=32 --set embed=256 --set word_dim=128 --set region_norm=true --set lr=5e-4
      --set num_workers=0 --set log_every=25)
SLAN=(--store store.zarr --text-cache text.zarr --name slan-ablation --runs-root runs --set epochs=1
      --set batch_size=16 --set num_workers=0 --set log_every=25)
for s in 0 1 2; do
  $V experiment match "${SCAN[@]}" --seeds 1 --set seed=$s > scan-seed$s.log 2>&1 &
  $V experiment slan "${SLAN[@]}" --seeds 1 --set seed=$s > slan-seed$s.log 2>&1 &
done
wait
$V experiment match "${SCAN[@]}" --seeds 3
$V experiment slan "${SLAN[@]}" --seeds 3
$PY "$HERE/summarize.py" .

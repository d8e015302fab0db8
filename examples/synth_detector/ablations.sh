#!/usr/bin/env bash
# Issue 15's comparison: the ICA, SCAN (CCR, CCS, ICA) and SLAN ablations on a store whose features come
# from the trained synthetic detector, side by side with the same dataset's random-feature store.
# Usage: ablations.sh [WORKDIR]   (after train.sh; WORKDIR as there; the stores come from build_store.sh)
# Seeds run as parallel processes; the last pass of each experiment finds every run done and writes the table.
set -euo pipefail
W=${1:-work/synth_detector}
PY=${PYTHON:-python}
V="$PY -m vlcache"
HERE="$(cd "$(dirname "$0")" && pwd)"
JOBS=${JOBS:-2}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
"$HERE/build_store.sh" "$W"
cd "$W"

STORES=${STORES:-trained random}
EXPERIMENTS=${EXPERIMENTS:-scan ica slan}  # one script per experiment may run at once (each has its own run dirs)
want() { [[ " $EXPERIMENTS " == *" $1 "* ]]; }
ICA=(--runs-root runs --set epochs=${ICA_EPOCHS:-5} --set batch_images=16 --set embed_dim=128 --set attn_dim=128
     --set hidden_dim=128 --set dropout=0.3 --set num_workers=0 --set patience=0 --set checkpoint_every=0
     --set log_every=10 --set feat_norm=standardize)
SCAN=(--model scan --runs-root runs --set epochs=${SCAN_EPOCHS:-4} --set lr_decay_epoch=3 --set batch_size=32
      --set embed=256 --set word_dim=128 --set region_norm=true --set lr=5e-4 --set num_workers=0 --set log_every=25)
SLAN=(--runs-root runs --set epochs=${SLAN_EPOCHS:-1} --set batch_size=16 --set num_workers=0 --set log_every=25)
run_seeds() {  # run_seeds CMD...: seeds 0..2 as parallel processes (at most JOBS), then the combined pass
  local seed
  for seed in 0 1 2; do "$@" --seeds 1 --set seed=$seed > "log_$(echo "$*" | md5sum | cut -c1-8)_$seed.txt" 2>&1 &
    while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do sleep 2; done; done
  wait
  "$@" --seeds 3
}
# one experiment on every store before the next, so each side-by-side comparison is complete as soon as can be
for s in $STORES; do
  if want scan; then run_seeds $V experiment match --store $s.zarr --name scan-$s "${SCAN[@]}"; fi
done
for s in $STORES; do
  if want ica; then run_seeds $V experiment ica --store $s.zarr --name ica-$s "${ICA[@]}"; fi
done
for s in $STORES; do
  if want slan; then
    [ -f text-$s.done ] || { $V store text-cache --store $s.zarr --out text-$s.zarr && touch text-$s.done; }
    run_seeds $V experiment slan --store $s.zarr --text-cache text-$s.zarr --name slan-$s "${SLAN[@]}"
  fi
done

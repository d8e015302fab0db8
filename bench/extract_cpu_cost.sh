#!/bin/bash
# CPU-seconds per image of `vlcache extract` for the README's configs (README, "Cost per image on CPU"):
# user + system time of the command and its decode workers (/usr/bin/time), per image =
# (24-image run - 4-image run) / 20, so start-up (imports, building models) is left out.
# Usage: bench/extract_cpu_cost.sh [WORKDIR]   (random-init weights; ~10 CPU-minutes in all)
# SMALL / LARGE change the two run sizes, CONFIG_NAMES the configs (default: default cheap square tour).
set -euo pipefail
PYTHON=${PYTHON:-python}
WORK=${1:-$(mktemp -d)}
SMALL=${SMALL:-4}
LARGE=${LARGE:-24}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
cd "$WORK"
[ -f synth320/dataset_synth.json ] || $PYTHON -m vlcache datasets synth --out synth320 --images "$LARGE" --size 320 --seed 0
FEATURES="--set features.input_size=224 --set features.grid_size=7"
CHEAP="$FEATURES --set detector.min_size=480 --set detector.max_size=800 --set detector.proposals=300"
declare -A CONFIGS=(
  [default]=""
  [cheap]="$CHEAP"
  [square]="$CHEAP --set features.region_scale=square"
  [tour]="--detector annotations --instances synth320/instances.json $FEATURES"
)
echo "config | CPU-s per image | peak RSS (MB) | load average before"
for cfg in ${CONFIG_NAMES:-default cheap square tour}; do
  declare -A cpu=()
  for n in "$SMALL" "$LARGE"; do
    rm -rf "s-$cfg-$n.zarr"
    load=$(cut -d' ' -f1 /proc/loadavg)
    # shellcheck disable=SC2086  # the config's options are meant to split
    /usr/bin/time -f "%U %S %M" -o "time-$cfg-$n.txt" $PYTHON -m vlcache extract --dataset synth320/dataset_synth.json \
      --weights none --out "s-$cfg-$n.zarr" --limit "$n" ${CONFIGS[$cfg]} > "log-$cfg-$n.txt" 2>&1
    read -r user sys rss < "time-$cfg-$n.txt"
    cpu[$n]=$(echo "$user + $sys" | bc)
  done
  echo "$cfg | $(echo "scale=2; (${cpu[$LARGE]} - ${cpu[$SMALL]}) / ($LARGE - $SMALL)" | bc) | $((rss / 1024)) | $load"
done

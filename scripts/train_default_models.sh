#!/usr/bin/env bash
# Reproduce the shipped default bundles (docs/models.md): train both models on the course layout of
# Market-1501 with the committed split, then export them into models_store/.
#
#   REID_DATA_ROOT=/path/to/market1501 scripts/train_default_models.sh [attributes|reid|export]
#
# Every step is resumable: run the script again after an interruption and it continues from the run's
# last.pt. On a 2-core CPU the two trainings are started side by side with one torch thread each
# (two threads per run were 3-5x slower than one on a busy 2-core machine); on a GPU pass --device cuda
# through EXTRA_ARGS and raise the input size.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${REID_DATA_ROOT:?set REID_DATA_ROOT to the Market-1501 folder}"
RUNS=${RUNS:-runs}
CACHE=${CACHE:-cache}
SPLIT=splits/market1501-course-seed0.json
WEIGHTS=${WEIGHTS:-../shared/weights}
EXTRA_ARGS=${EXTRA_ARGS:-}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

attributes() {
  local run=$RUNS/attributes-mnv2-128x64-mA
  if [ -f "$run/last.pt" ]; then
    reid-train train-attributes --resume --run-dir "$run" --threads 1 --no-progress --cache-dir "$CACHE"
  else
    reid-train train-attributes --backbone mobilenet_v2 \
      --init-weights "$WEIGHTS/mobilenet_v2_imagenet_features.pth" --input-size 128x64 --epochs 30 \
      --batch-size 128 --lr 3e-4 --monitor mA --weight-decay 5e-4 --patience 6 --split-file "$SPLIT" \
      --cache-dir "$CACHE" --run-dir "$run" --no-progress --threads 1 $EXTRA_ARGS
  fi
}

reid() {
  local run=$RUNS/reid-osnet-128x64
  if [ -f "$run/last.pt" ]; then
    reid-train train-reid --resume --run-dir "$run" --no-progress --cache-dir "$CACHE"
  else
    reid-train train-reid --recipe modern --backbone osnet_x0_25 \
      --init-weights "$WEIGHTS/osnet_x0_25_msmt17.pth" --input-size 128x64 --epochs 40 --branch-dim 256 \
      --split-file "$SPLIT" --cache-dir "$CACHE" --run-dir "$run" --no-progress $EXTRA_ARGS
  fi
}

export_bundles() {
  reid-train export "$RUNS/attributes-mnv2-128x64-mA" --force
  reid-train export "$RUNS/reid-osnet-128x64" --force
}

case "${1:-all}" in
  attributes) attributes ;;
  reid) reid ;;
  export) export_bundles ;;
  all) attributes & reid & wait; export_bundles ;;
  *) echo "usage: $0 [attributes|reid|export|all]" >&2; exit 2 ;;
esac

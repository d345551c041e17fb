#!/usr/bin/env bash
# Training throughput, latte against PyLate 1.6.0, alternating in one run (never in CI).
#
#   scripts/bench_train.sh MODEL TRIPLETS ROUNDS LATTE_BIN [LATTE_BIN ...]
#
# Each round runs PyLate's trainer (scripts/pylate_train.py in ./venv, or $PYTHON) in fp32 and with `bf16=True`
# (bf16 autocast, PyLate's faster configuration on CPUs with bf16), then every latte binary given at every dtype
# in $DTYPES (default "f32 bf16": `latte train --dtype`), on the same data and hyper-parameters (contrastive loss,
# batch 16, lr 3e-5, 10 % warm-up, weight decay 0.01, seed 42, 20 steps), and prints one line per run:
# examples/s (model loading and saving excluded), peak RSS, load average, final loss. Set LATTE_ENV (e.g.
# "LATTE_NO_AVX512=1") to run the latte binaries with it, PYLATE_MODES="fp32" to skip PyLate's bf16 run.
set -euo pipefail
cd "$(dirname "$0")/.."
model=$1 triplets=$2 rounds=$3
shift 3
python=${PYTHON:-venv/bin/python}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
hp=(--batch-size 16 --lr 3e-5 --epochs 1 --warmup-ratio 0.1 --weight-decay 0.01 --max-steps 20)
for round in $(seq 1 "$rounds"); do
  for mode in ${PYLATE_MODES:-fp32 bf16}; do
    flag=()
    [ "$mode" = bf16 ] && flag=(--bf16)
    log=$( { HF_HUB_OFFLINE=1 /usr/bin/time -v "$python" scripts/pylate_train.py --model "$model" --train "$triplets" \
        --output "$out/pylate" --seed 42 "${hp[@]}" "${flag[@]}"; } 2>&1 )
    echo "round $round pylate-$mode $(grep -oE '"examples_per_second": [0-9.]+' <<<"$log" | grep -oE '[0-9.]+$') examples/s" \
      "rss_kb=$(grep 'Maximum resident' <<<"$log" | grep -oE '[0-9]+') load=$(cut -d' ' -f1 /proc/loadavg)"
  done
  for bin in "$@"; do
    for dtype in ${DTYPES:-f32 bf16}; do
      log=$( { env ${LATTE_ENV:-} /usr/bin/time -v "$bin" train --model "$model" --train "$triplets" --loss contrastive \
          --output "$out/latte" --train-seed 42 --dtype "$dtype" "${hp[@]}"; } 2>&1 )
      echo "round $round $bin-$dtype $(grep -oE '[0-9.]+ examples/s' <<<"$log")" \
        "rss_kb=$(grep 'Maximum resident' <<<"$log" | grep -oE '[0-9]+') load=$(cut -d' ' -f1 /proc/loadavg)" \
        "$(grep -oE 'final loss [0-9.]+' <<<"$log")"
    done
  done
done

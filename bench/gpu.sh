#!/usr/bin/env bash
# The README's GPU figures, in one run: training throughput (bench/train_step.py at 224 px with AMP: bare vs
# ours at batch 32 and 128, eager vs compiled, each speed setting, loader vs device data path, one epoch of
# 39,242 cached images), then a short training of every model on the real NIH sample, each evaluated with MC
# dropout (T = 25), then compared.
#   bench/gpu.sh NIH_SAMPLE_DIR OUT_DIR
# EPOCHS=15; LOGS=DIR puts the text logs there; STEPS/WARMUP/ROUNDS, COMPILE=off|on|both, EPOCH_IMAGES
# (0 skips the epoch) and MODELS shrink the throughput part; BENCH_ONLY=1 stops after it.
# Random init (--weights none): the GPU machine, like CI, cannot download ImageNet weights.
set -euo pipefail
data=${1:?NIH folder (e.g. ../shared/data/nih14-sample)}
out=${2:?output folder}
epochs=${EPOCHS:-15}
logs=${LOGS:-$out}
cx="python3 -m cxrfusion.cli"
mkdir -p "$out" "$logs"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$logs/gpu.txt"
python3 -c "import torch, lightning, timm; print('torch', torch.__version__, 'lightning', lightning.__version__, 'timm', timm.__version__)" | tee -a "$logs/gpu.txt"

# shellcheck disable=SC2086  # MODELS is a list of words
python3 bench/train_step.py --size 224 --batches 32 128 --steps "${STEPS:-20}" --warmup "${WARMUP:-5}" \
  --rounds "${ROUNDS:-2}" --compile "${COMPILE:-both}" --models ${MODELS:-simple_cnn efficientnet_b0 densenet121 fusion} \
  --epoch-images "${EPOCH_IMAGES:-39242}" --epoch-model densenet121 --workers "${WORKERS:-8}" \
  2>&1 | grep -v "^epoch " | tee "$logs/train_step.txt"
[ "${BENCH_ONLY:-0}" = 1 ] && exit 0

start=$(date +%s)
$cx prepare --data "$data" --out "$out/prepared" --patient-fraction 1.0 --workers 16 | tee "$logs/train.log"
for model in simple_cnn efficientnet_b0 densenet121 fusion; do
  t0=$(date +%s)
  $cx train --prepared "$out/prepared" --model "$model" --out "$out/$model" --weights none \
    --epochs "$epochs" --phase1-epochs 0 --lr 3e-4 --workers 8 --early-stop-patience 20 2>&1 \
    | tr '\r' '\n' | grep -vE "^(Epoch|Validation|Training|Sanity)" | tee -a "$logs/train.log"
  echo "$model: trained in $(( $(date +%s) - t0 )) s" | tee -a "$logs/train.log"
  $cx evaluate --run "$out/$model" --mc-samples 25 2>&1 | tee -a "$logs/train.log"
done
$cx compare "$out"/simple_cnn "$out"/efficientnet_b0 "$out"/densenet121 "$out"/fusion \
  --out "$out/comparison" | tee -a "$logs/train.log"
cp "$out/comparison/comparison.md" "$logs/"
echo "prepare + 4 trainings + 4 evaluations + compare: $(( $(date +%s) - start )) s" | tee -a "$logs/train.log"

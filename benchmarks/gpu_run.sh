#!/usr/bin/env bash
# Issue 8, every GPU measurement in one go on one H100/H200 (about 8 minutes, most of it compiling):
#   1. mixcorpus -> train.bin (its train split) + val.bin (its val split)
#   2. benchmarks/train_throughput.py for each variant, all at the seed's 8,192 tokens per update,
#      then a table: tokens/s, ms/update, MFU against a matmul peak measured in the same process
#   3. the seed's whole run (`--preset smallgpt-10m`, 5000 updates) timed end to end, with its final
#      full-pass val loss (targets: <= 45 s wall, val loss <= 4.385)
#
#   bash benchmarks/gpu_run.sh 2>&1 | tee gpu_run.log
#
# Settings (environment): PY (python with a CUDA torch and smallgpt installed; default .venv/bin/python),
# MIXCORPUS (default ../shared/data/mixcorpus), WORK (scratch dir, default /tmp/smallgpt-gpu),
# SEED_MICRO (micro-batch of the full run, default 32 = no accumulation), SKIP_VARIANTS=1 (full run only).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
MIX=${MIXCORPUS:-../shared/data/mixcorpus}
WORK=${WORK:-/tmp/smallgpt-gpu}
DATA=$WORK/mixcorpus
SEED_MICRO=${SEED_MICRO:-32}
mkdir -p "$WORK"
"$PY" -c "import torch; assert torch.cuda.is_available(), 'torch sees no CUDA GPU'; \
print('torch', torch.__version__, 'on', torch.cuda.get_device_name())"

echo "== 1. prepare mixcorpus"
if [ ! -f "$DATA/val.bin" ]; then
    "$PY" -m smallgpt prepare "$MIX/train.jsonl.gz" --out "$WORK/train-split" --val-fraction 0 --quiet --force
    "$PY" -m smallgpt prepare "$MIX/val.jsonl.gz" --out "$WORK/val-split" --val-fraction 0 --quiet --force
    mkdir -p "$DATA"
    ln -sf "$WORK/train-split/train.bin" "$DATA/train.bin"
    ln -sf "$WORK/val-split/train.bin" "$DATA/val.bin"
fi
ls -l "$DATA"/

if [ "${SKIP_VARIANTS:-0}" != 1 ]; then
    echo "== 2. throughput variants (8,192 tokens per update each)"
    RESULTS=$WORK/variants.jsonl
    : > "$RESULTS"
    variant() { "$PY" benchmarks/train_throughput.py --data "$DATA" --json "$@" | tee -a "$RESULTS"; }
    variant --micro-batch 8                 # the seed's split: 8 x 4 accumulation
    variant --micro-batch 8 --no-compile
    variant --micro-batch 16
    variant --micro-batch 32                # the whole update in one micro-batch
    variant --micro-batch 32 --no-compile
    variant --micro-batch 32 --plain-loss   # full logits + F.cross_entropy instead of the fused loss
    variant --micro-batch 32 --plain-loss --no-compile
    "$PY" - "$RESULTS" <<'EOF'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
print(f"\n{'micro x accum':>13} {'compile':>7} {'loss':>6} {'ms/update':>10} {'tokens/s':>12} {'MFU':>6}")
for r in rows:
    split = f"{r['micro_batch']} x {r['accumulation']}"
    print(f"{split:>13} {str(r['compile']):>7} {r['loss']:>6} {r['ms_per_update']:>10.2f} "
          f"{r['tokens_per_s']:>12,.0f} {r['mfu']:>6.1%}")
print(f"device: {rows[0]['device']}, {rows[0]['dtype']}, measured matmul peak "
      f"{max(r['matmul_peak_tflops'] for r in rows):.0f} TFLOP/s")
EOF
fi

echo "== 3. the seed's run: --preset smallgpt-10m, 5000 updates, micro-batch $SEED_MICRO"
rm -rf "$WORK/seed-run"
started=$(date +%s.%N)
"$PY" -m smallgpt train --preset smallgpt-10m --data "$DATA" --out "$WORK/seed-run" \
    micro_batch_size="$SEED_MICRO" log_interval=100 sample_tokens=60 | tail -n 30
finished=$(date +%s.%N)
"$PY" - "$WORK/seed-run/metrics.jsonl" "$started" "$finished" <<'EOF'
import json, math, sys
final = [json.loads(l) for l in open(sys.argv[1]) if '"final"' in l][-1]
wall = float(sys.argv[3]) - float(sys.argv[2])
print(f"\nseed run: {wall:.1f} s wall end to end (start-up, compilation, evaluations included); "
      f"final full-pass val loss {final['val_loss']:.4f} (perplexity {math.exp(final['val_loss']):.1f})")
print("targets: <= 45 s wall, val loss <= 4.385 (nanoGPT: 289 s, 4.385)")
EOF

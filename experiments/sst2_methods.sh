#!/usr/bin/env bash
# SST-2 on the bundled MiniLM: lorakit's default LoRA recipe against full fine-tuning, BitFit, a linear
# probe and the naive q,v recipe, all through the same loop (lorakit train), one seed each.
# Prints each run's summary row; runs land in runs/sst2-*. About 30 minutes on 2 CPU cores.
# Usage: bash experiments/sst2_methods.sh [extra lorakit-train flags, e.g. --seed 1]
set -euo pipefail
cd "$(dirname "$0")/.."
LK=${LORAKIT:-.venv/bin/lorakit}
run() { local name=$1; shift; "$LK" train --no-progress --out "runs/sst2-$name" "$@" | tail -3; }
run lora "$@"                                                            # the default recipe (README)
run full    --method full   --lr 5e-5 --batch_size 32 "$@"
run bitfit  --method bitfit --lr 1e-3 --batch_size 32 "$@"
run head    --method head   --lr 1e-2 --batch_size 32 "$@"
run lora-qv --targets query value --lr 5e-4 --batch_size 32 --dropout 0.1 "$@"   # the naive recipe

#!/usr/bin/env bash
# Where a sparse delta goes in a transition-metal oxide: SevenNet-0 fine-tuned on NiO
# (Ni16O16, DFT+U, many spin configurations; ../shared/data/nio_spin) at 3 % density,
# then `sparsekern report` on its adapter. Writes benchmarks/results/nio_7net0_sparse3_<date>
# .{report.png,report.json,metrics.json}. About 5 minutes on a 2-core CPU.
#
#   bash benchmarks/transition_metal_report.sh [finetune flags, e.g. --max_train 20]
#   (PY=... picks the interpreter, EPOCHS=... the epochs)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv-sevenn/bin/python}
DATA=${SPARSEKERN_DATA:-../shared/data}/nio_spin
WORK=${WORK:-${TMPDIR:-/tmp}/sparsekern-nio}
STEM=nio_7net0_sparse3_$(date -u +%F)
"$PY" -m sparsekern finetune --model 7net-0 --train "$DATA/NiO_data_0.xyz" --valid "$DATA/NiO_data_1.xyz" \
    --test "$DATA/NiO_data_2.xyz" --method sparse --density 0.03 --epochs "${EPOCHS:-5}" --out "$WORK" --no_progress "$@"
cp "$WORK/adapter.safetensors" "$WORK/$STEM.safetensors"
"$PY" -m sparsekern report "$WORK/$STEM.safetensors" --out benchmarks/results
cp "$WORK/metrics.json" "benchmarks/results/$STEM.metrics.json"

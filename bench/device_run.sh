#!/usr/bin/env bash
# The one prepared device call: the kernel run, then the training-step run, results under $OUT.
#   here:        bash bench/device_wheels.sh
#   the call:    run(command="bash bench/device_run.sh", carry=["bench/.device_wheels"], timeout_s=590)
#   CPU dry run: DRY_RUN=1 OUT=/tmp/device bash bench/device_run.sh   (what tests/test_bench_smoke.py runs)
# Each script has its own time budget and writes its JSON + Markdown after every section, so a run cut
# short keeps what it finished. The tested wheels go into a temporary --target directory ahead of the
# machine's own packages on PYTHONPATH; torch and triton stay the machine's (kernels.md: torch 2.11, triton 3.6).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/device}
DRY=()
[[ -n "${DRY_RUN:-}" ]] && DRY=(--dry-run)
mkdir -p "$OUT"
if compgen -G "bench/.device_wheels/*.whl" > /dev/null; then
    SITE=$(mktemp -d)
    pip install --quiet --no-deps --target "$SITE" bench/.device_wheels/*.whl
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
{ date -u; nvidia-smi 2>/dev/null || echo "no nvidia-smi"; python -c "import torch, triton; print(torch.__version__, triton.__version__)"; } > "$OUT/machine.txt" 2>&1
timeout 330 python bench/kernels_bench.py --out "$OUT/kernels" --budget-s 240 "${DRY[@]}"
kernels=$?
timeout 210 python bench/train_step_bench.py --out "$OUT/train_step" --budget-s 120 "${DRY[@]}"
train_step=$?
echo "kernels_bench rc=$kernels train_step_bench rc=$train_step"
exit $(( kernels || train_step ))

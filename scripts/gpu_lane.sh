#!/usr/bin/env bash
# The CUDA lane in one run: `pytest -m gpu`, `llama-verify --device cuda` (fp32, bf16, fp16) and `llama-bench` on the
# Llama 3.2 1B shape at the seed's settings (batch 1, 384 tokens, SGD, lr 1e-5) for the 16 cells, measured on the
# device and predicted beside it. Every result lands under one folder (first argument, else $OUT, else gpu-lane-out):
# one log per step, bench/ and predict/ as llama-bench writes them, verify.json, pytest's junit XML, summary.tsv
# (step, exit status, seconds) and table.md (scripts/gpu_lane_table.py: seed, measured, predicted, error). Each step
# has its own time limit; the whole lane is sized to finish in ~8 minutes so that a 15-minute loan of a machine can
# run it twice.
#
# Nothing is installed from a registry: the machine's own torch, transformers, PEFT, pytest, hypothesis and
# pytest-xdist are used as they are. The project is installed without dependencies when pip can (entry points and
# the pytest plugin registered), else run from the source tree through PYTHONPATH; every tool is called as
# `python -m` so both ways behave alike.
#
#   bash scripts/gpu_lane.sh [OUT_DIR]             # on a CUDA machine
#   GPU_LANE_SMOKE=1 bash scripts/gpu_lane.sh DIR  # the same steps on CPU, tiny sizes: the lane's plumbing, in ~2 min
set -uo pipefail
cd "$(dirname "$0")/.."

out="${1:-${OUT:-gpu-lane-out}}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
summary="$out/summary.tsv"
printf 'step\trc\tseconds\n' > "$summary"
py="${PYTHON:-python}"

if [ "${GPU_LANE_SMOKE:-0}" = 1 ]; then
    device=cpu
    verify_args=(--device cpu --dtype float32 --check kv_cache --attn-impl math)
    bench_args=(--preset tiny --batch-size 1 --seq-len 32 --steps 2 --ga 2 --cells plain,LoRA,GC+MP+LoRA)
    limit_pytest=120 limit_verify=120 limit_bench=120 limit_predict=120
else
    device=cuda
    verify_args=(--device cuda --dtype float32 --dtype bfloat16 --dtype float16)
    # The seed's settings (its report: batch 1, lr 1e-5, plain SGD; GA over 8 micro-batches). 8 micro-batches per cell:
    # one optimizer step in a GA cell, eight elsewhere; the peak is reached within the first.
    bench_args=(--preset llama-3.2-1b --batch-size 1 --seq-len 384 --optimizer sgd --lr 1e-5 --ga 8 --steps 8)
    # Upper bounds, 8.5 minutes in all (the prediction runs on the CPUs beside the rest): pytest -m gpu's own budget
    # is 5 minutes; verify takes 20 s on 2 CPU cores; a 1B cell is a process start, a seeded init and 8-16
    # micro-batches of 384 tokens. bench.json is written after every cell, so a bench cut short keeps what it did.
    limit_pytest=270 limit_verify=60 limit_bench=180 limit_predict=240
fi

# step NAME LIMIT CMD...: runs CMD under a time limit, its output in NAME.log, one line in summary.tsv.
step() {
    local name="$1" limit="$2"
    shift 2
    local start rc
    start=$(date +%s)
    echo "== $name (limit ${limit}s): $*"
    timeout --signal=TERM --kill-after=15 "$limit" "$@" > "$out/$name.log" 2>&1
    rc=$?
    printf '%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - start ))" >> "$summary"
    echo "   rc=$rc, $(( $(date +%s) - start )) s; last lines:"
    tail -n 5 "$out/$name.log" | sed 's/^/   | /'
    return 0
}

{
    date -u +%Y-%m-%dT%H:%M:%SZ
    "$py" -c 'import sys, torch
print("python", sys.version.split()[0])
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
print("device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu")'
    "$py" -m pip list 2>/dev/null | grep -iE \
        '^(torch|transformers|peft|accelerate|pytest|pytest-xdist|hypothesis|sentencepiece|tiktoken|safetensors) '
    command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
} > "$out/environment.txt" 2>&1
cat "$out/environment.txt"

if [ "$device" = cuda ] && ! "$py" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "torch.cuda.is_available() is False: this is not a CUDA machine (GPU_LANE_SMOKE=1 runs the lane on CPU)" >&2
    exit 2
fi

# The smoke run leaves the environment it runs in as it is (a test suite may be importing from it meanwhile).
if [ "$device" = cpu ]; then
    echo "smoke run: from the source tree"
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
elif "$py" -m pip install --quiet --no-deps --no-build-isolation --no-index -e . > "$out/install.log" 2>&1; then
    echo "installed without dependencies (pip install --no-deps -e .)"
else
    echo "pip could not install the project (install.log); running from the source tree"
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi

# The prediction needs no device: it runs on the CPUs while the device works.
"$py" -m llama_ref.cli.bench --predict "${bench_args[@]}" --no-plots --no-progress --out "$out/predict" \
    > "$out/predict.log" 2>&1 &
predict_pid=$!
predict_start=$(date +%s)

step pytest_gpu "$limit_pytest" "$py" -m pytest -m gpu -p no:cacheprovider --durations=15 \
    --junitxml="$out/pytest_gpu.xml" tests/gpu
step verify "$limit_verify" "$py" -m verify "${verify_args[@]}" --json "$out/verify.json"
step bench "$limit_bench" "$py" -m llama_ref.cli.bench "${bench_args[@]}" --device "$device" --timeout 40 \
    --no-plots --no-progress --out "$out/bench"

# The prediction's own limit, counted from its start.
left=$(( limit_predict - ($(date +%s) - predict_start) ))
while kill -0 "$predict_pid" 2> /dev/null && [ "$left" -gt 0 ]; do
    sleep 1
    left=$(( left - 1 ))
done
if kill -0 "$predict_pid" 2> /dev/null; then
    kill "$predict_pid"
    rc=124
else
    wait "$predict_pid"
    rc=$?
fi
printf '%s\t%s\t%s\n' predict "$rc" "$(( $(date +%s) - predict_start ))" >> "$summary"

"$py" scripts/gpu_lane_table.py "$out" > "$out/table.md" 2> "$out/table.log" \
    || echo "scripts/gpu_lane_table.py failed (table.log)"
cat "$out/table.md"

echo "== summary ($out)"
column -t -s $'\t' "$summary" 2> /dev/null || cat "$summary"
# Non-zero when a step failed: the lane's results are still all on disk.
awk -F'\t' 'NR > 1 && $2 != 0 {bad = 1} END {exit bad}' "$summary"

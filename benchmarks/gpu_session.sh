#!/usr/bin/env bash
# One call on a GPU machine, in the repository root: the CUDA tests, the
# meta-training throughput table on the GPU, then the GPU recipes
# (configs/*-gpu.json) trained side by side until a deadline; each run stops
# on SIGINT with its checkpoint, optimizer.pt and snapshots, and the runs come
# back as one archive.
#
#   OUT=/tmp/gpu TRAIN_S=450 bash benchmarks/gpu_session.sh [CONFIG ...]
#   SEEDS="43 44 45" OVERHEAD="--nfn nfn-ortho-v2 --mlp mlp-ortho" bash benchmarks/gpu_session.sh CONFIG ...
#   SEEDS="50 51" KEEP_CHECKPOINTS=1 bash benchmarks/gpu_session.sh CONFIG ...   # finish on a CPU
#   SEEDS="49" TAG=cap03 EXTRA_ARGS="--step-cap 0.03" bash benchmarks/gpu_session.sh CONFIG ...
#
# CONFIG names files in configs/ (default: every *-gpu.json); SEEDS trains
# each CONFIG once per seed (--seed S, into runs/CONFIG-sS); OVERHEAD, when
# set, times those nets' step against Adam on the GPU first
# (benchmarks.overhead, 1.8M-parameter MLP and the CNN), once per entry of
# OVERHEAD_SLICES when that is set (--slice-entries N: slices of N entries,
# e.g. "65536 4194304" for the CPU's slices against a GPU's whole tensors,
# into $OUT/overhead-N). The runs, their
# logs and the overhead tables come back in $OUT/runs.tgz. Each run's
# --init-from (runs/mlp-tangent-lr/optimizer.pt for *-gpu.json, the *-gpu
# runs' optimizer.pt for *-gpu2*.json) must be there. Without the mnist1d
# package, put its wheel in .whl/ (it is installed into /tmp/site with no
# network).
set -u
OUT=${OUT:-/tmp/gpu-session}
TRAIN_S=${TRAIN_S:-450}
DEVICE=${DEVICE:-cuda}  # DEVICE=cpu rehearses the script where there is no GPU
POPULATIONS=${POPULATIONS-16 128}
SEEDS=${SEEDS-}
OVERHEAD=${OVERHEAD-}
OVERHEAD_SLICES=${OVERHEAD_SLICES-}
KEEP_CHECKPOINTS=${KEEP_CHECKPOINTS-}
TAG=${TAG-}
EXTRA_ARGS=${EXTRA_ARGS-}
mkdir -p "$OUT/logs"
export PYTHONUNBUFFERED=1 MALLOC_MMAP_THRESHOLD_=4000000000 MALLOC_TRIM_THRESHOLD_=4000000000
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
} > "$OUT/device.txt" 2>&1
cat "$OUT/device.txt"
# Build the datasets once, so parallel runs do not race on the cache file.
python3 -c "from tasks.families import get_dataset as g; [g(n) for n in ('mnist1d', 'mnist1d-conv', 'digits')]"

# Throughput first, alone on the GPU (the trainings would share it);
# POPULATIONS= (empty) skips it.
if [ -n "$POPULATIONS" ]; then
    timeout 90 python3 -m benchmarks.meta_throughput --device "$DEVICE" --populations $POPULATIONS \
        --repeats 3 > "$OUT/throughput.txt" 2>&1
    cat "$OUT/throughput.txt"
fi

if [ -n "$OVERHEAD" ]; then
    for slices in ${OVERHEAD_SLICES:-default}; do
        if [ "$slices" = default ]; then tag=overhead; slice_arg=(); else tag=overhead-$slices; slice_arg=(--slice-entries "$slices"); fi
        # shellcheck disable=SC2086
        timeout 120 python3 -m benchmarks.overhead --device "$DEVICE" --models mlp-1.8m cnn-57k --repeats 10 \
            --no-memory --no-nfn "${slice_arg[@]}" $OVERHEAD --out "$OUT/$tag" > "$OUT/$tag.txt" 2>&1
        cat "$OUT/$tag.txt"
    done
fi

configs=("$@")
if [ ${#configs[@]} -eq 0 ]; then
    configs=(configs/*-gpu.json)
fi
# One run per config and seed: runs/NAME, or runs/NAME-sSEED with SEEDS.
runs=()
pids=()
for c in "${configs[@]}"; do
    name=$(basename "$c" .json)
    stem=$name${TAG:+-$TAG}
    for seed in ${SEEDS:-default}; do
        if [ "$seed" = default ]; then run=$stem; seed_arg=(); else run=$stem-s$seed; seed_arg=(--seed "$seed"); fi
        # EXTRA_ARGS is split into words on purpose (several flags).
        # shellcheck disable=SC2086
        timeout -s INT "$TRAIN_S" python3 -m meta_train --config "configs/$name.json" "${seed_arg[@]}" $EXTRA_ARGS \
            --device "$DEVICE" --out "runs/$run" > "$OUT/logs/$run.log" 2>&1 &
        runs+=("$run")
        pids+=($!)
    done
done
timeout 240 python3 -m pytest -p no:cacheprovider tests/test_cuda.py -q -rs > "$OUT/test_cuda.txt" 2>&1
tail -5 "$OUT/test_cuda.txt"
wait "${pids[@]}"
for run in "${runs[@]}"; do
    # tqdm redraws with \r: keep the last state of each line.
    echo "$run: $(tr '\r' '\n' < "$OUT/logs/$run.log" | grep -E 'meta-train|wrote|Error' | tail -2)"
done
# Few files may come back from a remote machine: logs and tables go in the archive.
# KEEP_CHECKPOINTS=1 keeps each run's checkpoint.pt, so a CPU can finish it
# (python -m meta_train --resume runs/NAME --device cpu); the archive then
# comes back in parts under 15 MiB (cat runs.tgz.part-* | tar xz).
exclude=(--exclude=checkpoint.pt)
if [ -n "$KEEP_CHECKPOINTS" ]; then exclude=(); fi
tar czf "$OUT/runs.tgz" "${exclude[@]}" "${runs[@]/#/runs/}" -C "$OUT" logs $(cd "$OUT" && find . -maxdepth 1 -type d -name 'overhead*')
if [ "$(stat -c %s "$OUT/runs.tgz")" -gt $((15 * 1024 * 1024)) ]; then
    split -b 15M "$OUT/runs.tgz" "$OUT/runs.tgz.part-" && rm "$OUT/runs.tgz"
fi
rm -rf "$OUT/logs" "$OUT"/overhead*/
ls -la "$OUT"

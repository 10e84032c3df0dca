#!/usr/bin/env bash
# The GPU checklist (docs/benchmarks.md, "The GPU checklist"), in order, on a machine with a CUDA
# GPU, each step under a time limit so one hang does not take the rest:
#   bash bench/gpu_checklist.sh [OUT]        # OUT (default: gpu-checklist) gets one log per step
# 1 the machine (CUDA, driver, DALI), 2 the GPU tests and the two-rank trainer tests (they must
# pass or stop with the one-line GPU-sharing error, never hang), 3 loader overhead against
# synthetic on-device batches, 4 the throughput grid (DeepMerge II and ResNet18; batch 128 and 512;
# bf16 on/off; channels_last on/off; gpu-resident and DALI). Installs with `make install` first.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-gpu-checklist}
mkdir -p "$out"
make -s install >"$out/0-install.log" 2>&1 || { echo "install failed: $out/0-install.log" >&2; exit 1; }
py=${VIRTUAL_ENV:+python}; py=${py:-.venv/bin/python}

step() {  # step NAME SECONDS COMMAND...: run it, log it, say how it ended
    local name=$1 limit=$2; shift 2
    local start=$SECONDS
    timeout "$limit" "$@" >"$out/$name.log" 2>&1
    local rc=$?
    echo "$name: exit $rc after $((SECONDS - start)) s (log: $out/$name.log)"
}

step 1-machine 120 bash -c "nvidia-smi; $py -c 'import torch; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"available\", torch.cuda.is_available(), torch.cuda.get_device_name(0))'; $py -c 'import nvidia.dali as d; print(\"dali\", d.__version__)'"
step 2-gpu-tests 900 "$py" -m pytest -q -m gpu tests
step 2-two-ranks 900 "$py" -m pytest -q tests/test_train.py tests/test_distributed.py tests/test_mpi.py -k "two_ranks or mpi or torchrun"
step 3-loader-overhead 600 "$py" bench/loaders.py --gpu-overhead
step 4-throughput 900 "$py" bench/throughput.py --models deepmerge2 resnet18 --batches 128 512 --amp none bf16 \
    --loaders gpu-resident dali

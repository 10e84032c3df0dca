#!/usr/bin/env bash
# The GPU checklist (docs/benchmarks.md, "The GPU checklist"): what no CI machine can run, in one
# command of at most 9 minutes on a machine with a CUDA GPU.
#
#   bash bench/gpu_checklist.sh [STEP...]     # steps: machine tests overhead throughput kernels (default: all)
#
# Each step runs under its own time limit (a hang costs that step, not the rest) and writes its log
# to $OUT (default: gpu-checklist/) as it goes, so a command stopped from outside still leaves what
# was done. Nothing is installed: it runs the project's .venv when there is one (`make install` on
# a connected machine), else the python3 on PATH with this checkout on PYTHONPATH (a GPU machine
# with its own PyTorch and no network). Packages that machine lacks can be put as wheels in .whl/
# (docs/benchmarks.md says which); they are installed offline into a temporary folder. Tests of
# what is still missing skip, saying so.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-checklist}
mkdir -p "$out"
export PYTHONUNBUFFERED=1  # a step stopped at its limit keeps what it printed
if [ -x .venv/bin/python ]; then py=.venv/bin/python; else py=python3; fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G ".whl/*.whl" >/dev/null; then
    site=$(mktemp -d)
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" .whl/*.whl \
        >"$out/0-wheels.log" 2>&1 && export PYTHONPATH="$PYTHONPATH:$site" \
        || echo "wheels in .whl/ not installed (log: $out/0-wheels.log); going on without them"
fi

step() {  # step NAME SECONDS COMMAND...: run it, log it, say how it ended
    local name=$1 limit=$2; shift 2
    local start=$SECONDS
    timeout -k 10 "$limit" "$@" >"$out/$name.log" 2>&1
    local rc=$?
    echo "$name: exit $rc after $((SECONDS - start)) s (log: $out/$name.log)"
    return $rc
}

machine() {
    nvidia-smi
    "$py" - <<'EOF'
import importlib.util, platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "cudnn", torch.backends.cudnn.version(), "available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("gpu", p.name, f"{p.total_memory / 2**30:.0f} GiB", f"capability {p.major}.{p.minor}",
          f"{p.multi_processor_count} SMs", "count", torch.cuda.device_count())
    from dmhpc.data.loaders import dali_runs
    print("dali:", dali_runs(torch.device("cuda", 0)) or "runs on cuda:0")
for name in ("h5py", "yaml", "tqdm", "astropy", "captum", "onnxruntime", "safetensors", "mpi4py", "submitit",
             "galsim", "optuna", "nvidia.dali"):
    found = importlib.util.find_spec(name.split(".")[0]) is not None and (
        name != "nvidia.dali" or importlib.util.find_spec(name) is not None)
    print(f"{name}: {'present' if found else 'MISSING'}")
raise SystemExit(0 if torch.cuda.is_available() else 3)
EOF
}

steps=("$@")
[ ${#steps[@]} -gt 0 ] || steps=(machine tests overhead throughput kernels)
for s in "${steps[@]}"; do
    case $s in
        machine)
            export -f machine; export py
            step 1-machine 45 bash -c machine
            if [ $? -eq 3 ]; then echo "no CUDA device here: the rest of the checklist needs one" >&2; exit 3; fi ;;
        tests)  # every CUDA test, including the two-rank launch with every GPU visible
            step 2-gpu-tests 240 "$py" -m pytest -v -rs -m gpu --continue-on-collection-errors -p no:cacheprovider \
                --timeout 150 tests ;;
        overhead)
            step 3-loader-overhead 75 "$py" bench/loaders.py --gpu-overhead --images 2048 --epochs 3 ;;
        throughput)
            step 4-throughput 120 "$py" bench/throughput.py --models deepmerge2 resnet18 --batches 128 512 \
                --amp none bf16 --loaders gpu-resident dali --steps 10 --warmup 3 --images 2048 ;;
        kernels)  # what train.deterministic costs, and what cuDNN's autotuning would give
            step 5-kernels 60 "$py" bench/throughput.py --models deepmerge2 resnet18 --batches 512 --amp bf16 \
                --loaders gpu-resident --kernels default deterministic autotuned --steps 10 --warmup 3 --images 2048 ;;
        *) echo "unknown step $s: expected machine, tests, overhead, throughput or kernels" >&2; exit 2 ;;
    esac
done
tail -n 5 "$out"/2-gpu-tests.log "$out"/3-loader-overhead.log 2>/dev/null
tail -n 40 "$out"/4-throughput.log "$out"/5-kernels.log 2>/dev/null
exit 0

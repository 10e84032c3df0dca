#!/usr/bin/env bash
# The GPU checklist (docs/benchmarks.md, "The GPU checklist"): what no CI machine can run, in one
# command of at most 9 minutes (and 70 s for the time limits' kill grace) on a machine with a CUDA GPU.
#
#   bash bench/gpu_checklist.sh [STEP...]     # steps: machine tests overhead throughput kernels profile (default: all)
#
# Each step runs under its own time limit (a hang costs that step, not the rest) and writes its log
# to $OUT (default: gpu-checklist/) as it goes, so a command stopped from outside still leaves what
# was done. Nothing is installed: it runs the project's .venv when there is one (`make install` on
# a connected machine), else the python3 on PATH with this checkout on PYTHONPATH (a GPU machine
# with its own PyTorch and no network). Packages that machine lacks can be put as wheels in .whl/
# (docs/benchmarks.md says which); they are installed offline into a temporary folder. The GPU
# tests use the packages the machine step calls needed without skipping (a missing one fails them,
# and that step says so first); DALI's tests and rows skip without it, saying so. Every step runs whatever failed before it; the exit code
# is then the worst step's: a package the GPU tests need missing, a wheel not installed, a
# benchmark row that failed all make it non-zero.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-checklist}
mkdir -p "$out"
export PYTHONUNBUFFERED=1  # a step stopped at its limit keeps what it printed
if [ -x .venv/bin/python ]; then py=.venv/bin/python; else py=python3; fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
worst=0
if compgen -G ".whl/*.whl" >/dev/null; then
    site=$(mktemp -d)
    trap 'rm -rf "$site"' EXIT
    export PYTHONPATH="$PYTHONPATH:$site"
    for wheel in .whl/*.whl; do  # one at a time: one wheel of another Python version drops only itself
        timeout 60 "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" \
            "$wheel" >>"$out/0-wheels.log" 2>&1 || { echo "$wheel: not installed (log: $out/0-wheels.log)"; worst=1; }
    done
fi

step() {  # step NAME SECONDS COMMAND...: run it, log it, say how it ended
    local name=$1 limit=$2; shift 2
    local start=$SECONDS
    timeout -k 10 "$limit" "$@" >"$out/$name.log" 2>&1
    local rc=$?
    echo "$name: exit $rc after $((SECONDS - start)) s (log: $out/$name.log)"
    return $rc
}

machine() {  # exit 3 without a CUDA device (the checklist stops), 4 with a piece the GPU tests need missing
    local smi=0
    nvidia-smi || { echo "nvidia-smi: MISSING or failed (no driver version to record)"; smi=1; }
    "$py" - <<'EOF'
import importlib.util, platform
# The GPU tests and benchmarks need the first ones; without the others some rows or tests are left out.
needed = ("torch", "numpy", "h5py", "yaml", "tqdm", "matplotlib", "sklearn", "tensorboard", "astropy", "captum",
          "safetensors", "pytest")
optional = ("pytest_timeout", "onnxruntime", "onnxscript", "pyarrow", "pandas", "mpi4py", "submitit",
            "galsim", "optuna", "nvidia.dali")
missing = []
for name in needed + optional:
    try:
        found = importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # nvidia without dali
        found = False
    if not found and name in needed:
        missing.append(name)
    print(f"{name}: {'present' if found else 'MISSING' + (' (needed)' if name in needed else ' (optional)')}")
import torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "cudnn", torch.backends.cudnn.version(), "available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("gpu", p.name, f"{p.total_memory / 2**30:.0f} GiB", f"capability {p.major}.{p.minor}",
          f"{p.multi_processor_count} SMs", "count", torch.cuda.device_count())
    try:
        from dmhpc.data.loaders import dali_runs
        print("dali:", dali_runs(torch.device("cuda", 0)) or "runs on cuda:0")
    except Exception as exc:
        print("dmhpc does not import here:", exc)
        missing.append("dmhpc")
if missing:
    print("needed and MISSING:", ", ".join(missing))
raise SystemExit(3 if not torch.cuda.is_available() else 4 if missing else 0)
EOF
    local rc=$?
    [ $rc -eq 0 ] && [ $smi -ne 0 ] && rc=4
    return $rc
}

steps=("$@")
[ ${#steps[@]} -gt 0 ] || steps=(machine tests overhead throughput kernels profile)
for s in "${steps[@]}"; do
    case $s in
        machine)
            export -f machine; export py
            step 1-machine 30 bash -c machine
            rc=$?
            if [ $rc -eq 3 ]; then  # (a CPU build of torch says "cuda None" in the log)
                echo "no CUDA device here, or a torch without CUDA (see $out/1-machine.log): the rest of the checklist needs one" >&2
                exit 3
            fi ;;
        tests)  # every CUDA test, including the two-rank launch with every GPU visible
            limit=()  # pytest-timeout's per-test limit where it is installed (without it, --timeout is a usage error)
            "$py" -c "import pytest_timeout" 2>/dev/null && limit=(--timeout 150)
            # Only the modules that hold a GPU test: one without any that needs a package this machine
            # lacks (GalSim, 55 MB, cannot travel as a wheel) made the step fail with every GPU test passed.
            mapfile -t modules < <(grep -rl --include='test_*.py' 'mark\.gpu' tests | sort)
            step 2-gpu-tests 250 "$py" -m pytest -v -rs -m gpu --continue-on-collection-errors -p no:cacheprovider \
                ${limit[@]+"${limit[@]}"} "${modules[@]}"
            rc=$? ;;
        overhead)
            step 3-loader-overhead 60 "$py" bench/loaders.py --gpu-overhead --model deepmerge2 --images 4096 --epochs 3
            rc=$? ;;
        throughput)
            step 4-throughput 100 "$py" bench/throughput.py --models deepmerge2 resnet18 --batches 128 512 \
                --amp none bf16 --loaders gpu-resident dali --steps 20 --warmup 3 --images 8192
            rc=$? ;;
        kernels)  # what train.deterministic costs (a process of its own: cuBLAS reads its workspace
                  # setting once), and what cuDNN's autotuning would give
            common=(--models deepmerge2 resnet18 --batches 512 --amp bf16 --loaders gpu-resident --steps 20 --warmup 3
                    --images 4096)
            step 5-kernels 30 "$py" bench/throughput.py "${common[@]}" --kernels default autotuned
            rc=$?
            step 5-kernels-deterministic 25 "$py" bench/throughput.py "${common[@]}" --kernels deterministic
            last=$?
            [ $last -gt $rc ] && rc=$last ;;
        profile)  # where a DeepMerge II step's time goes: host against device, operators by time
            step 6-profile 40 "$py" bench/step_profile.py --model deepmerge2 --batch 512 --amp bf16 --channels-last
            rc=$? ;;
        *) echo "unknown step $s: expected machine, tests, overhead, throughput, kernels or profile" >&2; exit 2 ;;
    esac
    [ "$rc" -gt "$worst" ] && worst=$rc
done
tail -n 5 "$out"/2-gpu-tests.log "$out"/3-loader-overhead.log 2>/dev/null
tail -n 40 "$out"/4-throughput.log "$out"/5-kernels*.log 2>/dev/null
head -n 2 "$out"/6-profile.log 2>/dev/null
exit "$worst"  # the worst step's exit code: 0 only when every step passed

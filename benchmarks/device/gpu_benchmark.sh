#!/usr/bin/env bash
# Run on the GPU machine (device tool), from the repository root, after fetch_wheels.sh here:
#   run(command="bash benchmarks/device/gpu_benchmark.sh", carry=[".whl"], timeout_s=540)
# Installs the carried wheels, then times VMM-scVI against scvi-tools SCVI on the same GPU (issue 5, deliverable 5):
# the epochs table of benchmarks/scale_benchmark.py with --accelerator gpu.  Results land in $OUT (the device tool
# brings them back): scale_benchmark_gpu.json and the log.  Extra arguments go to scale_benchmark.py (e.g. --cells
# 10000 for a shorter run).
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${OUT:-runs/device}
mkdir -p "$out"
site=${SITE:-runs/device-site}  # where the wheels are installed (runs/ is git-ignored)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "${WHEEL_DIR:-.whl}"/*.whl \
    || { echo "installing the carried wheels failed" >&2; exit 1; }
export PYTHONPATH="$PWD/$site" PYTHONUNBUFFERED=1 MPLBACKEND=Agg
# the image has JAX with its CUDA plugin: should anything import it, it must not take most of the GPU's memory
export XLA_PYTHON_CLIENT_PREALLOCATE=false
# pyro_vmm.models is models/ (pyproject's package-dir); from a plain checkout, put it where the import looks
[ -e pyro_vmm/models ] || cp -r models pyro_vmm/models
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee "$out/gpu.txt"
python3 -c "import torch, pyro, scvi, lightning; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), \
'pyro', pyro.__version__, 'scvi-tools', scvi.__version__, 'lightning', lightning.__version__)" 2>&1 | tee -a "$out/gpu.txt"
accel=${ACCELERATOR:-gpu}
python3 benchmarks/scale_benchmark.py --epochs-table --accelerator "$accel" --threads "${THREADS:-4}" \
    --out "$out/scale_benchmark_gpu.json" "$@" 2>&1 | grep -v -i -E "warn|tip:|litlogger" | tee "$out/log.txt"
exit "${PIPESTATUS[0]}"

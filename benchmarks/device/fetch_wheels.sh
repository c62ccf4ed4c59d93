#!/usr/bin/env bash
# Download, here, the wheels the GPU machine lacks (benchmarks/device/requirements.txt) into .whl/ at the repository
# root (git-ignored), for the device's Python (3.12 unless PY_VERSION says otherwise); docrep has no wheel on PyPI,
# so its (pure-Python) wheel is built here.  Then, with the device tool:
#   run(command="bash benchmarks/device/gpu_benchmark.sh", carry=[".whl"], timeout_s=540)
set -euo pipefail
cd "$(dirname "$0")/../.."
py=${PY_VERSION:-3.12}
dest=${WHEEL_DIR:-.whl}
rm -rf "$dest" && mkdir -p "$dest"
platforms=()
for n in 2_39 2_35 2_34 2_31 2_28 2_27 2_24 2_17; do platforms+=(--platform "manylinux_${n}_x86_64"); done
platforms+=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64)
reqs=benchmarks/device/requirements.txt
no_wheel='^docrep=='  # requirements with only an sdist on PyPI (pure Python: their wheel is built here)
log=$(mktemp)
if ! python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$py" --implementation cp \
        "${platforms[@]}" -d "$dest" -r <(grep -v -E "$no_wheel" "$reqs") >"$log" 2>&1 \
    || ! python3 -m pip wheel -q --no-deps -w "$dest" -r <(grep -E "$no_wheel" "$reqs") >>"$log" 2>&1
then
    grep -v "is ignored: it is neither a file nor a directory" "$log" | tail -20
    exit 1
fi
n=$(ls "$dest"/*.whl | wc -l)
want=$(grep -c '^[a-z]' "$reqs")
[ "$n" -eq "$want" ] || { echo "got $n wheels for $want requirements" >&2; exit 1; }
echo "$n wheels for Python $py in $dest ($(du -sh "$dest" | cut -f1); the device tool carries at most 64 MiB)"

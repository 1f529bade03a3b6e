#!/usr/bin/env bash
# Build and install Horovod 0.28.1 (Gloo, PyTorch + TensorFlow) into the current Python environment.
#
# Why a script: Horovod 0.28.1 is published as a source distribution only, and that sdist does not build
# against torch >= 2.1 (needs C++17) or the TensorFlow 2.21 CPU wheel (its XLA op needs a header the wheel
# does not ship). This script downloads the sdist, applies the two CMake edits, and builds it with Gloo.
#
# Usage:   scripts/build_horovod.sh            (uses $PYTHON, else the active venv's python, else python3)
#          PYTHON=/path/to/venv/bin/python scripts/build_horovod.sh
#          HOROVOD_CACHE_DIR=/some/dir ...      (where the sdist is downloaded; default ~/.cache/deepgalaxy/horovod)
#          FORCE=1 ...                          (rebuild even if Horovod already imports)
# Needs:   a C++17 compiler (g++), cmake >= 3.13, and torch + tensorflow(-cpu) already installed in that python.
# Idempotent: exits at once if `import horovod.torch, horovod.tensorflow` already works.
set -euo pipefail

HOROVOD_VERSION="${HOROVOD_VERSION:-0.28.1}"

if [[ -n "${PYTHON:-}" ]]; then
    PY="$PYTHON"
elif [[ -n "${VIRTUAL_ENV:-}" ]]; then
    PY="$VIRTUAL_ENV/bin/python"
else
    PY="$(command -v python3 || command -v python)"
fi
echo "build_horovod: using python $PY ($("$PY" -c 'import sys; print(sys.version.split()[0])'))"

if [[ -z "${FORCE:-}" ]] && "$PY" -c "import horovod.torch, horovod.tensorflow" >/dev/null 2>&1; then
    echo "build_horovod: horovod.torch and horovod.tensorflow already import; nothing to do (FORCE=1 rebuilds)."
    exit 0
fi

for tool in cmake g++; do
    command -v "$tool" >/dev/null 2>&1 || { echo "build_horovod: '$tool' not found; install it (e.g. apt-get install cmake g++)" >&2; exit 1; }
done
"$PY" -c "import torch, tensorflow" >/dev/null 2>&1 || {
    echo "build_horovod: torch and tensorflow must be installed in $PY first (Horovod builds against them)" >&2; exit 1; }
# Build-time helpers Horovod's setup.py imports (no build isolation, so they must be present).
"$PY" -c "import wheel, packaging" >/dev/null 2>&1 || "$PY" -m pip install --quiet wheel packaging

CACHE_DIR="${HOROVOD_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/deepgalaxy/horovod}"
mkdir -p "$CACHE_DIR"
SDIST="$CACHE_DIR/horovod-${HOROVOD_VERSION}.tar.gz"
if [[ ! -s "$SDIST" ]]; then
    echo "build_horovod: downloading horovod==${HOROVOD_VERSION} sdist into $CACHE_DIR"
    "$PY" -m pip download --quiet --no-deps --no-binary :all: "horovod==${HOROVOD_VERSION}" -d "$CACHE_DIR"
fi

WORK="$(mktemp -d "${TMPDIR:-/tmp}/horovod-build.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
tar -xzf "$SDIST" -C "$WORK"
SRC="$WORK/horovod-${HOROVOD_VERSION}"

# Edit 1: torch >= 2.1 needs C++17 (CXXFLAGS does not help: the CMake files strip -std).
sed -i 's/set(CMAKE_CXX_STANDARD 14)/set(CMAKE_CXX_STANDARD 17)/' "$SRC/CMakeLists.txt" "$SRC/horovod/torch/CMakeLists.txt"
# Edit 2: drop the XLA op (needs a header the TF wheel lacks; not needed on CPU/Gloo).
sed -i '/xla_mpi_ops.cc/d' "$SRC/horovod/tensorflow/CMakeLists.txt"
grep -q 'CMAKE_CXX_STANDARD 17' "$SRC/CMakeLists.txt" "$SRC/horovod/torch/CMakeLists.txt" || {
    echo "build_horovod: the C++17 edit did not apply; the sdist layout changed" >&2; exit 1; }
if grep -q 'xla_mpi_ops.cc' "$SRC/horovod/tensorflow/CMakeLists.txt"; then
    echo "build_horovod: the xla_mpi_ops edit did not apply" >&2; exit 1
fi

echo "build_horovod: building (3-5 minutes on 2 idle cores, much longer on a busy machine)"
HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITHOUT_MPI=1 \
    MAKEFLAGS="${MAKEFLAGS:--j$(nproc 2>/dev/null || echo 2)}" \
    "$PY" -m pip install --no-build-isolation --no-cache-dir "$SRC"

"$PY" -c "import horovod, horovod.torch, horovod.tensorflow; print('build_horovod: horovod', horovod.__version__, 'imports fine')"
BIN_DIR="$(dirname "$PY")"
if [[ -x "$BIN_DIR/horovodrun" ]]; then
    echo "build_horovod: horovodrun at $BIN_DIR/horovodrun"
fi

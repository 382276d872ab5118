#!/usr/bin/env bash
# Creates the llama.cpp peer venv for benchmarks/bench_vs_llamacpp.py, idempotently:
#   .venv-peers/llamacpp with llama-cpp-python pinned (its wheel builds llama.cpp from source:
#   ~12 minutes on two cores; a benchmark peer only, never a CI step).
# GGML_NATIVE=ON builds for this CPU (AVX2 / AVX-512 as present), as a user's pip install does.
# --no-cache-dir: a wheel cached by an earlier build was compiled for THAT machine's CPU (the
# cache outlives a machine change) and crashed here; a native build is never reused.
# Usage: bash benchmarks/peers/setup_llamacpp.sh
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
VENV="${LLAMACPP_VENV:-$ROOT/.venv-peers/llamacpp}"
VERSION="${LLAMACPP_VERSION:-0.3.36}"
PY="${PYTHON:-python3}"
# the build is native: it is kept only on the CPU it was built for (model name and flags)
CPU_STAMP="$(grep -m1 -E '^(model name|flags)' /proc/cpuinfo; grep -m1 '^flags' /proc/cpuinfo | md5sum)"
if [ -x "$VENV/bin/python" ] && [ "$(cat "$VENV/.built-for-cpu" 2>/dev/null)" = "$CPU_STAMP" ] \
   && "$VENV/bin/python" -c "import llama_cpp, sys; sys.exit(llama_cpp.__version__ != '$VERSION')" 2>/dev/null; then
  echo "llama-cpp-python $VERSION ready in $VENV"; exit 0
fi
mkdir -p "$(dirname "$VENV")"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
DEFAULT_ARGS="-DGGML_NATIVE=ON"
if grep -qw amx_int8 /proc/cpuinfo; then
  # llama.cpp's AMX path segfaults in its first matrix product on Sapphire Rapids VMs (upstream
  # issue "segfault in ggml_backend_amx_mul_mat", seen here with 0.3.36): the same native
  # instruction sets without AMX (a native build would switch AMX on)
  DEFAULT_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON"
  for f in avx_vnni:GGML_AVX_VNNI avx512f:GGML_AVX512 avx512vbmi:GGML_AVX512_VBMI avx512_vnni:GGML_AVX512_VNNI avx512_bf16:GGML_AVX512_BF16; do
    grep -qw "${f%%:*}" /proc/cpuinfo && DEFAULT_ARGS="$DEFAULT_ARGS -D${f#*:}=ON"
  done
  DEFAULT_ARGS="$DEFAULT_ARGS -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
fi
echo "building llama.cpp with $DEFAULT_ARGS"
CMAKE_ARGS="${CMAKE_ARGS:-$DEFAULT_ARGS}" "$VENV/bin/pip" install -q --no-cache-dir --force-reinstall --no-binary llama-cpp-python "llama-cpp-python==$VERSION"
"$VENV/bin/python" -c "import llama_cpp; print('llama-cpp-python', llama_cpp.__version__)"
# the features the library was compiled for (a build for another CPU shows here)
"$VENV/bin/python" -c "import llama_cpp; print(llama_cpp.llama_print_system_info().decode())"
printf "%s" "$CPU_STAMP" > "$VENV/.built-for-cpu"

#!/usr/bin/env bash
# Install llama-cpp-python from source (3-7 minutes of compiling) and compare its batch-1
# decode with lmforge's kept-quantized path on the default model's GGUF:
#   scripts/bench-llama-cpp.sh [extra benchmarks/decode_quant.py arguments]
# A benchmark-only dependency: never installed by scripts/setup.sh or CI. The flags build
# AVX-512 kernels without -march=native (a native build died with an illegal instruction
# on a CPU that lists AMX), with the VNNI and BF16 extensions where this CPU lists them, so
# that llama.cpp gets the same integer dot products lmforge's own kernels use.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
if ! "$PY" -c "import llama_cpp" 2>/dev/null; then
    FLAGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON"
    grep -qw avx512_vnni /proc/cpuinfo && FLAGS="$FLAGS -DGGML_AVX512_VNNI=ON"
    grep -qw avx512_bf16 /proc/cpuinfo && FLAGS="$FLAGS -DGGML_AVX512_BF16=ON"
    CMAKE_ARGS="$FLAGS" \
        nice -n 10 "$PY" -m pip install --no-cache-dir "llama-cpp-python==0.3.36"
fi
exec "$PY" benchmarks/decode_quant.py --vs-llama-cpp "$@"

#!/usr/bin/env bash
# Installs llama-cpp-python (the llama.cpp peer for benches and the GGUF-export check), never a
# runtime dependency of gemmalab. It compiles llama.cpp from source (~10-20 min on 2 cores), so the
# wheel is cached in bench/.cache/wheels and reused by later runs.
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
WHEELS=bench/.cache/wheels
if python -c "import llama_cpp.server.app, sys; sys.exit(__import__('llama_cpp').__version__ != '$VERSION')" 2>/dev/null; then
  echo "llama-cpp-python $VERSION already installed"; exit 0
fi
mkdir -p "$WHEELS"
if ! ls "$WHEELS"/llama_cpp_python-"$VERSION"-*.whl >/dev/null 2>&1; then
  echo "building llama-cpp-python $VERSION from source (cached in $WHEELS) ..."
  CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}" \
    pip wheel --no-deps -w "$WHEELS" "llama-cpp-python==$VERSION"
fi
pip install -c constraints.txt "$WHEELS"/llama_cpp_python-"$VERSION"-*.whl
# the OpenAI-compatible server (python -m llama_cpp.server) for bench/bench_serve.py
pip install -c constraints.txt sse-starlette starlette-context pydantic-settings fastapi uvicorn

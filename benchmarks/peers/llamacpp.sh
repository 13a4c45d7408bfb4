#!/usr/bin/env bash
# loraserve beside llama.cpp on the same GGUF file, in paired rounds:
#
#     bash benchmarks/peers/llamacpp.sh [llamacpp.py options]
#
# The peer lives outside the project (PEERS_DIR, default ~/.cache/loraserve/peers), made once:
# - llama.cpp itself: the prebuilt xllamacpp wheel (its C++ server in process; the Linux wheel is built for
#   AVX2, and a native AVX-512 build measured no faster on this machine), in a venv of its own;
# - llama.cpp's convert_lora_to_gguf.py (with the converter modules and gguf-py it imports), taken from the
#   llama.cpp tree vendored in the llama-cpp-python sdist on PyPI; it runs in the project's venv.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
peers="${PEERS_DIR:-$HOME/.cache/loraserve/peers}"
venv="$peers/xllamacpp"
src="$peers/llama.cpp-src"
XLLAMACPP_VERSION=2026.10.11549
SDIST_VERSION=0.3.36  # llama-cpp-python, for llama.cpp's converter scripts

if [ ! -x "$venv/bin/python" ] || [ ! -f "$venv/.installed" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check "xllamacpp==$XLLAMACPP_VERSION"
  touch "$venv/.installed"
fi

if [ ! -f "$src/.installed" ]; then
  mkdir -p "$src"
  "$root/.venv/bin/python" - "$src" "$SDIST_VERSION" <<'PY'
import io, json, sys, tarfile, urllib.request
dest, version = sys.argv[1], sys.argv[2]
index = urllib.request.Request("https://pypi.org/simple/llama-cpp-python/",  # the index pip itself reads
                               headers={"Accept": "application/vnd.pypi.simple.v1+json"})
url = next(f["url"] for f in json.load(urllib.request.urlopen(index))["files"]
           if f["filename"] == f"llama_cpp_python-{version}.tar.gz")
prefix = f"llama_cpp_python-{version}/vendor/llama.cpp/"
wanted = ("convert_lora_to_gguf.py", "convert_hf_to_gguf.py", "conversion/", "gguf-py/")
with tarfile.open(fileobj=io.BytesIO(urllib.request.urlopen(url).read()), mode="r:gz") as tar:
    members = []
    for m in tar.getmembers():
        if m.name.startswith(prefix) and m.name[len(prefix):].startswith(wanted):
            m.name = m.name[len(prefix):]
            members.append(m)
    tar.extractall(dest, members=members, filter="data")
PY
  touch "$src/.installed"
fi

export LLAMACPP_PYTHON="$venv/bin/python"
export LLAMACPP_CONVERT="$src/convert_lora_to_gguf.py"
cd "$root/benchmarks"
exec "$root/.venv/bin/python" peers/llamacpp.py "$@"

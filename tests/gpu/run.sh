#!/usr/bin/env bash
# The GPU check in one command: finds or installs ONNX Runtime's CUDA build (the
# `onnxruntime-gpu` package from PyPI, with the CUDA and cuDNN libraries it names), fetches the
# models, then runs tests/benches/gpu.rs: MiniLM and SmolLM2 through Kiln on the CUDA provider
# against the CPU provider (outputs compared, embeddings/s and tokens/s printed). It exits
# non-zero when CUDA is not actually used.
#
#   bash tests/gpu/run.sh [SECONDS]
#
# KILN_ORT_GPU_LIBRARY=/path/libonnxruntime.so skips the install (a machine without an index
# can install the wheels from a folder: PIP_FIND_LINKS=/wheels PIP_NO_INDEX=1).
set -euo pipefail
cd "$(dirname "$0")/../.."

if ! command -v nvidia-smi >/dev/null || ! nvidia-smi -L >/dev/null 2>&1; then
  echo "GPU CHECK FAILED: no NVIDIA GPU here (nvidia-smi -L)" >&2
  exit 1
fi
nvidia-smi -L

if [[ -z "${KILN_ORT_GPU_LIBRARY:-}" ]]; then
  venv="${KILN_GPU_VENV:-$HOME/.cache/kiln/ort-gpu-venv}"
  if [[ ! -x "$venv/bin/python" ]]; then
    echo "installing onnxruntime-gpu into $venv"
    python3 -m venv "$venv"
  fi
  # The newest CUDA build on PyPI (the CPU build is 1.32); its extras bring CUDA 13 and cuDNN.
  "$venv/bin/python" -m pip install --quiet "onnxruntime-gpu[cuda,cudnn]~=1.31.1"
  site="$("$venv/bin/python" -c 'import onnxruntime, os; print(os.path.dirname(onnxruntime.__file__))')"
  KILN_ORT_GPU_LIBRARY="$(ls "$site"/capi/libonnxruntime.so* | head -n1)"
  # The CUDA runtime, cuBLAS and cuDNN the provider loads, from the nvidia-* wheels.
  nvidia_libs="$(find "$("$venv/bin/python" -c 'import site; print(site.getsitepackages()[0])')/nvidia" \
    -name lib -type d 2>/dev/null | paste -sd: -)"
  export LD_LIBRARY_PATH="$site/capi:${nvidia_libs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
export KILN_ORT_GPU_LIBRARY
echo "ONNX Runtime (CUDA): $KILN_ORT_GPU_LIBRARY"

bash deploy/fetch-assets.sh >/dev/null
cargo bench -p kiln-tests --bench gpu -- "${1:-10}"

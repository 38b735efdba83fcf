"""The public API: requests, stopping rules, sampling, capacity and bad input."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from msd_engine import Engine
from msd_engine.image import ImageError
from msd_engine.kv_cache import CacheCapacityError
from msd_engine.tokenizer import PromptError
from tests.factories import IMAGE_TOKEN_ID, SPECS, image_tokens

SPEC = SPECS["gqa"]


@pytest.fixture(scope="module")
def engine(tiny_llava_dir):
    return Engine.load(tiny_llava_dir, dtype="float32", max_seq_len=128)


@pytest.fixture
def photo(tmp_path):
    path = tmp_path / "photo.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(path)
    return path


def no_eos(engine: Engine) -> Engine:
    engine.config = dataclasses.replace(engine.config, eos_token_ids=())
    return engine


def test_text_and_image_prompt_generate(engine, photo):
    result = engine.generate("Describe the picture.", image=photo, max_new_tokens=5)
    assert 1 <= len(result.token_ids) <= 5
    assert result.stats["prompt_tokens"] > image_tokens(SPEC)
    assert result.stats["prefill_ms"] > 0
    text_only = engine.generate("Hello there", max_new_tokens=3)
    assert text_only.stats["prompt_tokens"] < image_tokens(SPEC)


def test_image_once_equals_pre_expanded(engine, photo):
    from msd_engine.image import load_image, preprocess_images

    pixels = preprocess_images([load_image(photo)], engine.config.vision)
    once = engine.generate(input_ids=[1, 5, IMAGE_TOKEN_ID, 9, 10], pixel_values=pixels, max_new_tokens=6)
    expanded = [1, 5] + [IMAGE_TOKEN_ID] * image_tokens(SPEC) + [9, 10]
    again = engine.generate(input_ids=expanded, pixel_values=pixels, max_new_tokens=6)
    assert once.token_ids == again.token_ids


def test_max_new_tokens_is_never_exceeded(engine):
    eng = no_eos(engine)
    for n in (0, 1, 7):
        result = eng.generate(input_ids=[1, 100, 200], max_new_tokens=n)
        assert len(result.token_ids) == n and result.finish_reason == "length"


def test_stops_on_eos_and_includes_it(engine):
    eng = no_eos(engine)
    free = eng.generate(input_ids=[1, 100, 200], max_new_tokens=10).token_ids
    eng.config = dataclasses.replace(eng.config, eos_token_ids=(free[3],))
    stopped = eng.generate(input_ids=[1, 100, 200], max_new_tokens=10)
    first = free.index(free[3])
    assert stopped.token_ids == free[:first + 1] and stopped.finish_reason == "stop"
    no_eos(eng)


def test_capacity_ends_with_length_and_never_writes_past_the_arena(engine):
    eng = no_eos(engine)
    prompt = [1] + list(range(100, 200))  # 101 tokens; arena holds 128
    result = eng.generate(input_ids=prompt, max_new_tokens=100)
    assert result.finish_reason == "length"
    assert len(prompt) + len(result.token_ids) <= eng.cache.max_seq_len + 1
    assert eng.cache.length <= eng.cache.max_seq_len
    assert eng.cache.arena.shape[3] == 128  # never reallocated


def test_prompt_longer_than_cache_is_a_clear_error(engine):
    with pytest.raises(CacheCapacityError, match="prompt of 200 tokens does not fit max_seq_len 128"):
        engine.generate(input_ids=[1] * 200, max_new_tokens=1)


def test_sampling_is_reproducible_under_a_seed(engine):
    eng = no_eos(engine)
    a = eng.generate(input_ids=[1, 7, 8], max_new_tokens=12, temperature=1.0, top_p=0.9, seed=5)
    b = eng.generate(input_ids=[1, 7, 8], max_new_tokens=12, temperature=1.0, top_p=0.9, seed=5)
    c = eng.generate(input_ids=[1, 7, 8], max_new_tokens=12, temperature=1.0, top_p=0.9, seed=6)
    assert a.token_ids == b.token_ids and a.token_ids != c.token_ids


def test_tiny_top_p_is_greedy(engine):
    eng = no_eos(engine)
    greedy = eng.generate(input_ids=[1, 7, 8], max_new_tokens=8)
    nucleus = eng.generate(input_ids=[1, 7, 8], max_new_tokens=8, temperature=0.7, top_p=1e-6, seed=1)
    assert greedy.token_ids == nucleus.token_ids


def test_stream_concatenates_to_generate_text(engine, photo):
    eng = no_eos(engine)
    pieces = list(eng.stream("What is this?", image=photo, max_new_tokens=12))
    assert "".join(pieces) == eng.generate("What is this?", image=photo, max_new_tokens=12).text


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(prompt="<image> and <image>", image="PHOTO"), PromptError, "prompt has 2 <image> tags but 1 image"),
    (dict(prompt="<image> what?"), PromptError, "prompt has 1 <image> tag but 0 images"),
    (dict(prompt="x", input_ids=[1]), ValueError, "exactly one of `prompt`"),
    (dict(input_ids=[1, 5, IMAGE_TOKEN_ID]), PromptError, "1 image tokens .* for 0 image"),
    (dict(input_ids=[1, 40000]), ValueError, "40000, outside the vocabulary"),
    (dict(prompt="x", max_new_tokens=-1), ValueError, "max_new_tokens must be >= 0"),
    (dict(prompt="x", temperature=-1.0), ValueError, "temperature must be >= 0"),
    (dict(prompt="x", top_p=0.0), ValueError, "top_p must be in"),
])
def test_bad_requests_are_clear_errors(engine, photo, kwargs, error, message):
    kwargs = {k: (photo if v == "PHOTO" else v) for k, v in kwargs.items()}
    with pytest.raises(error, match=message):
        engine.generate(**kwargs)


def test_unreadable_image_is_a_clear_error(engine, tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(ImageError, match="broken.jpg"):
        engine.generate("what is it?", image=bad)


def test_text_only_model_refuses_images(smollm2_float32, photo):
    eng = Engine.load(smollm2_float32, dtype="float32", max_seq_len=64)
    with pytest.raises(PromptError, match="no vision tower"):
        eng.generate("what is it?", image=photo)


def test_load_errors_name_the_problem(tmp_path, tiny_llava_dir):
    with pytest.raises(FileNotFoundError, match="model directory not found"):
        Engine.load(tmp_path / "nope")
    with pytest.raises(ValueError, match="unknown backend 'jax'"):
        Engine.load(tiny_llava_dir, backend="jax")
    with pytest.raises(ValueError, match="unsupported dtype 'float64'"):
        Engine.load(tiny_llava_dir, dtype="float64")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="torch sees no CUDA device"):
            Engine.load(tiny_llava_dir, device="cuda")
        with pytest.raises(RuntimeError, match="backend 'cuda' .* needs device='cuda'"):
            Engine.load(tiny_llava_dir, backend="cuda")


def test_corrupt_weights_are_named(tmp_path, tiny_llava_dir):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_llava_dir, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ValueError, match="model.safetensors: corrupt or unreadable"):
        Engine.load(broken)


def test_triton_backend_gives_the_same_greedy_tokens(tiny_llava_dir, photo):
    # On a CPU the Triton kernels run in the interpreter (conftest sets TRITON_INTERPRET=1).
    ref = no_eos(Engine.load(tiny_llava_dir, dtype="float32", max_seq_len=128))
    tri = no_eos(Engine.load(tiny_llava_dir, dtype="float32", max_seq_len=128, backend="triton"))
    assert tri.model.text.ops.name == "triton"
    a = ref.generate("What is this?", image=photo, max_new_tokens=10)
    b = tri.generate("What is this?", image=photo, max_new_tokens=10)
    assert a.token_ids == b.token_ids

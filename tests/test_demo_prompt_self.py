"""The target-written prompt set (`prompt_self.py`): what a list item must be to be kept, how a
sampled continuation is split into items, and the set's guarantees (count, no repeats, apart from
excluded prompts, fixed by the seed) with a scripted sampler; the real sampler on the tiny LLaVA."""
from __future__ import annotations

import json

import pytest
import torch

from msd_engine.demo.prompt_self import (TOPICS, hf_sampler, list_items, list_prompt, replay_sample,
                                         self_written_prompts, usable)
from msd_engine.demo.recipe import Recipe, later_prompt_sets

EXAMPLES = ["How do volcanoes form?", "Write a haiku about autumn leaves.", "Why do cats purr?",
            "Give me three tips for learning a new language."]


@pytest.mark.parametrize("item, ok", [
    ("What does it mean to be a good friend?", True),
    ("Explain to someone how a computer works.", True),
    ("How to make a painting.", True),
    ("What is a snowflake?", True),                           # four words
    ("Tell me more", False),                                  # three words, no end mark
    ("what is the best way to stay warm?", False),            # lower-case start
    ("(about alien life) What is out there?", False),         # the list's own marker
    ('Someone might ask, "What is a book?"', False),          # quotes: not the item itself
    ("What is the Echo of \u00c9cho and what is it?", False),  # not ASCII
    ("How to make money with gaming", False),                 # no end mark
    ("Why " + "very " * 30 + "long?", False),                 # over 25 words
])
def test_usable(item, ok):
    assert usable(item) is ok


def test_list_items_stop_at_the_first_line_that_is_not_an_item():
    text = (" How music is created.\n5. How to give a speech.\n\n6. What are the benefits of meditation?\n"
            "Instead of asking, the user will ask.\n7. Never reached?")
    assert list_items(text) == ["How music is created.", "How to give a speech.",
                                "What are the benefits of meditation?"]
    assert list_items("\n5. What is a job?\n6. ") == ["What is a job?"]


def test_list_prompt_numbers_the_examples_and_names_the_topic():
    assert list_prompt(EXAMPLES[:3], "birds").endswith(
        "1. How do volcanoes form?\n2. Write a haiku about autumn leaves.\n3. Why do cats purr?\n4. (about birds)")


def _scripted(lines_per_call):
    """A sampler that answers every list with the next scripted continuation, recording its calls."""
    calls = []

    def sample(texts, seed):
        calls.append((len(texts), seed))
        k = len(calls) - 1
        return [lines_per_call[(k * len(texts) + i) % len(lines_per_call)] for i in range(len(texts))]

    return sample, calls


def test_kept_items_are_usable_new_and_apart_from_excluded_prompts():
    continuations = [
        " What is the capital of France?\n5. Why do cats purr?\n6. WHY do cats purr!",
        " How do bees make honey?\n5. (about bees)\n6. How do bees make their honey?",
        " Describe a sunny day at the beach.\n5. What is the tallest tree on Earth?",
        "\n5. How does a rainbow form in the sky?\n6. Name three rivers in Africa.\n7. how do clouds float",
    ]
    sample, calls = _scripted(continuations)
    exclude = ["What is the capital city of France?", "How does a rainbow form?"]
    got = [p["prompt"] for p in self_written_prompts(sample, 4, EXAMPLES, exclude, seed=3, batch_size=2)]
    # word-set overlap (shared / all words) >= 0.6 is too close: the France question (6/7) and the
    # rainbow question (5/8) to an excluded one, the second honey question (5/6) to the first;
    # "Why do cats purr?" is an example; "WHY ... !" and the lower-case one are not usable
    assert got == ["How do bees make honey?", "Describe a sunny day at the beach.",
                   "What is the tallest tree on Earth?", "Name three rivers in Africa."]
    assert calls == [(2, 300009), (2, 300010)]


def test_the_set_is_fixed_by_its_seed_and_lists_draw_examples_and_topics():
    seen = []

    def sample(texts, seed):
        seen.extend(texts)
        return [f" Q{seed}z{i} w{seed}a{i} v{seed}b{i} u{seed}c{i}?" for i in range(len(texts))]

    first = self_written_prompts(sample, 5, EXAMPLES, [], seed=1, batch_size=4)
    lists = list(seen)
    seen.clear()
    assert self_written_prompts(sample, 5, EXAMPLES, [], seed=1, batch_size=4) == first and seen == lists
    assert len(first) == 5 and len({p["prompt"] for p in first}) == 5
    for text in lists:
        assert text.count("\n") == 5 and text.split("(about ")[1][:-1] in TOPICS


def test_a_target_that_writes_nothing_usable_is_an_error():
    sample, calls = _scripted([" the end"])
    with pytest.raises(RuntimeError, match="no usable new prompt"):
        self_written_prompts(sample, 1, EXAMPLES, [], batch_size=1)
    assert len(calls) == 20
    with pytest.raises(ValueError, match="at least 3 examples"):
        self_written_prompts(sample, 1, EXAMPLES[:2], [])


def test_replay_sample():
    sets = [[{"prompt": f"a{i}"} for i in range(5)], [{"prompt": f"b{i}"} for i in range(5)]]
    got = replay_sample(sets, 6, seed=2)
    assert got == replay_sample(sets, 6, seed=2) and len({p["prompt"] for p in got}) == 6
    assert got != replay_sample(sets, 6, seed=3)
    with pytest.raises(ValueError, match="11 prompts asked, the earlier sets hold 10"):
        replay_sample(sets, 11)


def test_hf_sampler_on_the_tiny_llava_is_seeded(tiny_llava_dir):
    from msd_engine.engine import Engine
    from msd_engine.train.batched import load_hf_target

    engine = Engine.load(tiny_llava_dir, dtype="float32", max_seq_len=16)
    sample = hf_sampler(load_hf_target(tiny_llava_dir, torch.float32), engine.tokenizer,
                        engine.config.eos_token_ids, max_new_tokens=6)
    texts = [list_prompt(EXAMPLES[:3], "birds"), "A short one.\n1."]
    first = sample(texts, 5)
    assert len(first) == 2 and all(isinstance(t, str) and t for t in first)
    assert sample(texts, 5) == first
    # continuations only (not the lists themselves), and the seed matters: a random model over a
    # VOCAB-token vocabulary samples the same 12 tokens twice with negligible probability
    assert not any(t.startswith("A list of") or t.startswith("A short one") for t in first)
    assert sample(texts, 6) != first


def test_a_resumed_recipe_reads_the_written_set_instead_of_sampling_again(tmp_path):
    written = [{"prompt": "How do kites fly?"}]
    (tmp_path / "self-prompts.json").write_text(json.dumps(written))
    earlier = {"written": [{"prompt": f"w{i}"} for i in range(3)], "composed": [{"prompt": "c"}]}
    # no target at this path: loading it (to sample) would fail
    got = later_prompt_sets(tmp_path / "no-target", tmp_path, Recipe(self_prompts=1, replay_prompts=2), earlier,
                            progress=False)
    assert got["self"] == written and len(got["replay"]) == 2
    with pytest.raises(ValueError, match="holds 1 target-written prompts, the recipe asks for 3"):
        later_prompt_sets(tmp_path / "no-target", tmp_path, Recipe(self_prompts=3, replay_prompts=2), earlier,
                          progress=False)

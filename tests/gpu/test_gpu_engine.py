"""GPU checks (skipped without CUDA). Run with compiled Triton: `TRITON_INTERPRET=0 pytest tests/gpu`.

Compiled Triton kernels against float64 references in bfloat16/float16, and the engine's greedy
output identical across the torch, triton and cuda backends, plain and speculative.
"""
from __future__ import annotations

import dataclasses
import os

import pytest
import torch

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1",
                       reason="GPU tests compile Triton: run with TRITON_INTERPRET=0"),
]


def _reference(q, k, v, prefix, mask):
    t, hq, d = q.shape
    group = hq // k.shape[0]
    region = mask.shape[1]
    keys, values = k[:, :prefix + region].double(), v[:, :prefix + region].double()
    visible = torch.ones(t, prefix + region, dtype=torch.bool, device=q.device)
    visible[:, prefix:] = mask
    out = torch.empty(t, hq, d, dtype=torch.float64, device=q.device)
    for h in range(hq):
        s = q[:, h].double() @ keys[h // group].T / d ** 0.5
        out[:, h] = s.masked_fill(~visible, float("-inf")).softmax(-1) @ values[h // group]
    return out


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("t, prefix", [(1, 4000), (60, 1200), (64, 577), (128, 2049)])
def test_compiled_tree_attention_error_within_2x_torch(dtype, t, prefix):
    from msd_engine.triton_kernels.tree_attention import pack_mask, tree_attention

    torch.manual_seed(0)
    hq, hkv, d = 32, 32 if t % 2 else 8, 128
    q = torch.randn(t, hq, d, device="cuda", dtype=dtype)
    k = torch.randn(hkv, prefix + t + 7, d, device="cuda", dtype=dtype)
    v = torch.randn_like(k)
    parents = [-1] + [int(torch.randint(0, i, ())) for i in range(1, t)]
    mask = torch.eye(t, dtype=torch.bool, device="cuda")
    for i in range(1, t):
        mask[i] |= mask[parents[i]]
    ref = _reference(q, k, v, prefix, mask)
    out = tree_attention(q, k, v, prefix, pack_mask(mask), t)
    from msd_engine.ops.torch_ops import TorchOps
    plain = TorchOps().cached_attention(q, k, v, prefix, mask)
    err, plain_err = (out.double() - ref).abs().max(), (plain.double() - ref).abs().max()
    assert err <= 2 * plain_err + 1e-3, (float(err), float(plain_err))


@pytest.fixture(scope="module")
def gpu_model(tmp_path_factory):
    from msd_engine.convert.llava_hf import convert_llava_hf
    from tests.factories import SPECS, build_hf_llava, save_hf_llava

    root = tmp_path_factory.mktemp("gpu")
    save_hf_llava(build_hf_llava(SPECS["gqa"]), root / "hf")
    convert_llava_hf(root / "hf", root / "m", dtype="float32", force=False, progress=False)
    return root / "m"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_greedy_output_identical_across_backends(gpu_model, tmp_path, dtype):
    from msd_engine import Engine
    from tests.spec_doubles import write_random_draft

    ids = [1, 5, 32000, 9, 10, 11]
    pixels = torch.randn(1, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    draft = write_random_draft(Engine.load(gpu_model, dtype="float32"), tmp_path / "draft")
    outputs = {}
    for backend in ("torch", "triton", "cuda"):
        engine = Engine.load(gpu_model, device="cuda", dtype=dtype, backend=backend, draft=draft)
        engine.config = dataclasses.replace(engine.config, eos_token_ids=())
        plain = engine.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=32, speculative=False)
        spec = engine.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=32)
        assert spec.token_ids == plain.token_ids, backend
        outputs[backend] = plain.token_ids
    if dtype == "float32":
        assert outputs["triton"] == outputs["torch"] == outputs["cuda"]
    else:  # bfloat16 kernels round differently; the first tokens must agree before any near-tie
        assert outputs["triton"][:8] == outputs["torch"][:8] == outputs["cuda"][:8]

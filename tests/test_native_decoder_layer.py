"""`native_decoder.decoder_layer` (msd_decoder_layer_cpu): one call for a whole Llama layer.

It must equal, bit for bit, the per-op path it replaces (`TorchOps.decoder_layer` run on CpuOps'
native kernels): h, residual and the K/V written to the cache, on every SIMD path and dtype,
with and without a tree mask, with a next norm (target layers) and without (the draft head's
layer). As a check on the chain, float32 also stays within rounding of the layer computed in
float64 by plain torch (TorchOps on float64 tensors). Bad arguments raise errors that name them.
"""
from __future__ import annotations

import pytest
import torch

from msd_engine import native
from msd_engine.config import TextConfig
from msd_engine.kv_cache import StepState, pack_mask
from msd_engine.model.llama import LlamaLayer, rotary_tables
from msd_engine.ops.torch_ops import TorchOps

pytestmark = pytest.mark.skipif(not native.is_built(), reason="needs msd_engine._C")

if native.is_built():
    from msd_engine.kv_cache import KVCache
    from msd_engine.native_decoder import DecoderLayerWeights, decoder_layer, decoder_layers
    from msd_engine.ops.cpu_ops import CpuOps

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# (hidden, Hq, Hkv, D, F): GQA 3 as SmolLM2, MHA, an intermediate size off the SIMD widths.
SHAPES = ((96, 6, 2, 16, 160), (64, 4, 4, 16, 96), (72, 3, 1, 24, 130))
# Large enough that the linears and the attention run on the thread pool.
POOLED_SHAPE = (256, 8, 2, 32, 704)
SLOTS, PREFIX = 640, 37


def _isas() -> list[str]:
    if not native.is_built():
        return []
    best = native.CPU_ISAS.index(native.cpu_isa())
    usable = []
    for isa in native.CPU_ISAS[:best + 1]:
        try:
            native.set_cpu_isa(isa)
            usable.append(isa)
        except ValueError:
            pass
    native.set_cpu_isa(None)
    return usable


@pytest.fixture(params=_isas())
def isa(request):
    native.set_cpu_isa(request.param)
    yield request.param
    native.set_cpu_isa(None)


def config_for(shape) -> TextConfig:
    hidden, heads, kv_heads, head_dim, inter = shape
    return TextConfig(hidden_size=hidden, intermediate_size=inter, num_layers=1, num_heads=heads,
                      num_kv_heads=kv_heads, head_dim=head_dim, vocab_size=32, rms_norm_eps=1e-5)


def make_layer(shape, dtype, seed: int) -> tuple[LlamaLayer, torch.Tensor]:
    hidden, heads, kv_heads, head_dim, inter = shape
    g = torch.Generator().manual_seed(seed)

    def w(*size, scale=None):
        scale = size[-1] ** -0.5 if scale is None else scale
        return (torch.randn(*size, generator=g) * scale).to(dtype)

    norm = lambda: (1 + 0.2 * torch.randn(hidden, generator=g)).to(dtype)  # noqa: E731
    layer = LlamaLayer(input_norm=norm(), qkv_proj=w((heads + 2 * kv_heads) * head_dim, hidden),
                       o_proj=w(hidden, heads * head_dim), post_attention_norm=norm(),
                       gate_up_proj=w(2 * inter, hidden), down_proj=w(hidden, inter))
    return layer, norm()


def make_step(config: TextConfig, t: int, dtype, tree: bool, seed: int, start: int = PREFIX + 3,
              prefix_len: int = PREFIX) -> StepState:
    """T new tokens at slots [start, start + T); slots [prefix_len, start) are earlier scratch
    entries (a draft tree's) the mask shows to some queries."""
    cos, sin = rotary_tables(config, SLOTS, dtype, torch.device("cpu"))
    positions = torch.arange(prefix_len, prefix_len + t)
    mask = None
    if tree or start != prefix_len:
        g = torch.Generator().manual_seed(seed)
        region = start + t - prefix_len
        mask = torch.rand(t, region, generator=g) < 0.5
        mask[:, region - t:] = torch.eye(t, dtype=torch.bool) | (torch.rand(t, t, generator=g) < 0.3).tril()
    return StepState(positions=positions, start=start, prefix_len=prefix_len, mask=mask,
                     cos=cos[positions], sin=sin[positions])


def make_cache(config: TextConfig, dtype, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shape = (config.num_kv_heads, SLOTS, config.head_dim)
    return torch.randn(*shape, generator=g).to(dtype), torch.randn(*shape, generator=g).to(dtype)


def inputs(config: TextConfig, t: int, dtype, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(t, config.hidden_size, generator=g).to(dtype),
            (3 * torch.randn(t, config.hidden_size, generator=g)).to(dtype))


def padded_rows(t: torch.Tensor, pad: int) -> torch.Tensor:
    """t's values in rows `pad` elements longer than they are (a row stride the kernel must honour)."""
    out = torch.full((t.shape[0], t.shape[1] + pad), float("nan"), dtype=t.dtype)
    out[:, :t.shape[1]] = t
    return out[:, :t.shape[1]]


def run_both(shape, dtype, t, tree, with_norm, seed=0, prefix=PREFIX, decode=False, pad=0):
    """(native, per-op) results: (h or None, residual, k_cache, v_cache) each. `decode`: a step
    straight after the prefix with no mask (plain decoding); else 3 earlier scratch slots and a mask."""
    config = config_for(shape)
    ops = CpuOps(torch.device("cpu"))
    layer, next_norm = make_layer(shape, dtype, seed)
    block = ops.prepare_decoder_layer(layer, next_norm if with_norm else None, config)
    assert block.native is not None
    step = make_step(config, t, dtype, tree, seed, start=prefix if decode else prefix + 3, prefix_len=prefix)
    assert (step.mask is None) == decode
    h, residual = inputs(config, t, dtype, seed + 1)
    results = []
    for per_op in (False, True):
        k_cache, v_cache = make_cache(config, dtype, seed + 2)
        args = (block, padded_rows(h, pad), padded_rows(residual, pad), step, k_cache, v_cache)
        with ops.step_scope(t):
            if per_op:  # CpuOps' native kernels, one call per op
                out_h, out_r = TorchOps.decoder_layer(ops, *args)
            else:  # the layer call itself, not CpuOps' dispatch (which may fall back to the above)
                out_h, out_r = args[1], args[2]
                decoder_layer(block.native, out_h, out_r, step.cos, step.sin, k_cache, v_cache,
                              step.start, step.prefix_len, step.mask_bits)
                out_h = out_h if with_norm else None
        results.append((out_h, out_r, k_cache, v_cache))
    return results


def model_step(dtype, t: int, layers: int = 3, seed: int = 0):
    """(ops, blocks, step, h, residual, a KVCache with random history) for `layers` layers, the last
    one's next norm the final norm, as LlamaModel builds them."""
    config = config_for(SHAPES[0])
    ops = CpuOps(torch.device("cpu"))
    made = [make_layer(SHAPES[0], dtype, seed + i) for i in range(layers)]
    next_norms = [layer.input_norm for layer, _ in made[1:]] + [made[-1][1]]
    blocks = [ops.prepare_decoder_layer(layer, norm, config) for (layer, _), norm in zip(made, next_norms)]
    cache = KVCache(layers, config.num_kv_heads, SLOTS, config.head_dim, dtype, torch.device("cpu"))
    cache.arena.copy_(torch.randn(cache.arena.shape, generator=torch.Generator().manual_seed(seed)).to(dtype))
    step = make_step(config, t, dtype, tree=t > 1, seed=seed)
    h, residual = inputs(config, t, dtype, seed + 1)
    return ops, blocks, step, h, residual, cache


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("t", (1, 6))
def test_layers_in_one_go_equal_the_per_op_path_layer_by_layer(dtype, t):
    """CpuOps.decoder_layers (checks once, one native call per layer) against the per-op path
    run layer after layer: h, residual and every layer's cache, bit for bit."""
    ops, blocks, step, h, residual, cache = model_step(dtype, t)
    _, layers, kv_heads, slots, head_dim = cache.arena.shape
    ref_cache = KVCache(layers, kv_heads, slots, head_dim, dtype, torch.device("cpu"))
    ref_cache.arena.copy_(cache.arena)
    with ops.step_scope(t):
        out_h, out_r = ops.decoder_layers(blocks, h.clone(), residual.clone(), step, cache)
        ref_h, ref_r = h.clone(), residual.clone()
        for i, block in enumerate(blocks):
            ref_h, ref_r = TorchOps.decoder_layer(ops, block, ref_h, ref_r, step, *ref_cache.layer(i))
    assert torch.equal(out_h, ref_h) and torch.equal(out_r, ref_r)
    assert torch.equal(cache.arena, ref_cache.arena)


@pytest.mark.parametrize("t, native_calls", [(1, 3), (16, 3), (17, 0)])
def test_cpu_ops_runs_a_skinny_steps_layers_through_one_checked_call(monkeypatch, t, native_calls):
    import msd_engine.ops.cpu_ops as cpu_ops

    calls = []
    monkeypatch.setattr(cpu_ops, "decoder_layers", lambda layers, *a: calls.extend(layers) or decoder_layers(layers, *a))
    ops, blocks, step, h, residual, cache = model_step(torch.float32, t)
    ops.decoder_layers(blocks, h, residual, step, cache)
    assert len(calls) == native_calls
    # the draft head's layer (no norm after it): the same call, and no next normed input back
    config = config_for(SHAPES[0])
    draft = ops.prepare_decoder_layer(make_layer(SHAPES[0], torch.float32, 5)[0], None, config)
    out_h, out_r = ops.decoder_layers([draft], h, residual, step, cache)
    assert out_h is None and len(calls) == native_calls + (t <= 16)
    assert (out_r is residual) == (t <= 16)  # the native call adds into the caller's residual


def test_layers_whose_caches_differ_are_named_and_nothing_is_written():
    ops, blocks, step, h, residual, cache = model_step(torch.float32, 4)
    natives = [block.native for block in blocks]
    keys, values = list(cache.keys), list(cache.values)
    before = (h.clone(), residual.clone(), cache.arena.clone())
    args = (h, residual, step.cos, step.sin)
    tail = (step.start, step.prefix_len, step.mask_bits)
    with pytest.raises(ValueError, match="3 layers need as many k_caches and v_caches, got 2 and 3"):
        decoder_layers(natives, *args, keys[:2], values, *tail)
    with pytest.raises(ValueError, match=r"v_cache of layer 2 \(shape \(2, 100, 16\).* must match k_cache of layer 0"):
        decoder_layers(natives, *args, keys, values[:2] + [values[2][:, :100]], *tail)
    with pytest.raises(TypeError, match=r"k_cache of layer 1 must be a torch.float32 CPU tensor, got torch.float64"):
        decoder_layers(natives, *args, [keys[0], keys[1].double(), keys[2]], values, *tail)
    with pytest.raises(ValueError, match=r"k_cache of layer 1 \(shape \(2, 640, 16\), strides \(16, 32, 1\)\) must match"):
        decoder_layers(natives, *args, [keys[0], keys[1].transpose(0, 1).contiguous().transpose(0, 1), keys[2]],
                       values, *tail)
    with pytest.raises(TypeError, match=r"layers\[1\] must be DecoderLayerWeights, got NoneType"):
        decoder_layers([natives[0], None, natives[2]], *args, keys, values, *tail)
    other = model_step(torch.float16, 4)[1][0].native
    with pytest.raises(ValueError, match=r"layers\[2\] \(torch.float16, .*differs from layers\[0\]"):
        decoder_layers(natives[:2] + [other], *args, keys, values, *tail)
    assert torch.equal(h, before[0]) and torch.equal(residual, before[1])
    assert torch.equal(cache.arena, before[2])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("t", (1, 3, 8, 16))
def test_equals_the_per_op_path_bit_for_bit(isa, dtype, shape, t):
    (h, r, k, v), (h_ref, r_ref, k_ref, v_ref) = run_both(shape, dtype, t, tree=t > 1, with_norm=True)
    assert torch.equal(h, h_ref)
    assert torch.equal(r, r_ref)
    assert torch.equal(k, k_ref) and torch.equal(v, v_ref)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("prefix", (37, 64, 130, 577))
@pytest.mark.parametrize("t, decode", [(1, True), (6, False)], ids=["decode", "tree"])
def test_long_prefixes_plain_decode_and_the_pool(isa, dtype, prefix, t, decode):
    """Prefixes past the attention's 64-key blocks, a mask-free decode step, padded h / residual
    rows, and a layer large enough for the linears and the attention to use the thread pool."""
    (h, r, k, v), (h_ref, r_ref, k_ref, v_ref) = run_both(POOLED_SHAPE, dtype, t, tree=not decode,
                                                          with_norm=True, prefix=prefix, decode=decode, pad=5)
    assert h.stride(0) == POOLED_SHAPE[0] + 5  # updated in place, in the padded rows
    assert torch.equal(h, h_ref)
    assert torch.equal(r, r_ref)
    assert torch.equal(k, k_ref) and torch.equal(v, v_ref)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("t", (1, 5))
def test_without_next_norm_is_the_draft_layer(isa, dtype, t):
    (h, r, k, v), (h_ref, r_ref, k_ref, v_ref) = run_both(SHAPES[0], dtype, t, tree=True, with_norm=False)
    assert h is None and h_ref is None
    assert torch.equal(r, r_ref)
    assert torch.equal(k, k_ref) and torch.equal(v, v_ref)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_float32_within_rounding_of_float64_torch(shape):
    config = config_for(shape)
    layer, next_norm = make_layer(shape, torch.float32, 3)
    step = make_step(config, 6, torch.float32, True, 3)
    h, residual = inputs(config, 6, torch.float32, 4)
    k_cache, v_cache = make_cache(config, torch.float32, 5)
    ops = CpuOps(torch.device("cpu"))
    out_h, out_r = h.clone(), residual.clone()  # the layer call itself, not CpuOps' dispatch
    decoder_layer(ops.prepare_decoder_layer(layer, next_norm, config).native, out_h, out_r, step.cos,
                  step.sin, k_cache, v_cache, step.start, step.prefix_len, step.mask_bits)

    to64 = lambda t: t.double()  # noqa: E731
    layer64 = LlamaLayer(*(to64(getattr(layer, f)) for f in LlamaLayer.__dataclass_fields__))
    step64 = StepState(step.positions, step.start, step.prefix_len, step.mask, to64(step.cos), to64(step.sin))
    k64, v64 = (to64(c) for c in make_cache(config, torch.float32, 5))
    torch_ops = TorchOps()
    ref_h, ref_r = torch_ops.decoder_layer(torch_ops.prepare_decoder_layer(layer64, to64(next_norm), config),
                                           to64(h), to64(residual), step64, k64, v64)
    torch.testing.assert_close(out_r.double(), ref_r, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_h.double(), ref_h, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(k_cache.double(), k64, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(v_cache.double(), v64, rtol=1e-5, atol=1e-5)


# ---- bad input ---------------------------------------------------------------------------------
@pytest.fixture
def prepared():
    shape = SHAPES[0]
    config = config_for(shape)
    layer, next_norm = make_layer(shape, torch.float32, 7)
    weights = DecoderLayerWeights(layer.qkv_proj, layer.o_proj, layer.post_attention_norm,
                                  layer.gate_up_proj, layer.down_proj, next_norm,
                                  num_heads=config.num_heads, num_kv_heads=config.num_kv_heads,
                                  head_dim=config.head_dim, rms_norm_eps=1e-5)
    step = make_step(config, 4, torch.float32, True, 7)
    h, residual = inputs(config, 4, torch.float32, 8)
    k_cache, v_cache = make_cache(config, torch.float32, 9)
    return layer, next_norm, config, weights, step, h, residual, k_cache, v_cache


def test_weights_with_wrong_shapes_are_named(prepared):
    layer, next_norm, config, *_ = prepared
    sizes = dict(num_heads=config.num_heads, num_kv_heads=config.num_kv_heads, head_dim=config.head_dim,
                 rms_norm_eps=1e-5)
    with pytest.raises(ValueError, match="o_weight has shape"):
        DecoderLayerWeights(layer.qkv_proj, layer.o_proj[:, 1:], layer.post_attention_norm,
                            layer.gate_up_proj, layer.down_proj, next_norm, **sizes)
    with pytest.raises(ValueError, match="gate_up_weight must be contiguous"):
        DecoderLayerWeights(layer.qkv_proj, layer.o_proj, layer.post_attention_norm,
                            layer.gate_up_proj.t().contiguous().t(), layer.down_proj, next_norm, **sizes)
    with pytest.raises(TypeError, match="next_norm has dtype"):
        DecoderLayerWeights(layer.qkv_proj, layer.o_proj, layer.post_attention_norm,
                            layer.gate_up_proj, layer.down_proj, next_norm.double(), **sizes)
    with pytest.raises(ValueError, match="qkv_weight has shape"):
        DecoderLayerWeights(layer.qkv_proj, layer.o_proj, layer.post_attention_norm, layer.gate_up_proj,
                            layer.down_proj, next_norm, **{**sizes, "num_kv_heads": 3})
    with pytest.raises(ValueError, match="num_heads .* multiple of num_kv_heads"):
        DecoderLayerWeights(layer.qkv_proj, layer.o_proj[:, :64].contiguous(), layer.post_attention_norm,
                            layer.gate_up_proj, layer.down_proj, next_norm,
                            **{**sizes, "num_heads": 4, "num_kv_heads": 3})


@pytest.mark.parametrize("change, error, message", [
    (lambda a: {**a, "h": a["h"].double()}, TypeError, "h is torch.float64"),
    (lambda a: {**a, "h": a["h"][0]}, ValueError, r"h must be a \[T, 96\] tensor, got \(96,\)"),
    (lambda a: {**a, "prefix_len": 45}, ValueError, r"prefix_len \(45\) must be in \[0, start = 40\]"),
    (lambda a: {**a, "residual": a["residual"][:3]}, ValueError, r"residual has shape \(3, 96\)"),
    (lambda a: {**a, "residual": a["h"]}, ValueError, "h and residual overlap"),
    (lambda a: {**a, "mask_bits": a["mask_bits"][:, :0]}, ValueError, "mask_bits must be"),
    (lambda a: {**a, "v_cache": a["v_cache"][:, :50]}, ValueError, "v_cache .* must match k_cache"),
    (lambda a: {**a, "start": 638, "mask_bits": None}, ValueError,
     r"start \(638\) \+ num_tokens \(4\) exceeds num_slots \(640\)"),
    (lambda a: {**a, "prefix_len": 41}, ValueError, r"prefix_len \(41\) must be in \[0, start = 40\]"),
    (lambda a: {**a, "cos": a["cos"][:, :8]}, ValueError, "cos has shape"),
])
def test_bad_step_arguments_are_named_and_nothing_is_written(prepared, change, error, message):
    _, _, _, weights, step, h, residual, k_cache, v_cache = prepared
    args = dict(h=h.clone(), residual=residual.clone(), cos=step.cos, sin=step.sin, k_cache=k_cache.clone(),
                v_cache=v_cache.clone(), start=step.start, prefix_len=step.prefix_len,
                mask_bits=pack_mask(step.mask))
    bad = change(args)
    before = {name: t.clone() for name, t in bad.items() if isinstance(t, torch.Tensor)}
    with pytest.raises(error, match=message):
        decoder_layer(weights, **bad)
    for name, t in before.items():
        assert torch.equal(bad[name], t), name


def test_the_c_entry_point_names_a_missing_weight(prepared):
    *_, step, h, residual, k_cache, v_cache = prepared
    from msd_engine import _C

    layer = _C.DecoderLayer(1024, 1024, 1024, 0, 1024, 0, 96, 6, 2, 16, 160, 1e-5, 0.25)  # no gate_up
    with pytest.raises(ValueError, match="layer->gate_up_weight is a null pointer"):
        _C.decoder_layer_cpu(layer, h.data_ptr(), residual.data_ptr(), 4, 96, 96, step.cos.data_ptr(),
                             step.sin.data_ptr(), 16, k_cache.data_ptr(), v_cache.data_ptr(), SLOTS,
                             SLOTS * 16, 16, step.start, step.prefix_len, 0, _C.FLOAT32, 0)

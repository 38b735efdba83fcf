"""Torch-tensor wrappers over the C++/CUDA kernels in `msd_engine._C` (csrc/).

Each wrapper checks its tensors (device, dtype, shape, a contiguous last dim, evenly strided
rows) and names the offending argument, then passes raw pointers, sizes and row strides. Leading
dims are flattened into rows: `x [..., dim]` must be viewable as `[rows, dim]`. CUDA tensors run
on the current torch stream of their device.

Semantics (the roundings match `msd_engine.ops.TorchOps`; see csrc/include/msd_engine.h):
  rms_norm:     weight * (x32 * rsqrt(mean(x32^2) + eps)).to(dtype)
  add_rms_norm: residual += x in place, then rms_norm(residual)
  silu_mul:     F.silu(gate) * up for gate_up = [gate | up] along the last dim
  linear:       F.linear(x, weight, bias), CPU only, summed in float32 (+ bias in float32)
                and rounded to dtype once; made for a few rows of x (decoding)
  logsoftmax_topk: torch.topk(torch.log_softmax(logits.float(), -1), k), CPU only; equal
                logits in ascending column order
  tree_attention: TorchOps.cached_attention with the mask bit-packed (`pack_mask`), float32
                inside, rounded to dtype once; a query that sees no key gets zeros
  kv_compact:   TorchOps.kv_compact (slot start + nodes[j] -> start + j, all layers, K and V)
  draft_inputs: TorchOps.draft_inputs (embedding gather, fc over [row, feature] + bias, MSD's
                visual bypass) in one call, summed in float32, rounded once
  rope_kv_write: TorchOps.rope_kv_write (rope of q and k, k and v into the cache), bit for bit

`import msd_engine.native` works without the extension; calling a kernel then raises.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch

from msd_engine.kv_cache import pack_mask  # noqa: F401  (re-exported: the kernels' mask format)

try:
    from msd_engine import _C
    _IMPORT_ERROR: Optional[ImportError] = None
except ImportError as exc:  # not built yet, or built for another Python
    _C = None
    _IMPORT_ERROR = exc


def is_built() -> bool:
    """Whether msd_engine._C imported; never raises."""
    return _C is not None


def _lib():
    if _C is None:
        raise RuntimeError(
            f"msd_engine._C is not built: run pip install -e . (import failed: {_IMPORT_ERROR})")
    return _C


def cuda_compiled() -> bool:
    """Whether _C was built with its CUDA kernels."""
    return bool(_lib().cuda_compiled())


def cuda_available() -> bool:
    """Whether the CUDA kernels can run: compiled in, and a CUDA device is visible."""
    return cuda_compiled() and _cuda_device_count() > 0


@functools.lru_cache(maxsize=None)
def _cuda_device_count() -> int:
    # Asked once: the count cannot change within a process, and launches are latency-bound.
    return int(_lib().cuda_device_count())


# Built once: the wrappers run per layer per token, and `linear` ~120 times per token.
_DTYPE_CODES = {} if _C is None else {
    torch.float32: _C.FLOAT32, torch.float16: _C.FLOAT16, torch.bfloat16: _C.BFLOAT16}
CPU_ISAS = ("scalar", "avx2", "avx512", "avx512_bf16", "amx")  # indexed by msd_cpu_isa


def _dtype_code(t: torch.Tensor, name: str) -> int:
    _lib()  # raises if _C is not built
    code = _DTYPE_CODES.get(t.dtype)
    if code is None:
        raise TypeError(f"{name} has dtype {t.dtype}; expected float32, float16 or bfloat16")
    return code


def _as_rows(t: torch.Tensor, name: str, width: int) -> torch.Tensor:
    """`t [..., width]` as a `[rows, width]` view (no copy), or a ValueError naming `t`."""
    if width < 1:
        raise ValueError(f"{name} has shape {tuple(t.shape)}; the last dim must be non-empty")
    if t.dim() == 0 or t.shape[-1] != width:
        raise ValueError(f"{name} has shape {tuple(t.shape)}; expected last dim {width}")
    if t.stride(-1) != 1 and width > 1:
        raise ValueError(f"{name} must be contiguous in its last dim, got strides {t.stride()}")
    try:
        return t.view(-1, width)
    except RuntimeError as exc:
        raise ValueError(
            f"{name} (shape {tuple(t.shape)}, strides {t.stride()}) cannot be viewed as "
            f"[rows, {width}] with one row stride; pass {name}.contiguous()") from exc


def _row_stride(t2: torch.Tensor) -> int:
    # A single row's stride is meaningless (and may be anything after a transpose).
    return t2.stride(0) if t2.shape[0] > 1 else t2.shape[1]


def _check_like(t: torch.Tensor, name: str, ref: torch.Tensor, ref_name: str) -> None:
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}")
    if t.dtype != ref.dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but {ref_name} has {ref.dtype}")


def _check_weight(weight: torch.Tensor, x: torch.Tensor) -> None:
    _check_like(weight, "weight", x, "x")
    if weight.shape != (x.shape[-1],) or not weight.is_contiguous():
        raise ValueError(f"weight must be contiguous with shape ({x.shape[-1]},), got shape "
                         f"{tuple(weight.shape)} strides {weight.stride()}")


def _out(out: Optional[torch.Tensor], shape: tuple, ref: torch.Tensor) -> torch.Tensor:
    if out is None:
        return torch.empty(shape, dtype=ref.dtype, device=ref.device)
    _check_like(out, "out", ref, "the input")
    if tuple(out.shape) != tuple(shape):
        raise ValueError(f"out has shape {tuple(out.shape)}; expected {tuple(shape)}")
    return out


def _kernel(name: str, device: torch.device):
    """The `_C` function `name` for `device`, with the stream argument bound for CUDA."""
    lib = _lib()
    if device.type == "cpu":
        return getattr(lib, f"{name}_cpu")
    if device.type != "cuda":
        raise ValueError(f"no msd_engine kernel for device {device}; use cpu or cuda tensors")
    if not lib.cuda_compiled():
        raise RuntimeError(f"{name} on {device}: msd_engine._C was built without CUDA "
                           f"(rebuild with nvcc available, or MSD_ENGINE_CUDA=1)")
    if _cuda_device_count() == 0:
        raise RuntimeError(f"{name} on {device}: msd_engine._C sees no CUDA device")
    stream = torch.cuda.current_stream(device).cuda_stream
    launch = getattr(lib, f"{name}_cuda")

    def run(*args):
        with torch.cuda.device(device):  # kernels launch on the current device
            launch(*args, stream)
    return run


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """RMSNorm over the last dim of `x [..., dim]` into `out` (new if None; may be `x`)."""
    dim = x.shape[-1] if x.dim() > 0 else 0
    dtype = _dtype_code(x, "x")
    x2 = _as_rows(x, "x", dim)
    _check_weight(weight, x)
    out = _out(out, tuple(x.shape), x)
    out2 = _as_rows(out, "out", dim)
    if x2.shape[0] == 0:
        return out
    _kernel("rms_norm", x.device)(x2.data_ptr(), weight.data_ptr(), out2.data_ptr(), x2.shape[0],
                                  dim, _row_stride(x2), _row_stride(out2), float(eps), dtype)
    return out


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                 out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """`residual += x` in place, then returns RMSNorm(residual) in `out` (new if None)."""
    dim = x.shape[-1] if x.dim() > 0 else 0
    dtype = _dtype_code(x, "x")
    _check_like(residual, "residual", x, "x")
    if residual.shape != x.shape:
        raise ValueError(f"residual has shape {tuple(residual.shape)}; x has {tuple(x.shape)}")
    x2, r2 = _as_rows(x, "x", dim), _as_rows(residual, "residual", dim)
    _check_weight(weight, x)
    out = _out(out, tuple(x.shape), x)
    out2 = _as_rows(out, "out", dim)
    if x2.shape[0] == 0:
        return out
    _kernel("add_rms_norm", x.device)(
        x2.data_ptr(), r2.data_ptr(), weight.data_ptr(), out2.data_ptr(), x2.shape[0], dim,
        _row_stride(x2), _row_stride(r2), _row_stride(out2), float(eps), dtype)
    return out


def silu_mul(gate_up: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """`gate_up [..., 2F]` (gate | up) -> silu(gate) * up, `[..., F]` (in `out` if given)."""
    width = gate_up.shape[-1] if gate_up.dim() > 0 else 0
    if width % 2:
        raise ValueError(f"gate_up has odd last dim {width}; expected [..., 2 * inter]")
    inter = width // 2
    dtype = _dtype_code(gate_up, "gate_up")
    g2 = _as_rows(gate_up, "gate_up", width)
    out = _out(out, tuple(gate_up.shape[:-1]) + (inter,), gate_up)
    out2 = _as_rows(out, "out", inter)
    if g2.shape[0] == 0:
        return out
    _kernel("silu_mul", gate_up.device)(g2.data_ptr(), out2.data_ptr(), g2.shape[0], inter,
                                        _row_stride(g2), _row_stride(out2), dtype)
    return out


def _row_geometry(shape: torch.Size, strides: tuple, name: str, width: int) -> tuple[int, int]:
    """(rows, row stride) of a `[..., width]` tensor seen as `[rows, width]`: what `_as_rows`
    checks, from shape and strides alone, since making a view costs as much as a kernel call."""
    if not shape or shape[-1] != width:
        raise ValueError(f"{name} has shape {tuple(shape)}; expected last dim {width}")
    if strides[-1] != 1 and width > 1:
        raise ValueError(f"{name} must be contiguous in its last dim, got strides {strides}")
    if len(shape) == 2:
        return shape[0], strides[0] if shape[0] > 1 else width
    rows, row_stride = 1, width
    for d in range(len(shape) - 2, -1, -1):  # innermost leading dim first
        size = shape[d]
        if size == 0:
            return 0, width
        if size == 1:
            continue  # its stride is meaningless
        if rows == 1:
            row_stride = strides[d]
        elif strides[d] != row_stride * rows:
            raise ValueError(
                f"{name} (shape {tuple(shape)}, strides {strides}) cannot be viewed as "
                f"[rows, {width}] with one row stride; pass {name}.contiguous()")
        rows *= size
    return rows, row_stride


def _linear_operand_error(x: torch.Tensor, **others: Optional[torch.Tensor]) -> Exception:
    """The complaint about the first of x, weight, bias, out on the wrong device or dtype."""
    if x.dtype not in _DTYPE_CODES:
        return TypeError(f"x has dtype {x.dtype}; expected float32, float16 or bfloat16")
    for name, t in {"x": x, **others}.items():
        if t is not None and not t.is_cpu:
            return ValueError(f"linear runs on CPU tensors; {name} is on {t.device}")
        if t is not None and t.dtype != x.dtype:
            return TypeError(f"{name} has dtype {t.dtype} but x has {x.dtype}")
    raise AssertionError("no operand error to report")


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
           out: Optional[torch.Tensor] = None, num_threads: int = 0) -> torch.Tensor:
    """`F.linear(x, weight, bias)` for CPU tensors: `x [..., k]`, `weight [n, k]` with
    contiguous rows, `bias [n]` contiguous -> `[..., n]` (in `out` if given; must not overlap
    the inputs). Each weight row is read once for all rows of x: made for up to 16 rows.
    Sums and the bias add are float32, rounded to dtype once. `num_threads <= 0` uses every
    hardware thread; the result does not depend on it."""
    # Called ~120 times per decoded token: the checks touch only dtype, device, shape and
    # strides, and the exact complaint is worked out only once something is wrong.
    lib = _C or _lib()  # _lib() raises if _C is not built
    dtype = x.dtype
    code = _DTYPE_CODES.get(dtype)
    if (code is None or not x.is_cpu or not weight.is_cpu or weight.dtype is not dtype
            or (bias is not None and (not bias.is_cpu or bias.dtype is not dtype))
            or (out is not None and (not out.is_cpu or out.dtype is not dtype))):
        raise _linear_operand_error(x, weight=weight, bias=bias, out=out)
    w_shape, w_strides = weight.shape, weight.stride()
    if len(w_shape) != 2 or w_shape[1] == 0:
        raise ValueError(f"weight has shape {tuple(w_shape)}; expected [n, k] with k > 0")
    n, k = w_shape
    if w_strides[1] != 1 and k > 1:
        raise ValueError(f"weight must have contiguous rows (stride(1) == 1), got strides "
                         f"{w_strides}")
    x_shape = x.shape
    if x_shape and x_shape[-1] == k and x.is_contiguous():
        rows, x_row_stride = x.numel() // k, k
    else:
        rows, x_row_stride = _row_geometry(x_shape, x.stride(), "x", k)
    bias_ptr = 0
    if bias is not None:
        if bias.shape != (n,) or (n > 1 and bias.stride(0) != 1):
            raise ValueError(f"bias must be contiguous with shape ({n},), got shape "
                             f"{tuple(bias.shape)} strides {bias.stride()}")
        bias_ptr = bias.data_ptr()
    out_shape = x_shape[:-1] + (n,)
    if out is None:
        out = torch.empty(out_shape, dtype=dtype)
        out_row_stride = n
    elif out.shape != out_shape:
        raise ValueError(f"out has shape {tuple(out.shape)}; expected {tuple(out_shape)}")
    else:
        out_row_stride = n if out.is_contiguous() else _row_geometry(
            out_shape, out.stride(), "out", n)[1]
    if rows == 0 or n == 0:
        return out
    lib.linear_cpu(x.data_ptr(), weight.data_ptr(), bias_ptr, out.data_ptr(), rows, n, k,
                   x_row_stride, w_strides[0] if n > 1 else k, out_row_stride, code, num_threads)
    return out


def logsoftmax_topk(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`torch.topk(torch.log_softmax(logits.float(), -1), k)` for CPU `logits [..., n]` (float32,
    float16 or bfloat16, contiguous last dim): (log-probs `[..., k]` float32, best first; columns
    `[..., k]` int64). Equal logits come in ascending column order, NaN first; a row holding NaN
    or +inf gives NaN log-probs, as torch does. On the calling thread."""
    code = _dtype_code(logits, "logits")
    if not logits.is_cpu:
        raise ValueError(f"logsoftmax_topk runs on CPU tensors; logits is on {logits.device}")
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int, got {k!r}")
    n = logits.shape[-1] if logits.dim() else 0
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}] (the last dim of logits {tuple(logits.shape)}), got {k}")
    rows2 = _as_rows(logits, "logits", n)
    lead = tuple(logits.shape[:-1])
    values = torch.empty(lead + (k,), dtype=torch.float32)
    indices = torch.empty(lead + (k,), dtype=torch.int64)
    if rows2.shape[0]:
        _lib().logsoftmax_topk_cpu(rows2.data_ptr(), values.data_ptr(), indices.data_ptr(), rows2.shape[0], n, k,
                                   _row_stride(rows2), code)
    return values, indices


def set_cpu_spin_us(microseconds: int) -> None:
    """How long the CPU thread pool's idle workers poll before sleeping (default 1000 us: they
    stay awake through a decode step or a speculative round, Python between the calls included).
    Lower it when torch's own threads need the cores between our calls; 0 sleeps at once.
    Process-wide."""
    _lib().set_cpu_spin_us(int(microseconds))


def cpu_isa() -> str:
    """The SIMD path of the CPU kernels with several: "amx" (AVX-512, with bfloat16 linear
    layers on AMX tiles), "avx512_bf16" (AVX-512 with bfloat16 pair dot products for them),
    "avx512", "avx2" or "scalar"."""
    return CPU_ISAS[_lib().cpu_isa()]


def set_cpu_isa(isa: Optional[str]) -> None:
    """Testing hook: forces the CPU kernels' SIMD path (one of `CPU_ISAS`), or the
    best this CPU supports for None. ValueError if this CPU or build cannot run `isa`.
    Process-wide: not for use while kernels run on other threads."""
    if isa is not None and isa not in CPU_ISAS:
        raise ValueError(f"isa must be one of {CPU_ISAS} or None, got {isa!r}")
    _lib().set_cpu_isa(-1 if isa is None else CPU_ISAS.index(isa))


# ---- attention and the cache ---------------------------------------------------------------------
CUDA_ATTENTION_HEAD_DIMS = (64, 128)  # head dims msd_tree_attention_cuda is compiled for


def _check_index(value, name: str, low: int) -> int:
    if type(value) is not int:  # not bool, not a tensor: an exact int
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return value


def _attention_operand_error(q, **others) -> Exception:
    """The complaint about the first of k_cache, v_cache, mask_bits, out on the wrong device or
    with the wrong dtype."""
    for name, t in others.items():
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            return TypeError(f"{name} must be a tensor, got {type(t).__name__}")
        if t.device != q.device:
            return ValueError(f"{name} is on {t.device} but q is on {q.device}")
        expected = torch.int32 if name == "mask_bits" else q.dtype
        if t.dtype != expected:
            hint = " (see pack_mask)" if name == "mask_bits" else ""
            return TypeError(f"{name} has dtype {t.dtype}; expected {expected}{hint}")
    raise AssertionError("no operand error to report")


def _check_attention(q, k_cache, v_cache, prefix_len, mask_bits, region, out) -> None:
    # Called per layer per step: only dtype, device, shape and stride reads (~0.1 us each) on
    # the way through; the exact complaint is worked out once something is wrong.
    device, dtype = q.device, q.dtype
    if (k_cache.dtype is not dtype or v_cache.dtype is not dtype or k_cache.device != device
            or v_cache.device != device
            or (mask_bits is not None and (mask_bits.dtype is not torch.int32
                                           or mask_bits.device != device))
            or (out is not None and (out.dtype is not dtype or out.device != device))):
        raise _attention_operand_error(q, k_cache=k_cache, v_cache=v_cache, mask_bits=mask_bits,
                                       out=out)
    q_shape, k_shape = q.shape, k_cache.shape
    if len(q_shape) != 3:
        raise ValueError(f"q has shape {tuple(q_shape)}; expected [T, Hq, D]")
    t, num_heads, head_dim = q_shape
    if len(k_shape) != 3 or k_shape[2] != head_dim:
        raise ValueError(f"k_cache has shape {tuple(k_shape)}; expected [Hkv, S, {head_dim}]")
    k_strides = k_cache.stride()
    if v_cache.shape != k_shape or v_cache.stride() != k_strides:
        raise ValueError(f"v_cache (shape {tuple(v_cache.shape)}, strides {v_cache.stride()}) must "
                         f"match k_cache (shape {tuple(k_shape)}, strides {k_strides})")
    if head_dim > 1:
        for tensor, name in ((q, "q"), (k_cache, "k_cache"), (out, "out")):
            if tensor is not None and tensor.stride(2) != 1:
                raise ValueError(f"{name} must be contiguous in its last dim, got strides "
                                 f"{tensor.stride()}")
    _check_index(prefix_len, "prefix_len", 0)
    _check_index(region, "region", t)
    if prefix_len + region > k_shape[1]:
        raise ValueError(f"prefix_len {prefix_len} + region {region} exceeds the cache's "
                         f"{k_shape[1]} slots")
    if mask_bits is not None:
        words = (region + 31) // 32
        if mask_bits.shape != (t, words) or not mask_bits.is_contiguous():
            raise ValueError(f"mask_bits has shape {tuple(mask_bits.shape)} strides "
                             f"{mask_bits.stride()}; expected contiguous [{t}, {words}] "
                             f"(region {region})")
    if out is not None and out.shape != q_shape:
        raise ValueError(f"out has shape {tuple(out.shape)}; expected {tuple(q_shape)}")


def _head_strides(t: torch.Tensor) -> tuple[int, int]:
    """(row, head) strides of `t [T, H, D]`; a size-1 dim's stride is meaningless, so it gets
    one the kernels accept."""
    rows, heads, head_dim = t.shape
    strides = t.stride()
    head_stride = strides[1] if heads > 1 else head_dim
    return (strides[0] if rows > 1 else heads * head_stride), head_stride


def tree_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   prefix_len: int, mask_bits: Optional[torch.Tensor], region: int,
                   out: Optional[torch.Tensor] = None,
                   sm_scale: Optional[float] = None) -> torch.Tensor:
    """Attention of `q [T, Hq, D]` over slots [0, prefix_len + region) of `k_cache` /
    `v_cache [Hkv, S, D]` (equal strides) -> `[T, Hq, D]` (in `out` if given; must not overlap
    the inputs). Slots < prefix_len are visible to every query, slot prefix_len + j to query i
    iff bit j of `mask_bits[i]` (int32 [T, ceil(region / 32)] from `pack_mask`; None: all).
    CUDA needs D in CUDA_ATTENTION_HEAD_DIMS. `sm_scale` defaults to 1 / sqrt(D)."""
    lib = _C or _lib()  # _lib() raises if _C is not built
    code = _DTYPE_CODES.get(q.dtype)
    if code is None:
        raise TypeError(f"q has dtype {q.dtype}; expected float32, float16 or bfloat16")
    _check_attention(q, k_cache, v_cache, prefix_len, mask_bits, region, out)
    t, num_heads, head_dim = q.shape
    if out is None:
        out = torch.empty_like(q)  # q's strides when dense, else contiguous: either will do
    if t == 0 or num_heads == 0:
        return out
    q_row_stride, q_head_stride = _head_strides(q)
    out_row_stride, out_head_stride = _head_strides(out)
    num_kv_heads, slots = k_cache.shape[0], k_cache.shape[1]
    k_strides = k_cache.stride()
    args = (q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
            0 if mask_bits is None else mask_bits.data_ptr(), out.data_ptr(), t, num_heads,
            num_kv_heads, head_dim, prefix_len, region, q_row_stride, q_head_stride,
            k_strides[0] if num_kv_heads > 1 else slots * head_dim,
            k_strides[1] if slots > 1 else head_dim, out_row_stride, out_head_stride,
            head_dim ** -0.5 if sm_scale is None else float(sm_scale), code)
    if q.is_cpu:
        lib.tree_attention_cpu(*args)
        return out
    if q.is_cuda and head_dim not in CUDA_ATTENTION_HEAD_DIMS:
        raise ValueError(f"q has head dim {head_dim}; the CUDA kernel is built for "
                         f"{CUDA_ATTENTION_HEAD_DIMS}")
    launch = _kernel("tree_attention", q.device)  # raises for devices without a kernel
    size = lib.tree_attention_cuda_workspace_bytes(t, num_heads, head_dim, prefix_len, region)
    workspace = torch.empty(size, dtype=torch.uint8, device=q.device)  # float32 partials
    launch(*args, workspace.data_ptr() if size else 0, size)
    return out


def kv_compact(arena: torch.Tensor, start: int, nodes: torch.Tensor) -> None:
    """In place: `arena [2, L, Hkv, S, D]` (contiguous) slot start + nodes[j] -> start + j for
    every j, layer, head, K and V. `nodes`: int64 [m] on arena's device with j <= nodes[j]
    (ascending accepted nodes, root first); checked on the CPU, not on CUDA (a sync)."""
    code = _dtype_code(arena, "arena")
    if arena.dim() != 5 or not arena.is_contiguous():
        raise ValueError(f"arena (shape {tuple(arena.shape)}, strides {arena.stride()}) must be "
                         "a contiguous [2, L, Hkv, S, D] tensor")
    if not isinstance(nodes, torch.Tensor) or nodes.dtype != torch.int64 or nodes.dim() != 1:
        raise TypeError(f"nodes must be a 1-D int64 tensor, got "
                        f"{getattr(nodes, 'dtype', type(nodes).__name__)} "
                        f"{tuple(getattr(nodes, 'shape', ()))}")
    if nodes.device != arena.device:
        raise ValueError(f"nodes is on {nodes.device} but arena is on {arena.device}")
    _check_index(start, "start", 0)
    num_nodes = nodes.shape[0]
    if start + num_nodes > arena.shape[3]:
        raise ValueError(f"start {start} + {num_nodes} nodes exceeds the arena's "
                         f"{arena.shape[3]} slots")
    if num_nodes == 0 or arena.numel() == 0:
        return
    nodes = nodes.contiguous()
    _kernel("kv_compact", arena.device)(arena.data_ptr(), *arena.shape, start, nodes.data_ptr(),
                                        num_nodes, code)


def _check_heads(t, name: str, shape: tuple, q: torch.Tensor) -> None:
    """`t` is a tensor of `shape` like q (device, dtype), contiguous in its last dim."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    _check_like(t, name, q, "q")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} has shape {tuple(t.shape)}; expected {list(shape)}")
    if t.stride(-1) != 1 and shape[-1] > 1:
        raise ValueError(f"{name} must be contiguous in its last dim, got strides {t.stride()}")


def _cache_strides(cache: torch.Tensor) -> tuple[int, int]:
    """(head, slot) strides of `cache [Hkv, S, D]`, size-1 dims given ones the kernels accept."""
    heads, slots, head_dim = cache.shape
    slot_stride = cache.stride(1) if slots > 1 else head_dim
    return (cache.stride(0) if heads > 1 else slots * slot_stride), slot_stride


def rope_kv_write(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                  sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, start: int,
                  out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """`TorchOps.rope_kv_write`, bit for bit: rope(k) and v into slots start..start+T of
    `k_cache` / `v_cache [Hkv, S, D]` (views with equal strides, e.g. per-layer slices of the
    arena); returns rope(q) in `out` (new if None; may be q itself). q [T, Hq, D], k / v
    [T, Hkv, D] (views of the fused qkv output are fine), cos / sin [T, D]; one dtype and
    device, all contiguous in D."""
    code = _dtype_code(q, "q")
    if q.dim() != 3 or q.shape[2] % 2 or q.shape[2] == 0:
        raise ValueError(f"q has shape {tuple(q.shape)}; expected [T, Hq, D] with D even")
    t, num_heads, head_dim = q.shape
    _check_heads(q, "q", (t, num_heads, head_dim), q)
    for tensor, name, dims in ((k, "k", "[T, Hkv, D]"), (k_cache, "k_cache", "[Hkv, S, D]")):
        if not isinstance(tensor, torch.Tensor) or tensor.dim() != 3:
            raise ValueError(f"{name} has shape {tuple(getattr(tensor, 'shape', ()))}; "
                             f"expected {dims}")
    kv_heads, slots = k.shape[1], k_cache.shape[1]
    for tensor, name in ((k, "k"), (v, "v")):
        _check_heads(tensor, name, (t, kv_heads, head_dim), q)
    for tensor, name in ((cos, "cos"), (sin, "sin")):
        _check_heads(tensor, name, (t, head_dim), q)
    for tensor, name in ((k_cache, "k_cache"), (v_cache, "v_cache")):
        _check_heads(tensor, name, (kv_heads, slots, head_dim), q)
    if _cache_strides(k_cache) != _cache_strides(v_cache):
        raise ValueError(f"v_cache has strides {v_cache.stride()} but k_cache has "
                         f"{k_cache.stride()}; the kernel takes one set for both")
    _check_index(start, "start", 0)
    if start + t > slots:
        raise ValueError(f"start {start} + T {t} exceeds the cache's {slots} slots")
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    _check_heads(out, "out", tuple(q.shape), q)
    if t == 0 or num_heads == 0 or kv_heads == 0:
        return out
    if _head_strides(k) != _head_strides(v):  # one set of strides in the kernel: copies say so
        k, v = k.contiguous(), v.contiguous()
    table_stride = cos.stride(0) if t > 1 else head_dim
    if t > 1 and sin.stride(0) != table_stride:
        cos, sin = cos.contiguous(), sin.contiguous()
        table_stride = head_dim
    _kernel("rope_kv_write", q.device)(
        q.data_ptr(), k.data_ptr(), v.data_ptr(), cos.data_ptr(), sin.data_ptr(), out.data_ptr(),
        k_cache.data_ptr(), v_cache.data_ptr(), t, num_heads, kv_heads, head_dim, start, slots,
        *_head_strides(q), *_head_strides(k), table_stride, *_head_strides(out),
        *_cache_strides(k_cache), code)
    return out


# ---- draft head ----------------------------------------------------------------------------------
def _check_draft_matrix(t: Optional[torch.Tensor], name: str, shape: tuple,
                        embed: torch.Tensor) -> int:
    """Row stride of `t` (`shape`, embed's device and dtype, contiguous last dim); 0 for None."""
    if t is None:
        return 0
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    _check_like(t, name, embed, "embed")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} has shape {tuple(t.shape)}; expected {list(shape)}")
    if t.stride(-1) != 1 and shape[-1] > 1:
        raise ValueError(f"{name} must be contiguous in its last dim, got strides {t.stride()}")
    return t.stride(0) if len(shape) == 2 and shape[0] > 1 else shape[-1]


def _check_draft_rows(token_ids, is_image, image_rows, embed: torch.Tensor) -> int:
    """T, after checking token_ids (int64 [T]) and is_image (bool [T] or None)."""
    if (not isinstance(token_ids, torch.Tensor) or token_ids.dim() != 1
            or token_ids.dtype != torch.int64):
        raise TypeError(f"token_ids must be a 1-D int64 tensor, got "
                        f"{getattr(token_ids, 'dtype', type(token_ids).__name__)} "
                        f"{tuple(getattr(token_ids, 'shape', ()))}")
    if token_ids.device != embed.device:
        raise ValueError(f"token_ids is on {token_ids.device} but embed is on {embed.device}")
    t = token_ids.shape[0]
    if is_image is not None:
        if (not isinstance(is_image, torch.Tensor) or is_image.dtype != torch.bool
                or tuple(is_image.shape) != (t,)):
            raise TypeError(f"is_image must be a bool tensor of shape ({t},), got "
                            f"{getattr(is_image, 'dtype', type(is_image).__name__)} "
                            f"{tuple(getattr(is_image, 'shape', ()))}")
        if is_image.device != embed.device:
            raise ValueError(f"is_image is on {is_image.device} but embed is on {embed.device}")
    elif image_rows is not None:
        raise ValueError("image_rows is given but is_image is None: which rows are images?")
    return t


def draft_inputs(token_ids: torch.Tensor, embed: torch.Tensor, features: torch.Tensor,
                 image_rows: Optional[torch.Tensor], is_image: Optional[torch.Tensor],
                 fc_weight: torch.Tensor, fc_bias: Optional[torch.Tensor], bypass: bool,
                 out: Optional[torch.Tensor] = None, num_threads: int = 0) -> torch.Tensor:
    """The draft layer's inputs `[T, H]`, as `TorchOps.draft_inputs`: row t is fc_weight @
    [x_t, features[t]] + fc_bias, x_t = image_rows[t] where is_image[t] (embed[0] if
    image_rows is None), else embed[token_ids[t]]; with `bypass`, image rows are x_t itself.
    token_ids int64 [T], embed [V, H], features / image_rows [T, H], is_image bool [T],
    fc_weight [H, 2H], fc_bias [H] (or None): one dtype and device, rows contiguous (strided
    rows are fine; features and image_rows may be one row expanded to T). `out` (new if None) must not overlap the inputs. Token ids are checked on
    the CPU; on CUDA (a check would synchronise) a row with an out-of-range id comes out NaN.
    `num_threads` is the CPU thread count as in `linear`."""
    code = _dtype_code(embed, "embed")
    if embed.dim() != 2 or embed.shape[0] == 0 or embed.shape[1] == 0:
        raise ValueError(f"embed has shape {tuple(embed.shape)}; expected a non-empty [V, H]")
    vocab, hidden = embed.shape
    t = _check_draft_rows(token_ids, is_image, image_rows, embed)
    embed_stride = _check_draft_matrix(embed, "embed", (vocab, hidden), embed)
    features_stride = _check_draft_matrix(features, "features", (t, hidden), embed)
    image_stride = _check_draft_matrix(image_rows, "image_rows", (t, hidden), embed)
    weight_stride = _check_draft_matrix(fc_weight, "fc_weight", (hidden, 2 * hidden), embed)
    if fc_bias is not None:
        _check_draft_matrix(fc_bias, "fc_bias", (hidden,), embed)
    if out is None:
        out = torch.empty(t, hidden, dtype=embed.dtype, device=embed.device)
    out_stride = _check_draft_matrix(out, "out", (t, hidden), embed)
    if t == 0:
        return out
    token_ids = token_ids.contiguous()
    flags = None if is_image is None else is_image.contiguous().view(torch.uint8)
    args = (token_ids.data_ptr(), 0 if flags is None else flags.data_ptr(), embed.data_ptr(),
            0 if image_rows is None else image_rows.data_ptr(), features.data_ptr(),
            fc_weight.data_ptr(), 0 if fc_bias is None else fc_bias.data_ptr(), out.data_ptr(),
            t, hidden, vocab, embed_stride, hidden if image_rows is None else image_stride,
            features_stride, weight_stride, out_stride, int(bool(bypass)), code)
    if embed.is_cpu:
        _lib().draft_inputs_cpu(*args, int(num_threads))
    else:
        _kernel("draft_inputs", embed.device)(*args)
    return out

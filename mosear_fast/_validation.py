"""Input validation for the public ops: the one place that decides what is accepted.

Every check raises ``ValueError`` (``TypeError`` for an argument of the wrong Python type) whose
message names the argument and the expected form. Value range checks of integer ids need the
values: always done for CPU tensors; for CUDA tensors unless ``validate=False``. Never while a graph
is exported or compiled (the values are symbolic and a host read would break the graph) nor while a
CUDA graph is captured (a read synchronises): the kernels then skip out-of-range ids instead of
reading out of bounds. Shape, dtype and device checks always run (free under compile)."""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .backend import host_reads_allowed

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_MODALITIES = 8


class DTypeError(ValueError, TypeError):
    """A tensor of the wrong dtype: a ``ValueError`` (DESIGN 4) that ``except TypeError`` also catches."""


def _fail(name: str, expected: str, got: str) -> ValueError:
    return ValueError(f"{name}: expected {expected}, got {got}")


def _tensor(name, t, *, ndim=None, dtypes=None, integer=False, floating=False):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise _fail(name, f"a {ndim}-d tensor", f"shape {tuple(t.shape)}")
    if integer and (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool):
        raise DTypeError(f"{name}: expected an integer tensor, got dtype {t.dtype}")
    if floating and not t.is_floating_point():
        raise DTypeError(f"{name}: expected a floating-point tensor, got dtype {t.dtype}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise DTypeError(f"{name}: expected dtype in ({names}), got {t.dtype}")
    return t


def _shape(name, t, expected: tuple, what: str):
    if tuple(t.shape) != tuple(expected):
        raise _fail(name, f"shape {tuple(expected)} {what}", f"{tuple(t.shape)}")


def _same_device(device, **tensors):
    for name, t in tensors.items():
        if t is not None and t.device != device:
            raise _fail(name, f"a tensor on {device} like x/q", f"a tensor on {t.device}")


def _needs_value_checks(t: torch.Tensor, validate: bool) -> bool:
    if not host_reads_allowed(t.device):  # exported, compiled (symbolic values) or CUDA-graph capture (no sync)
        return False
    return t.device.type == "cpu" or validate


def _check_range(name, t, low, high, *, mask=None):
    values = t if mask is None else t[mask]
    if values.numel() == 0:
        return
    lo, hi = int(values.min()), int(values.max())
    if lo < low or hi >= high:
        raise _fail(name, f"ids in [{low}, {high})", f"values in [{lo}, {hi}]")


def _real(name, value, *, low=None, high=None):
    # Exact float / int first: the numbers.Real ABC check costs ~0.5 us, and this runs on every call.
    if type(value) is not float and type(value) is not int:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{name}: expected a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or (low is not None and value < low) or (high is not None and value > high):
        bounds = f"[{low if low is not None else '-inf'}, {high if high is not None else 'inf'}]"
        raise _fail(name, f"a finite number in {bounds}", repr(value))
    return value


# --------------------------------------------------------------------------------------------
# mose_lora and mose_linear (one validation of the shared arguments)
# --------------------------------------------------------------------------------------------


def _has_internal_overlap(t: torch.Tensor) -> bool:
    """True when two elements of ``t`` may share memory (an expanded tensor, a stride-0 dim, ...).

    Conservative: dims of size > 1, ordered by stride, must each step over the whole previous one."""
    dims = sorted((st, size) for st, size in zip(t.stride(), t.shape, strict=True) if size > 1)
    reach = 1
    for st, size in dims:
        if st < reach:
            return True
        reach = st * size
    return False


@functools.lru_cache(maxsize=64)
def _scale_vector(value: float, n_modalities: int, device: torch.device) -> torch.Tensor:
    """The (M,) float32 tensor of a Python-number scale, built once per value (torch.full costs ~2 us per
    call). Read-only: the backends never write to it."""
    return torch.full((n_modalities,), value, dtype=torch.float32, device=device)


def _check_scale(scale, n_modalities, device) -> torch.Tensor:
    if isinstance(scale, torch.Tensor):
        if not scale.is_floating_point():
            raise DTypeError(f"scale: expected a float or a floating-point (M,) tensor, got dtype {scale.dtype}")
        if scale.dim() != 1 or scale.shape[0] != n_modalities:
            raise _fail("scale", f"a float or an (M,) = ({n_modalities},) tensor", f"shape {tuple(scale.shape)}")
        _same_device(device, scale=scale)
        if scale.requires_grad and torch.is_grad_enabled():
            # Neither backend differentiates scale (s * w_m: the dynamic weights are buffers).
            raise ValueError("scale: expected a tensor that does not require grad (scale is not "
                             "differentiated; pass scale.detach())")
        if scale.dtype == torch.float32 and not scale.requires_grad:  # the usual case: no new tensor
            return scale
        return scale.detach().to(torch.float32)
    value = _real("scale", scale)
    if not host_reads_allowed(device):  # traced (a cached tensor would be a constant of the graph) or captured
        return torch.full((n_modalities,), value, dtype=torch.float32, device=device)
    return _scale_vector(value, n_modalities, device)


def _check_mose_core(x, modality, expert, gate, A, B, scale, *, validate) -> tuple[torch.Tensor, int]:
    """The arguments both MoSE ops share; returns (scale as (M,) float32 on x's device, d_out)."""
    _tensor("x", x, ndim=2, dtypes=FLOAT_DTYPES)
    _tensor("A", A, ndim=3, dtypes=FLOAT_DTYPES)
    _tensor("B", B, ndim=4, dtypes=FLOAT_DTYPES)
    _tensor("modality", modality, ndim=1, integer=True)
    _tensor("expert", expert, ndim=2, integer=True)
    _tensor("gate", gate, ndim=2, floating=True)
    n_tokens, d_in = x.shape
    n_modalities, rank, a_d_in = A.shape
    if n_modalities < 1 or n_modalities > MAX_MODALITIES:
        raise _fail("A", f"(M, r, d_in) with 1 <= M <= {MAX_MODALITIES}", f"shape {tuple(A.shape)}")
    if rank < 1:
        raise _fail("A", "(M, r, d_in) with r >= 1", f"shape {tuple(A.shape)}")
    if a_d_in != d_in:
        raise _fail("A", f"(M, r, d_in) with d_in = x.shape[1] = {d_in}", f"shape {tuple(A.shape)}")
    if B.shape[0] != n_modalities or B.shape[3] != rank or B.shape[1] < 1:
        raise _fail("B", f"(M={n_modalities}, E>=1, d_out, r={rank})", f"shape {tuple(B.shape)}")
    n_experts, d_out = B.shape[1], B.shape[2]
    _shape("modality", modality, (n_tokens,), "(N,) like x.shape[0]")
    if expert.shape[0] != n_tokens or expert.shape[1] not in (1, 2):
        raise _fail("expert", f"shape ({n_tokens}, k) with k in {{1, 2}}", f"{tuple(expert.shape)}")
    _shape("gate", gate, tuple(expert.shape), "(N, k) like expert")
    for name, t in (("A", A), ("B", B)):
        if t.dtype != x.dtype:
            raise DTypeError(f"{name}: expected dtype {x.dtype} like x (x, A, B and out share one dtype), "
                             f"got {t.dtype}")
    _same_device(x.device, modality=modality, expert=expert, gate=gate, A=A, B=B)
    scale_vec = _check_scale(scale, n_modalities, x.device)
    if _needs_value_checks(modality, validate) and n_tokens > 0:
        # min and max of both in one host read (no boolean indexing: this runs on every layer call)
        masked = torch.where(modality[:, None] >= 0, expert, 0)  # ids of rows without adapter are not read
        bounds = torch.stack([*modality.aminmax(), *masked.aminmax()]).tolist()
        if bounds[0] < -1 or bounds[1] >= n_modalities:
            raise _fail("modality", f"ids in [-1, {n_modalities})", f"values in [{bounds[0]}, {bounds[1]}]")
        if bounds[2] < 0 or bounds[3] >= n_experts:
            raise _fail("expert", f"ids in [0, {n_experts})", f"values in [{bounds[2]}, {bounds[3]}] (rows with "
                        "an adapter)")
    return scale_vec, d_out


def check_mose_args(x, modality, expert, gate, A, B, scale, out, *, inplace, validate) -> torch.Tensor:
    """Validates ``mose_lora``'s arguments; returns ``scale`` as an (M,) float32 tensor on x's device."""
    if out is not None:
        _tensor("out", out, ndim=2)
    if not isinstance(inplace, bool):
        raise TypeError(f"inplace: expected a bool, got {type(inplace).__name__}")
    scale_vec, d_out = _check_mose_core(x, modality, expert, gate, A, B, scale, validate=validate)
    if out is not None:
        _shape("out", out, (x.shape[0], d_out), "(N, d_out)")
        if out.dtype != x.dtype:
            raise DTypeError(f"out: expected dtype {x.dtype} like x (x, A, B and out share one dtype), "
                             f"got {out.dtype}")
        _same_device(x.device, out=out)
    if inplace:
        if out is None:
            raise ValueError("inplace: inplace=True needs an `out` tensor to write into, got out=None")
        if out.requires_grad:
            raise ValueError("inplace: refused because out requires grad; pass inplace=False")
        if _has_internal_overlap(out):
            raise _fail("out", "a tensor whose elements do not share memory for inplace=True (not an "
                        "expanded view; pass out.contiguous() or inplace=False)", f"strides {out.stride()}")
    return scale_vec


def check_mose_linear_args(x, weight, bias, modality, expert, gate, A, B, scale, *, return_update_norm,
                           validate) -> torch.Tensor:
    """Validates ``mose_linear``'s arguments; returns ``scale`` as an (M,) float32 tensor on x's device."""
    _tensor("weight", weight, ndim=2, dtypes=FLOAT_DTYPES)
    if bias is not None:
        _tensor("bias", bias, ndim=1, dtypes=FLOAT_DTYPES)
    if not isinstance(return_update_norm, bool):
        raise TypeError(f"return_update_norm: expected a bool, got {type(return_update_norm).__name__}")
    scale_vec, d_out = _check_mose_core(x, modality, expert, gate, A, B, scale, validate=validate)
    _shape("weight", weight, (d_out, x.shape[1]), "(d_out, d_in) like B.shape[2] and x.shape[1]")
    if bias is not None:
        _shape("bias", bias, (d_out,), "(d_out,) like B.shape[2]")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.dtype != x.dtype:
            raise DTypeError(f"{name}: expected dtype {x.dtype} like x (x, weight, bias, A and B share one "
                             f"dtype), got {t.dtype}")
    _same_device(x.device, weight=weight, bias=bias)
    return scale_vec


# --------------------------------------------------------------------------------------------
# ar_attention
# --------------------------------------------------------------------------------------------


BALANCE_BY = ("mass", "contribution")


@dataclass(frozen=True)
class ARArgs:
    """Normalised scalar arguments of ``ar_attention`` (tensors are passed through unchanged).

    ``target``: None (uniform), a tuple of |S| floats, or a tuple of Hq such tuples (one per query
    head); every row normalised in float64 to sum to 1 (entries >= 0; an entry may underflow to 0).
    """

    num_modalities: int
    balance: tuple[int, ...]
    target: tuple[float, ...] | tuple[tuple[float, ...], ...] | None
    strength: float
    threshold: float
    modality_bias: tuple[float, ...] | None
    causal: bool
    scale: float
    window: int | None = None
    softcap: float | None = None
    balance_by: str = "mass"


def _host_values(name, value):
    """A tensor argument's values as Python lists (one host read), refused where reads are not allowed."""
    if not isinstance(value, torch.Tensor):
        return value
    if not host_reads_allowed(value.device):
        raise ValueError(f"{name}: a tensor cannot be read while a model is exported, compiled or captured in a "
                         "CUDA graph; pass a sequence of Python numbers")
    return value.tolist()


def _int_sequence(name, value):
    if type(value) is tuple and all(type(item) is int for item in value):  # the common case, without ABC checks
        return value
    value = _host_values(name, value)
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise TypeError(f"{name}: expected a sequence of ints, got {type(value).__name__}")
    out = []
    for item in value:
        if isinstance(item, bool) or not isinstance(item, numbers.Integral):
            raise TypeError(f"{name}: expected a sequence of ints, got an item of type {type(item).__name__}")
        out.append(int(item))
    return tuple(out)


def _float_sequence(name, value, length, *, positive=False):
    value = _host_values(name, value)
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise TypeError(f"{name}: expected a sequence of {length} floats, got {type(value).__name__}")
    if len(value) != length:
        raise _fail(name, f"a sequence of {length} floats", f"length {len(value)}")
    out = tuple(_real(f"{name}[{i}]", v) for i, v in enumerate(value))
    if positive and any(v <= 0 for v in out):
        raise _fail(name, "positive floats", repr(out))
    return out


def _normalised(row: tuple[float, ...]) -> tuple[float, ...]:
    """A row of positive finite floats divided by its sum, in float64: first by its largest entry
    (so the sum cannot overflow, e.g. 3e38 + 3e38 in float32 or 1e308 + 1e308 in float64), then by
    the sum. Scale-free: (1e-40, 1e-40) and (3e38, 3e38) both give exactly (0.5, 0.5); an entry
    more than ~1e308 times smaller than the largest becomes 0, as in the exactly normalised target."""
    if not row:  # an empty balance set
        return row
    largest = max(row)
    scaled = [t / largest for t in row]
    total = math.fsum(scaled)
    return tuple(t / total for t in scaled)


def check_target(name, target, n_balance, *, n_q_heads=None):
    """Validates an AR target and normalises it in float64 on the host.

    Accepted: None (uniform); a sequence of ``n_balance`` positive finite floats, or a tensor of
    shape (n_balance,) (one target for every head); a tensor of shape (Hq, n_balance) or a sequence
    of Hq such sequences (one target per query head; ``n_q_heads`` checks Hq when given). Returns
    None, a tuple of floats, or a tuple of Hq tuples, every row summing to 1. A tensor is read once
    on the host (a device-to-host copy for a CUDA tensor; detached: targets are constants).
    """
    if target is None:
        return None
    expected = f"{n_balance} positive floats, a ({n_balance},) tensor or a (Hq, {n_balance}) tensor"
    if isinstance(target, torch.Tensor):
        if not host_reads_allowed(target.device):
            raise ValueError(f"{name}: a tensor target cannot be read while a model is exported, compiled or "
                             "captured in a CUDA graph; pass a sequence of floats (or nested sequences, one per head)")
        if not target.is_floating_point():
            raise DTypeError(f"{name}: expected a floating-point tensor of {expected}, got dtype {target.dtype}")
        if target.dim() not in (1, 2) or target.shape[-1] != n_balance:
            raise _fail(name, expected, f"shape {tuple(target.shape)}")
        target = target.detach().to("cpu", torch.float64).tolist()
    if isinstance(target, (str, bytes)) or not isinstance(target, Sequence):
        raise TypeError(f"{name}: expected {expected}, got {type(target).__name__}")
    per_head = len(target) > 0 and all(
        isinstance(row, (Sequence, torch.Tensor)) and not isinstance(row, (str, bytes)) for row in target)
    rows = list(target) if per_head else [target]
    if per_head and n_q_heads is not None and len(rows) != n_q_heads:
        raise _fail(name, f"one target per query head: (Hq={n_q_heads}, {n_balance})", f"{len(rows)} rows")
    checked = []
    for h, row in enumerate(rows):
        row_name = f"{name}[{h}]" if per_head else name
        row = _float_sequence(row_name, row, n_balance)
        if any(t <= 0 for t in row):
            raise _fail(row_name, "positive finite floats", repr(row))
        checked.append(_normalised(row))
    return tuple(checked) if per_head else checked[0]


def check_ar_args(q, k, v, key_modality, *, num_modalities, balance, target, strength, threshold,
                  modality_bias, causal, scale, query_mask, validate, window=None, softcap=None,
                  balance_by="mass") -> ARArgs:
    """Validates ``ar_attention``'s arguments and returns the normalised scalars."""
    _tensor("q", q, ndim=4, dtypes=FLOAT_DTYPES)
    _tensor("k", k, ndim=4, dtypes=FLOAT_DTYPES)
    _tensor("v", v, ndim=4, dtypes=FLOAT_DTYPES)
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise DTypeError(f"{name}: expected dtype {q.dtype} like q, got {t.dtype}")
    batch, n_q_heads, len_q, head_dim = q.shape
    if k.shape[0] != batch or k.shape[3] != head_dim or k.shape[1] < 1:
        raise _fail("k", f"(B={batch}, Hkv, Lk, D={head_dim})", f"shape {tuple(k.shape)}")
    _shape("v", v, tuple(k.shape), "like k")
    n_kv_heads, len_k = k.shape[1], k.shape[2]
    if n_q_heads % n_kv_heads != 0:
        raise _fail("q", f"a head count divisible by k's head count {n_kv_heads} (Hq % Hkv == 0)",
                    f"Hq = {n_q_heads}")
    if head_dim < 1:
        raise _fail("q", "head dim D >= 1", f"shape {tuple(q.shape)}")
    _tensor("key_modality", key_modality, ndim=2, integer=True)
    _shape("key_modality", key_modality, (batch, len_k), "(B, Lk)")
    if query_mask is not None:
        _tensor("query_mask", query_mask, ndim=2)
        if query_mask.dtype != torch.bool:
            raise DTypeError(f"query_mask: expected a bool tensor (B, Lq), got dtype {query_mask.dtype}")
        _shape("query_mask", query_mask, (batch, len_q), "(B, Lq)")
    _same_device(q.device, k=k, v=v, key_modality=key_modality, query_mask=query_mask)

    if type(num_modalities) is not int and (isinstance(num_modalities, bool)
                                            or not isinstance(num_modalities, numbers.Integral)):
        raise TypeError(f"num_modalities: expected an int, got {type(num_modalities).__name__}")
    num_modalities = int(num_modalities)
    if not 1 <= num_modalities <= MAX_MODALITIES:
        raise _fail("num_modalities", f"an int in [1, {MAX_MODALITIES}]", repr(num_modalities))
    balance = _int_sequence("balance", balance)
    if len(set(balance)) != len(balance) or any(not 0 <= m < num_modalities for m in balance):
        raise _fail("balance", f"distinct modality ids in [0, {num_modalities})", repr(balance))
    target = check_target("target", target, len(balance), n_q_heads=n_q_heads)
    strength = _real("strength", strength, low=0.0, high=1.0)
    threshold = _real("threshold", threshold, low=0.0)
    if modality_bias is not None:
        modality_bias = _float_sequence("modality_bias", modality_bias, num_modalities)
    if not isinstance(causal, bool):
        raise TypeError(f"causal: expected a bool, got {type(causal).__name__}")
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim)
    else:
        scale = _real("scale", scale)
    window = check_window(window, causal=causal)
    if softcap is not None:
        softcap = _real("softcap", softcap)
        if softcap <= 0:
            raise _fail("softcap", "None or a finite float > 0", repr(softcap))
    balance_by = check_balance_by("balance_by", balance_by)

    if _needs_value_checks(key_modality, validate):
        _check_range("key_modality", key_modality, -1, num_modalities)
    return ARArgs(num_modalities, balance, target, strength, threshold, modality_bias, causal, scale,
                  window, softcap, balance_by)


def check_window(window, *, causal: bool) -> int | None:
    if window is None:
        return None
    if isinstance(window, bool) or not isinstance(window, numbers.Integral):
        raise TypeError(f"window: expected None or an int >= 1, got {type(window).__name__}")
    if window < 1:
        raise _fail("window", "None or an int >= 1", repr(window))
    if not causal:
        raise ValueError("window: a sliding window keeps the keys with 0 <= pos_i - j < window and needs "
                         "causal=True, got causal=False")
    return int(window)


def check_balance_by(name, balance_by) -> str:
    if not isinstance(balance_by, str):
        raise TypeError(f"{name}: expected one of {BALANCE_BY}, got {type(balance_by).__name__}")
    if balance_by not in BALANCE_BY:
        raise ValueError(f"{name}: expected one of {BALANCE_BY}, got {balance_by!r}")
    return balance_by

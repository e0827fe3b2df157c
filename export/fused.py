"""``--ops fused``: MoSE and AR exported as one custom-domain node per use.

``mosear.MoSELoRA`` and ``mosear.ARAttention`` replace the static-shape decompositions
(``kernels/*/static.py``) while the exporter traces (``mosear_fast.backend.export_forms``), through
``torch.onnx.ops.symbolic``. The graph then runs where an implementation of the two ops is
registered: onnxruntime with the Python custom ops of ``ort_custom_ops.py`` (bound to the PyTorch
backend; validation on the CPU) and TensorRT with the plugins of ``trt_plugins.py`` (the Triton
kernels). TensorRT's ONNX parser finds a plugin by op_type, with the node attributes
``plugin_namespace`` and ``plugin_version``.

This file is the one contract all three share, as plain functions tested without any runtime:

``mosear.ARAttention`` (q, k, v, key_modality, query_mask) -> o
    q (B, Hq, Lq, D), k/v (B, Hkv, Lk, D) float; key_modality (B, Lk) int64 in [-1, M); query_mask
    (B, Lq) bool; o like q. Attributes: num_modalities (int), balance (str, comma-separated ids),
    target (str: "" = uniform, else comma-separated floats), target_shape (str: "" or comma-separated
    dims of a per-head target), strength, threshold, scale (float), modality_bias (str: "" or M
    floats), causal (int 0/1), window (int, 0 = none), softcap (float, 0 = none), balance_by (str:
    "mass" or "contribution"; DESIGN 2.2b). A graph written before the last three existed reads as
    their defaults. Lists travel as strings because onnxruntime-extensions' Python custom
    ops take only int, float and string attributes.
``mosear.MoSELoRA`` (x, modality, expert, gate, A, B, scale, out) -> y
    x (N, d_in); modality (N,) int64; expert (N, k) int64; gate (N, k) float32; A (M, r, d_in);
    B (M, E, d_out, r); scale (M,) float32 (s * w_m); out (N, d_out): the base layer's output; y like
    out = out + the MoSE update (``mose_lora``'s contract).
"""

from __future__ import annotations

import contextlib

import torch

DOMAIN = "mosear"
AR_OP, MOSE_OP = "ARAttention", "MoSELoRA"
PLUGIN_OPS = (AR_OP, MOSE_OP)
PLUGIN_VERSION = "1"
OP_VERSION = 1
AR_INPUTS = ("q", "k", "v", "key_modality", "query_mask")
MOSE_INPUTS = ("x", "modality", "expert", "gate", "A", "B", "scale", "out")
# attribute name -> Python type, as the ONNX node carries them (both runtimes read these)
AR_ATTRS = {"num_modalities": int, "balance": str, "target": str, "target_shape": str, "strength": float,
            "threshold": float, "modality_bias": str, "causal": int, "scale": float, "window": int,
            "softcap": float, "balance_by": str}
# attributes added after the first fused graphs: absent reads as these (the op's defaults)
AR_ATTR_DEFAULTS = {"window": 0, "softcap": 0.0, "balance_by": "mass"}
PLUGIN_ATTRS = {"plugin_namespace": DOMAIN, "plugin_version": PLUGIN_VERSION}
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _floats(values) -> str:
    return ",".join(repr(float(v)) for v in values)


def _parse(text: str, cast) -> tuple:
    return tuple(cast(v) for v in text.split(",")) if text else ()


def encode_ar_attrs(*, num_modalities, balance, target, strength, threshold, modality_bias, causal,
                    scale, window=None, softcap=None, balance_by="mass") -> dict:
    """The node attributes of one AR call (validated arguments, ``scale`` resolved to a float)."""
    if isinstance(target, torch.Tensor):
        target_values, target_shape = target.detach().float().reshape(-1).tolist(), ",".join(map(str, target.shape))
    else:
        target_values, target_shape = (() if target is None else tuple(target)), ""
    return {"num_modalities": int(num_modalities), "balance": ",".join(str(int(m)) for m in balance),
            "target": _floats(target_values), "target_shape": target_shape, "strength": float(strength),
            "threshold": float(threshold), "modality_bias": "" if modality_bias is None else _floats(modality_bias),
            "causal": int(bool(causal)), "scale": float(scale), "window": int(window or 0),
            "softcap": float(softcap or 0.0), "balance_by": str(balance_by)}


def decode_ar_attrs(attrs: dict) -> dict:
    """``ar_attention`` keyword arguments from node attributes (the inverse of ``encode_ar_attrs``)."""
    attrs = {**AR_ATTR_DEFAULTS, **attrs}
    missing = sorted(set(AR_ATTRS) - set(attrs))
    if missing:
        raise ValueError(f"{DOMAIN}.{AR_OP}: attributes {missing} are missing")
    target = _parse(attrs["target"], float) or None
    shape = _parse(attrs["target_shape"], int)
    if target is not None and shape:
        target = torch.tensor(target, dtype=torch.float32).reshape(shape)
    return {"num_modalities": int(attrs["num_modalities"]), "balance": _parse(attrs["balance"], int),
            "target": target, "strength": float(attrs["strength"]), "threshold": float(attrs["threshold"]),
            "modality_bias": _parse(attrs["modality_bias"], float) or None, "causal": bool(int(attrs["causal"])),
            "scale": float(attrs["scale"]), "window": int(attrs["window"]) or None,
            "softcap": float(attrs["softcap"]) or None, "balance_by": str(attrs["balance_by"])}


def _check_rank(op, names, shapes, ranks):
    for name, shape, rank in zip(names, shapes, ranks):
        if len(shape) != rank:
            raise ValueError(f"{DOMAIN}.{op}: input {name} must have rank {rank}, got shape {tuple(shape)}")


def ar_output_spec(shapes, dtypes):
    """(shape, dtype) of ``ARAttention``'s output from its inputs' shapes and dtypes (o like q); raises
    ValueError for inputs the op cannot take. Shapes may hold symbolic sizes (only ranks, and equal
    dtypes, are checked then)."""
    _check_rank(AR_OP, AR_INPUTS, shapes, (4, 4, 4, 2, 2))
    q, k, v = dtypes[:3]
    if q not in FLOAT_DTYPES or k != q or v != q:
        raise ValueError(f"{DOMAIN}.{AR_OP}: q, k, v must share one float dtype, got {q}, {k}, {v}")
    if dtypes[3] not in (torch.int64, torch.int32):
        raise ValueError(f"{DOMAIN}.{AR_OP}: key_modality must be int64 or int32, got {dtypes[3]}")
    if dtypes[4] != torch.bool:
        raise ValueError(f"{DOMAIN}.{AR_OP}: query_mask must be bool, got {dtypes[4]}")
    heads_q, heads_kv = shapes[0][1], shapes[1][1]
    if isinstance(heads_q, int) and isinstance(heads_kv, int) and heads_q % heads_kv:
        raise ValueError(f"{DOMAIN}.{AR_OP}: query heads {heads_q} must be a multiple of KV heads {heads_kv}")
    return tuple(shapes[0]), q


def mose_output_spec(shapes, dtypes):
    """(shape, dtype) of ``MoSELoRA``'s output (like ``out``); ValueError for inputs it cannot take."""
    _check_rank(MOSE_OP, MOSE_INPUTS, shapes, (2, 1, 2, 2, 3, 4, 1, 2))
    x, a, b, out = dtypes[0], dtypes[4], dtypes[5], dtypes[7]
    if x not in FLOAT_DTYPES or a != x or b != x or out != x:
        raise ValueError(f"{DOMAIN}.{MOSE_OP}: x, A, B, out must share one float dtype, got {x}, {a}, {b}, {out}")
    if dtypes[1] not in (torch.int64, torch.int32) or dtypes[2] not in (torch.int64, torch.int32):
        raise ValueError(f"{DOMAIN}.{MOSE_OP}: modality and expert must be integer tensors")
    if dtypes[3] != torch.float32 or dtypes[6] != torch.float32:
        raise ValueError(f"{DOMAIN}.{MOSE_OP}: gate and scale must be float32, got {dtypes[3]}, {dtypes[6]}")
    return tuple(shapes[7]), out


# ---- the export forms -------------------------------------------------------------------------------


def ar_attention_fused(q, k, v, key_modality, *, num_modalities, balance, target, strength, threshold,
                       modality_bias, causal, scale, query_mask, return_masses, window=None, softcap=None,
                       balance_by="mass", **_):
    """AR as one ``mosear.ARAttention`` node (same arguments as the static form)."""
    if return_masses:
        raise ValueError(f"--ops fused: {DOMAIN}.{AR_OP} returns the output only, not the masses")
    mask = query_mask if query_mask is not None else torch.ones(q.shape[0], q.shape[2], dtype=torch.bool,
                                                                  device=q.device)
    attrs = encode_ar_attrs(num_modalities=num_modalities, balance=balance, target=target, strength=strength,
                            threshold=threshold, modality_bias=modality_bias, causal=causal,
                            scale=scale if scale is not None else q.shape[-1] ** -0.5, window=window,
                            softcap=softcap, balance_by=balance_by)
    return torch.onnx.ops.symbolic(f"{DOMAIN}::{AR_OP}", (q, k, v, key_modality.long(), mask.bool()),
                                   {**attrs, **PLUGIN_ATTRS}, dtype=q.dtype, shape=q.shape, version=OP_VERSION)


def mose_lora_fused(x, modality, expert, gate, A, B, scale, out=None, *, inplace=False, **_):
    """MoSE as one ``mosear.MoSELoRA`` node (same arguments as the static form)."""
    base = out if out is not None else x.new_zeros(x.shape[0], B.shape[2])
    y = torch.onnx.ops.symbolic(f"{DOMAIN}::{MOSE_OP}", (x, modality.long(), expert.long(), gate.float(), A, B,
                                                           scale.float(), base.to(x.dtype)),
                                dict(PLUGIN_ATTRS), dtype=x.dtype, shape=base.shape, version=OP_VERSION)
    y = y.to(base.dtype)
    return out.copy_(y) if inplace else y


def mose_linear_fused(x, weight, bias, modality, expert, gate, A, B, scale, *, return_update_norm=False, **_):
    """``mose_linear`` (MoSELinear's fused base path) as the base ``MatMul``/``Add`` and one
    ``mosear.MoSELoRA`` node: the plugins take the base output as ``out``, so the node is the same."""
    if return_update_norm:
        raise ValueError("return_update_norm: the update norm is a training-time measure; an export has none")
    base = torch.nn.functional.linear(x, weight, bias)
    return mose_lora_fused(x, modality, expert, gate, A, B, scale, out=base)


@contextlib.contextmanager
def fused_forms():
    """While open, an export writes the two ops as custom nodes."""
    from mosear_fast.backend import export_forms

    with export_forms(mose_lora=mose_lora_fused, mose_linear=mose_linear_fused, ar_attention=ar_attention_fused):
        yield

"""TensorRT plugins for ``mosear.ARAttention`` and ``mosear.MoSELoRA`` (``--ops fused``), written with
TensorRT's Python plugin API (``tensorrt.plugin``, "quick deployable plugins", TensorRT >= 10.7).

``register()`` must run before TensorRT's ONNX parser sees a fused graph (``pipeline._engine`` does
it): the parser looks plugins up by op_type (``ARAttention``, ``MoSELoRA``) and the node attributes
``plugin_namespace="mosear"`` / ``plugin_version="1"`` that the fused export writes.

- ``@register`` (shape and type): the output is like ``q`` (AR) or like ``out`` (MoSE); the input
  checks are the plain functions ``fused.ar_output_spec`` / ``fused.mose_output_spec``, unit-tested
  without TensorRT.
- ``@impl`` (run time): the project's Triton kernels through ``mosear_fast.ar_attention`` and
  ``mosear_fast.mose_lora`` with ``backend="triton"`` on the CUDA tensors TensorRT hands over, on
  TensorRT's stream, value checks off (no host sync inside an engine).
- ``@aot_impl`` is not provided: QDP's ahead-of-time interface embeds one compiled kernel with a fixed
  argument order, while the project's launchers run several kernels with host-side preparation per
  call (MoSE sorts tokens by (modality, expert) and sizes its grid; AR merges per-class partial
  states), so an engine with these plugins needs Python (and torch, triton) at run time.
"""

from __future__ import annotations

import torch

from . import fused

_REGISTERED = False


def torch_dtype(trt_dtype):
    """torch dtype of a TensorRT DataType (the types the two plugins see)."""
    import tensorrt as trt

    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.bfloat16: torch.bfloat16,
             trt.int64: torch.int64, trt.int32: torch.int32, trt.bool: torch.bool}
    if trt_dtype not in table:
        raise ValueError(f"{fused.DOMAIN} plugins: unsupported TensorRT dtype {trt_dtype}")
    return table[trt_dtype]


def desc_shape(desc) -> tuple:
    """A TensorDesc's shape as a tuple: ints where TensorRT knows the size at build time, else None."""
    dims = []
    for dim in desc.shape_expr:
        constant = getattr(dim, "is_constant", False)
        dims.append(int(dim.constant_value) if constant else None)
    return tuple(dims)


def _check(spec, descs) -> None:
    spec([desc_shape(d) for d in descs], [torch_dtype(d.dtype) for d in descs])


def register() -> None:
    """Registers both plugins with TensorRT (idempotent). Raises TensorRTUnavailable without
    ``tensorrt.plugin`` (TensorRT < 10.7)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from .tensorrt_build import TensorRTUnavailable

    try:
        import tensorrt.plugin as trtp
    except ImportError:
        raise TensorRTUnavailable("--ops fused: the TensorRT plugins need tensorrt.plugin (TensorRT >= 10.7)") from None
    _define(trtp)
    _REGISTERED = True


def _define(trtp) -> None:

    ar_id, mose_id = f"{fused.DOMAIN}::{fused.AR_OP}", f"{fused.DOMAIN}::{fused.MOSE_OP}"

    @trtp.register(ar_id)
    def ar_desc(q: trtp.TensorDesc, k: trtp.TensorDesc, v: trtp.TensorDesc, key_modality: trtp.TensorDesc,
                query_mask: trtp.TensorDesc, num_modalities: int, balance: str, target: str, target_shape: str,
                strength: float, threshold: float, modality_bias: str, causal: int,
                scale: float, window: int, softcap: float, balance_by: str) -> tuple[trtp.TensorDesc]:
        _check(fused.ar_output_spec, (q, k, v, key_modality, query_mask))
        return q.like()

    @trtp.impl(ar_id)
    def ar_impl(q: trtp.Tensor, k: trtp.Tensor, v: trtp.Tensor, key_modality: trtp.Tensor,
                query_mask: trtp.Tensor, num_modalities: int, balance: str, target: str, target_shape: str,
                strength: float, threshold: float, modality_bias: str, causal: int, scale: float,
                window: int, softcap: float, balance_by: str, outputs: tuple[trtp.Tensor], stream: int) -> None:
        from mosear_fast import ar_attention

        attrs = fused.decode_ar_attrs(dict(
            num_modalities=num_modalities, balance=balance, target=target, target_shape=target_shape,
            strength=strength, threshold=threshold, modality_bias=modality_bias, causal=causal, scale=scale,
            window=window, softcap=softcap, balance_by=balance_by))
        t = [torch.as_tensor(x, device="cuda") for x in (q, k, v, key_modality, query_mask)]
        with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
            o = ar_attention(t[0], t[1], t[2], t[3].long(), query_mask=t[4].bool(), backend="triton",
                             validate=False, **attrs)
            torch.as_tensor(outputs[0], device="cuda").copy_(o)

    @trtp.register(mose_id)
    def mose_desc(x: trtp.TensorDesc, modality: trtp.TensorDesc, expert: trtp.TensorDesc, gate: trtp.TensorDesc,
                  A: trtp.TensorDesc, B: trtp.TensorDesc, scale: trtp.TensorDesc,  # noqa: N803
                  out: trtp.TensorDesc) -> tuple[trtp.TensorDesc]:
        _check(fused.mose_output_spec, (x, modality, expert, gate, A, B, scale, out))
        return out.like()

    @trtp.impl(mose_id)
    def mose_impl(x: trtp.Tensor, modality: trtp.Tensor, expert: trtp.Tensor, gate: trtp.Tensor,
                  A: trtp.Tensor, B: trtp.Tensor, scale: trtp.Tensor, out: trtp.Tensor,  # noqa: N803
                  outputs: tuple[trtp.Tensor], stream: int) -> None:
        from mosear_fast import mose_lora

        t = [torch.as_tensor(a, device="cuda") for a in (x, modality, expert, gate, A, B, scale, out)]
        with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
            y = mose_lora(t[0], t[1].long(), t[2].long(), t[3], t[4], t[5], t[6], t[7], backend="triton",
                          validate=False)
            torch.as_tensor(outputs[0], device="cuda").copy_(y)

"""Backend dispatch: auto, explicit backends, and the Triton-on-CPU rule."""

import pytest
import torch

from mosear_fast import backend as dispatch


@pytest.mark.parametrize("op", ["mose_lora", "ar_attention"])
def test_auto_is_torch_on_cpu(op):
    assert dispatch.resolve_backend(op, "auto", torch.device("cpu")) == "torch"


@pytest.mark.parametrize("op", ["mose_lora", "ar_attention"])
def test_auto_is_triton_on_cuda_when_implemented(op):
    implemented = dispatch._IMPLEMENTATIONS[op]["triton"] is not None and dispatch.triton_available()
    expected = "triton" if implemented else "torch"
    assert dispatch.resolve_backend(op, "auto", torch.device("cuda")) == expected


@pytest.mark.parametrize("op", ["mose_lora", "ar_attention"])
def test_triton_on_cpu_needs_the_interpreter(op, monkeypatch):
    if dispatch._IMPLEMENTATIONS[op]["triton"] is None:
        with pytest.raises(NotImplementedError, match="backend"):
            dispatch.resolve_backend(op, "triton", torch.device("cpu"))
        return
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert dispatch.resolve_backend(op, "triton", torch.device("cpu")) == "triton"
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        dispatch.resolve_backend(op, "triton", torch.device("cpu"))


def test_unknown_backend():
    with pytest.raises(ValueError, match="backend"):
        dispatch.resolve_backend("mose_lora", "cutlass", torch.device("cpu"))
    with pytest.raises(TypeError, match="backend"):
        dispatch.resolve_backend("mose_lora", None, torch.device("cpu"))


def test_implementation_is_callable():
    fn = dispatch.implementation("ar_attention", "torch", torch.device("cpu"))
    assert callable(fn) and fn.__name__ == "ar_attention_torch"

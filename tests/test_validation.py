"""Every bad input of DESIGN section 4 raises ValueError/TypeError naming the argument."""

import pytest
import torch

from mosear_fast import ar_attention, mose_lora

from .cases import make_ar_inputs, make_mose_inputs


def _mose(**override):
    args = make_mose_inputs(8, 6, 5, n_modalities=3, n_experts=4, rank=4, top_k=2)
    args.update(override)
    return lambda: mose_lora(args["x"], args["modality"], args["expert"], args["gate"], args["A"], args["B"],
                             args["scale"], args["out"], **{k: v for k, v in args.items() if k in
                                                            ("inplace", "backend")})


MOSE_BAD = [
    ("x", dict(x=torch.randn(8, 6, 1)), ValueError),
    ("x", dict(x=[[1.0]]), TypeError),
    ("x", dict(x=torch.randint(0, 3, (8, 6))), ValueError),
    ("A", dict(A=torch.randn(3, 4, 7)), ValueError),
    ("A", dict(A=torch.randn(9, 4, 6)), ValueError),
    ("B", dict(B=torch.randn(3, 4, 5, 3)), ValueError),
    ("B", dict(B=torch.randn(2, 4, 5, 4)), ValueError),
    ("A", dict(A=torch.randn(3, 4, 6, dtype=torch.float64)), ValueError),
    ("B", dict(B=torch.randn(3, 4, 5, 4).half()), ValueError),
    ("out", dict(out=torch.randn(8, 5).half()), ValueError),
    ("out", dict(out=torch.randn(8, 4)), ValueError),
    ("modality", dict(modality=torch.zeros(7, dtype=torch.long)), ValueError),
    ("modality", dict(modality=torch.zeros(8)), ValueError),
    ("modality", dict(modality=torch.full((8,), 3)), ValueError),
    ("modality", dict(modality=torch.full((8,), -2)), ValueError),
    ("expert", dict(expert=torch.full((8, 2), 4)), ValueError),
    ("expert", dict(expert=torch.zeros(8, 3, dtype=torch.long), gate=torch.rand(8, 3)), ValueError),
    ("expert", dict(expert=torch.zeros(8, 2)), ValueError),
    ("gate", dict(gate=torch.rand(8, 1)), ValueError),
    ("gate", dict(gate=torch.ones(8, 2, dtype=torch.long)), ValueError),
    ("scale", dict(scale=torch.rand(2)), ValueError),
    ("scale", dict(scale=float("nan")), ValueError),
    ("scale", dict(scale="1"), TypeError),
    ("inplace", dict(inplace=True, out=None), ValueError),
    ("inplace", dict(inplace=True, out=torch.randn(8, 5, requires_grad=True)), ValueError),
    ("out", dict(inplace=True, out=torch.randn(1, 5).expand(8, 5)), ValueError),  # rows share memory
    ("out", dict(inplace=True, out=torch.randn(8, 1).expand(8, 5)), ValueError),
    ("scale", dict(scale=torch.rand(3, requires_grad=True)), ValueError),  # scale is not differentiated
    ("backend", dict(backend="cuda"), ValueError),
]


@pytest.mark.parametrize("name,override,error", MOSE_BAD, ids=[f"{c[0]}-{i}" for i, c in enumerate(MOSE_BAD)])
def test_mose_bad_input(name, override, error):
    with pytest.raises(error, match=name):
        _mose(**override)()


def test_mose_ids_of_unadapted_tokens_are_not_checked():
    args = make_mose_inputs(8, 6, 5, top_k=1, pad_fraction=0.0)
    args["modality"][:3] = -1
    args["expert"][:3] = 99  # ignored: those rows take no adapter
    y = mose_lora(*(args[n] for n in ("x", "modality", "expert", "gate", "A", "B", "scale", "out")))
    assert torch.equal(y[:3], args["out"][:3])


def _ar(**override):
    args = make_ar_inputs(2, 4, 2, 5, 7, 8)
    args.update(num_modalities=3)
    args.update(override)
    tensors = [args.pop(n) for n in ("q", "k", "v", "key_modality")]
    return lambda: ar_attention(*tensors, **args)


AR_BAD = [
    ("q", dict(q=torch.randn(2, 4, 5)), ValueError),
    ("q", dict(q=torch.randn(2, 3, 5, 8)), ValueError),  # Hq % Hkv != 0
    ("q", dict(q=None), TypeError),
    ("k", dict(k=torch.randn(2, 2, 7, 4)), ValueError),
    ("k", dict(k=torch.randn(2, 2, 7, 8).half()), ValueError),
    ("v", dict(v=torch.randn(2, 2, 6, 8)), ValueError),
    ("key_modality", dict(key_modality=torch.zeros(2, 6, dtype=torch.long)), ValueError),
    ("key_modality", dict(key_modality=torch.zeros(2, 7)), ValueError),
    ("key_modality", dict(key_modality=torch.full((2, 7), 3)), ValueError),
    ("num_modalities", dict(num_modalities=0), ValueError),
    ("num_modalities", dict(num_modalities=2.0), TypeError),
    ("balance", dict(balance=(1, 1)), ValueError),
    ("balance", dict(balance=(1, 3)), ValueError),
    ("balance", dict(balance="12"), TypeError),
    ("target", dict(target=(1.0,)), ValueError),
    ("target", dict(target=(1.0, -1.0)), ValueError),
    ("strength", dict(strength=1.5), ValueError),
    ("strength", dict(strength=-0.1), ValueError),
    ("strength", dict(strength="0.5"), TypeError),
    ("threshold", dict(threshold=-1.0), ValueError),
    ("modality_bias", dict(modality_bias=(0.0, 1.0)), ValueError),
    ("modality_bias", dict(modality_bias=(0.0, float("inf"), 0.0)), ValueError),
    ("query_mask", dict(query_mask=torch.ones(2, 4, dtype=torch.bool)), ValueError),
    ("query_mask", dict(query_mask=torch.ones(2, 5)), ValueError),
    ("causal", dict(causal=1), TypeError),
    ("scale", dict(scale=float("nan")), ValueError),
    ("return_masses", dict(return_masses="yes"), TypeError),
    # DESIGN 2.2b options (q has Hq = 4 heads, balance (1, 2))
    ("window", dict(window=0), ValueError),
    ("window", dict(window=2.0), TypeError),
    ("window", dict(window=True), TypeError),
    ("window", dict(window=3, causal=False), ValueError),
    ("softcap", dict(softcap=0.0), ValueError),
    ("softcap", dict(softcap=-1.0), ValueError),
    ("softcap", dict(softcap=float("inf")), ValueError),
    ("softcap", dict(softcap="30"), TypeError),
    ("balance_by", dict(balance_by="norm"), ValueError),
    ("balance_by", dict(balance_by=1), TypeError),
    ("target", dict(target=(1.0, float("nan"))), ValueError),
    ("target", dict(target=(float("inf"), 1.0)), ValueError),
    ("target", dict(target=(0.0, 1.0)), ValueError),
    ("target", dict(target=torch.tensor([1.0, 2.0, 3.0])), ValueError),
    ("target", dict(target=torch.ones(3, 2)), ValueError),  # per-head rows must be Hq = 4
    ("target", dict(target=torch.ones(4, 2, 1)), ValueError),
    ("target", dict(target=torch.tensor([[1.0, 1.0]] * 3 + [[1.0, 0.0]])), ValueError),
    ("target", dict(target=torch.tensor([[1.0, 1.0]] * 3 + [[1.0, float("nan")]])), ValueError),
    ("target", dict(target=torch.ones(2, dtype=torch.long)), ValueError),
    ("target", dict(target=((1.0, 1.0),) * 3), ValueError),
    ("target", dict(target="12"), TypeError),
    ("target", dict(target=(1.0, (1.0, 2.0))), TypeError),
    ("backend", dict(backend="flash"), ValueError),
]


@pytest.mark.parametrize("name,override,error", AR_BAD, ids=[f"{c[0]}-{i}" for i, c in enumerate(AR_BAD)])
def test_ar_bad_input(name, override, error):
    with pytest.raises(error, match=name):
        _ar(**override)()


def test_dtype_errors_are_value_errors_that_type_handlers_also_catch():
    with pytest.raises(ValueError):
        _ar(k=torch.randn(2, 2, 7, 8).half())()
    with pytest.raises(TypeError):
        _ar(k=torch.randn(2, 2, 7, 8).half())()


def test_no_partial_write_on_bad_input():
    args = make_mose_inputs(8, 6, 5, top_k=1)
    before = args["out"].clone()
    args["modality"][0] = 7
    with pytest.raises(ValueError, match="modality"):
        mose_lora(*(args[n] for n in ("x", "modality", "expert", "gate", "A", "B", "scale", "out")), inplace=True)
    assert torch.equal(args["out"], before)


def test_ar_target_normalisation():
    """Targets reach the backends normalised in float64 (issue 17: scale never matters)."""
    from mosear_fast._validation import check_target

    assert check_target("target", (1e-40, 1e-40), 2) == (0.5, 0.5)
    assert check_target("target", (3e38, 3e38), 2) == (0.5, 0.5)
    assert check_target("target", (1.7e308, 1.7e308, 1.7e308), 3) == (1 / 3, 1 / 3, 1 / 3)
    assert check_target("target", (1e-300, 1e300), 2) == (0.0, 1.0)
    assert check_target("target", torch.tensor([[2.0, 6.0], [5.0, 5.0]]), 2, n_q_heads=2) == ((0.25, 0.75), (0.5, 0.5))
    assert check_target("target", None, 2) is None


def test_scale_forms_reach_the_backends_as_float32_vectors():
    """A number scale becomes an (M,) float32 vector (built once per value and reused: validation runs
    on every layer call); a float32 tensor that needs no grad is passed as it is; others are converted."""
    from mosear_fast._validation import check_mose_args

    t = make_mose_inputs(5, 8, 6, n_modalities=3, rank=4, dtype=torch.float32)
    args = (t["x"], t["modality"], t["expert"], t["gate"], t["A"], t["B"])

    def checked(scale):
        return check_mose_args(*args, scale, t["out"], inplace=False, validate=True)

    two, three = checked(2.0), checked(3)
    assert two.dtype == torch.float32 and two.tolist() == [2.0] * 3 and three.tolist() == [3.0] * 3
    assert checked(2.0) is two  # the cached vector
    vec = torch.tensor([1.0, 2.0, 3.0])
    assert checked(vec) is vec
    half = checked(vec.to(torch.float16))
    assert half.dtype == torch.float32 and torch.equal(half, vec)
    with torch.no_grad():
        leaf = vec.clone().requires_grad_()
        detached = checked(leaf)
    assert not detached.requires_grad and torch.equal(detached, vec)

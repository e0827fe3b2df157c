"""``python -m bench.kernel_check``: the compiled Triton kernels against the float64 references.

A short, self-contained check for the GPU script (it does not go through the test suite's conftest,
which switches the Triton interpreter on): ``mose_lora`` (forward and the gradients of x, gate, A, B),
the fused ``mose_linear`` Triton op (y, update norms, gradients of x, gate, A, B, W) and
``ar_attention`` (prefill with a query mask, and decode; output and masses) on a few shapes, in
float32 and bfloat16, with the Triton backend, each compared with the naive float64 reference of
``kernels/*/reference.py`` under the tolerance table (``mosear_fast.tolerances``). Without CUDA it
runs the same checks on tiny shapes through the Triton interpreter (``TRITON_INTERPRET=1`` must be
set before the start, as the GPU script does).

Writes ``{"checks": [...], "passed": n, "failed": n}`` as JSON (``--out``); exit status 1 if any
check failed.
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback

import torch

from mosear_fast.atomic import atomic_write_json

from .environment import describe

# Sizes with tails (not multiples of the blocks), GQA, decode; small enough for the float64 loops.
GPU_MOSE = [dict(n=600, d_in=384, d_out=520, r=64, top_k=1), dict(n=777, d_in=384, d_out=256, r=16, top_k=2)]
# AR: prefill (one query block; several per head with GQA), decode with 7 query heads per KV head
# packed into one block's rows (Lq 1 and 3), head dim 64.
GPU_AR = [dict(b=1, hq=4, hkv=2, lq=200, lk=200, d=128), dict(b=1, hq=8, hkv=2, lq=700, lk=700, d=128),
          dict(b=2, hq=7, hkv=1, lq=1, lk=1500, d=128), dict(b=1, hq=28, hkv=4, lq=3, lk=1000, d=128),
          dict(b=1, hq=2, hkv=2, lq=257, lk=257, d=64)]
CPU_MOSE = [dict(n=40, d_in=32, d_out=24, r=8, top_k=2)]
CPU_AR = [dict(b=1, hq=4, hkv=2, lq=24, lk=24, d=16), dict(b=1, hq=7, hkv=1, lq=3, lk=40, d=16)]
AR_OPTIONS = dict(num_modalities=3, balance=(1, 2), strength=0.5)


def check_mose(case, dtype, device) -> dict:
    from mosear_fast import mose_lora
    from mosear_fast.kernels.mose.reference import mose_lora_reference
    from mosear_fast.tolerances import rel_error, tolerance
    from tests.cases import make_mose_inputs

    inputs = make_mose_inputs(case["n"], case["d_in"], case["d_out"], rank=case["r"], top_k=case["top_k"],
                              dtype=dtype, device=device, seed=3)
    names = ("x", "gate", "A", "B")
    leaves = {n: inputs[n].detach().clone().requires_grad_(True) for n in names}
    out = inputs["out"]
    y = mose_lora(leaves["x"], inputs["modality"], inputs["expert"], leaves["gate"], leaves["A"], leaves["B"],
                  inputs["scale"], out, backend="triton")
    dy = torch.randn_like(y)
    y.backward(dy)
    ref_leaves = {n: leaves[n].detach().cpu().double().requires_grad_(True) for n in names}
    scale = inputs["scale"].cpu() if isinstance(inputs["scale"], torch.Tensor) else inputs["scale"]
    ref = mose_lora_reference(ref_leaves["x"], inputs["modality"].cpu(), inputs["expert"].cpu(), ref_leaves["gate"],
                              ref_leaves["A"], ref_leaves["B"], scale, out.cpu().double())
    ref.backward(dy.cpu().double())
    tf32 = dtype == torch.float32 and device.type == "cuda"
    tol = tolerance(dtype, tf32=tf32)
    errors = {"update": rel_error(y.detach().cpu().double() - out.cpu().double(), ref.detach() - out.cpu().double())}
    errors.update({f"grad_{n}": rel_error(leaves[n].grad, ref_leaves[n].grad) for n in names})
    return dict(errors=errors, tolerance=tol, passed=all(e <= tol for e in errors.values()))


def check_mose_linear(case, dtype, device) -> dict:
    """The fused base + adapter op (``mose_linear_triton``): y, the update norms and the gradients of
    x, gate, A, B and W against F.linear + the float64 reference."""
    from mosear_fast.kernels.mose.function import mose_linear_triton
    from mosear_fast.kernels.mose.reference import mose_lora_reference
    from mosear_fast.tolerances import rel_error, tolerance
    from tests.cases import make_mose_inputs

    inputs = make_mose_inputs(case["n"], case["d_in"], case["d_out"], rank=case["r"], top_k=case["top_k"],
                              dtype=dtype, device=device, seed=4, with_out=False)
    inputs["W"] = (torch.randn(case["d_out"], case["d_in"], device=device) * case["d_in"] ** -0.5).to(dtype)
    bias = torch.randn(case["d_out"], device=device).to(dtype)
    names = ("x", "gate", "A", "B", "W")
    leaves = {n: inputs[n].detach().clone().requires_grad_(True) for n in names}
    y, norm = mose_linear_triton(leaves["x"], leaves["W"], bias, inputs["modality"], inputs["expert"], leaves["gate"],
                                 leaves["A"], leaves["B"], inputs["scale"].float(), return_update_norm=True)
    dy = torch.randn_like(y)
    y.backward(dy)
    ref_leaves = {n: leaves[n].detach().cpu().double().requires_grad_(True) for n in names}
    modality, expert, scale = inputs["modality"].cpu(), inputs["expert"].cpu(), inputs["scale"].cpu()
    base = torch.nn.functional.linear(ref_leaves["x"], ref_leaves["W"], bias.cpu().double())
    ref = mose_lora_reference(ref_leaves["x"], modality, expert, ref_leaves["gate"], ref_leaves["A"],
                              ref_leaves["B"], scale, base)
    ref.backward(dy.cpu().double())
    ref_norm = mose_lora_reference(ref_leaves["x"], modality, expert, ref_leaves["gate"], ref_leaves["A"],
                                   ref_leaves["B"], torch.ones_like(scale, dtype=torch.float64)).norm(dim=1)
    tol = tolerance(dtype, tf32=dtype == torch.float32 and device.type == "cuda")
    base = base.detach()
    errors = {"y": rel_error(y, ref), "update": rel_error(y.detach().cpu().double() - base, ref.detach() - base),
              "update_norm": rel_error(norm, ref_norm.detach())}
    errors.update({f"grad_{n}": rel_error(leaves[n].grad, ref_leaves[n].grad) for n in names})
    return dict(errors=errors, tolerance=tol, passed=all(e <= tol for e in errors.values()))


def check_ar(case, dtype, device) -> dict:
    from mosear_fast import ar_attention
    from mosear_fast.kernels.ar_attention.reference import ar_attention_reference
    from mosear_fast.tolerances import rel_error, tolerance
    from tests.cases import make_ar_inputs

    inputs = make_ar_inputs(case["b"], case["hq"], case["hkv"], case["lq"], case["lk"], case["d"], dtype=dtype,
                            device=device, layout="av", seed=5)
    q, k, v, mod = (inputs[n] for n in ("q", "k", "v", "key_modality"))
    g = torch.Generator().manual_seed(1)
    query_mask = (torch.rand(case["b"], case["lq"], generator=g) < 0.7).to(device)
    o, masses = ar_attention(q, k, v, mod, query_mask=query_mask, return_masses=True, backend="triton",
                             **AR_OPTIONS)
    ref_o, ref_m = ar_attention_reference(q.cpu().double(), k.cpu().double(), v.cpu().double(), mod.cpu(),
                                          query_mask=query_mask.cpu(), **AR_OPTIONS)
    tol = tolerance(dtype, tf32=dtype == torch.float32 and device.type == "cuda")
    errors = {"output": rel_error(o, ref_o), "masses": rel_error(masses, ref_m)}
    return dict(errors=errors, tolerance=tol, passed=all(e <= tol for e in errors.values()))


def run(device: torch.device, log=print) -> dict:
    on_gpu = device.type == "cuda"
    checks = []
    for op, cases, fn in (("mose_lora", GPU_MOSE if on_gpu else CPU_MOSE, check_mose),
                          ("mose_linear", GPU_MOSE if on_gpu else CPU_MOSE, check_mose_linear),
                          ("ar_attention", GPU_AR if on_gpu else CPU_AR, check_ar)):
        for case in cases:
            for dtype in (torch.float32, torch.bfloat16):
                started = time.perf_counter()
                entry = dict(op=op, case=case, dtype=str(dtype).replace("torch.", ""))
                try:
                    entry.update(fn(case, dtype, device))
                except Exception as err:  # noqa: BLE001  (report every case)
                    traceback.print_exc(file=sys.stderr)
                    entry.update(passed=False, error=f"{type(err).__name__}: {str(err).strip()[:300]}")
                entry["seconds"] = round(time.perf_counter() - started, 2)
                checks.append(entry)
                worst = max(entry.get("errors", {}).values(), default=float("nan"))
                log(f"kernel check {op} {case} {entry['dtype']}: {'ok' if entry['passed'] else 'FAILED'} "
                    f"(worst rel. error {worst:.2e}, tolerance {entry.get('tolerance', float('nan')):.0e})"
                    + (f" {entry['error']}" if "error" in entry else ""))
    passed = sum(c["passed"] for c in checks)
    return dict(kind="kernel-check", environment=describe(device), compiled=on_gpu, checks=checks, passed=passed,
                failed=len(checks) - passed)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.kernel_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="JSON path for the results")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    result = run(device, log=lambda s: print(s, flush=True))
    if args.out:
        atomic_write_json(args.out, result)
    print(f"kernel check: {result['passed']} passed, {result['failed']} failed "
          f"({'compiled on ' + result['environment']['device'] if result['compiled'] else 'Triton interpreter'})")
    return 0 if result["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

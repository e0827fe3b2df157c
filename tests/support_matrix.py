"""The support matrix: which decoder families of the installed transformers take MoSE and AR, checked
on tiny random models (``tests/families.py``), and its rendering into the README.

Each cell is the outcome of one check against the model's own attention (its default
implementation: sdpa, or eager where the model defaults to it, as Gemma2 does for its softcap):

- MoSE: fresh adapters (B = 0) leave the logits of a left-padded batch unchanged, and one training
  step sends gradients to the adapters only.
- AR: AR on every layer at strength 0 gives the model's own logits (left padding; the family's sliding
  window and softcap where it has them); at strength 1 the logits change.
- generate / static cache: MoSE (B = 0) + AR (strength 0) generate the model's own greedy tokens and
  logits from a left-padded batch, with a dynamic and with a static cache.
- export: the ``mosear_fast.export`` pipeline exports MoSE + AR to ONNX and onnxruntime matches PyTorch
  (run for ``EXPORT_FAMILIES`` only: each takes a minute or more; multimodal models are not exported,
  the graph takes token inputs only).

A cell is ``yes``; ``refused: <argument>`` when ``apply_mosear`` refuses (the check then runs
without AR where it can, and says so: ``yes (MoSE only)``); ``n/a: <why>``; or ``fail: <what>``, which
the tests never accept. Modality ids: text families get visual and audio spans with 0 (not -1) at the
pads; multimodal families get none (they come from the placeholder tokens).

``python -m tests.support_matrix --write`` reruns every check and writes ``docs/support_matrix.json``
and the README table between its markers; the tests check both equal what the checks give now.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import sys
import tempfile
import warnings
from pathlib import Path

import torch

from tests.families import FAMILIES, text_modality_ids

COLUMNS = ("MoSE", "AR", "generate", "static cache", "export")
ROOT = Path(__file__).resolve().parent.parent
MATRIX_JSON = ROOT / "docs" / "support_matrix.json"
README = ROOT / "README.md"
BEGIN, END = "<!-- support-matrix:begin -->", "<!-- support-matrix:end -->"
TARGETS = ["q_proj", "v_proj", "qkv_proj", "o_proj"]  # Phi3 fuses q, k and v into qkv_proj
NEW_TOKENS = 4
# An export takes a minute or more (torch.export dominates), so it runs for the family whose attention differs
# most from the LLaMA/Qwen2 graphs tests/test_export.py exports: Gemma2, a sliding-window layer and a full one,
# both softcapped; the export column of the others says "not run".
EXPORT_FAMILIES = ("Gemma2",)


class Refused(Exception):
    """apply_mosear refused; the cell names the argument."""


def _rel_err(a, b):
    from mosear_fast.tolerances import rel_error

    return rel_error(a, b)


def _tol():
    from mosear_fast.tolerances import tolerance

    return tolerance(torch.float32)


def _prepare(model, *, mose=True, ar_strength=0.0, **ar_options):
    """apply_mosear with fresh MoSE and/or AR; ``Refused`` with the argument when it refuses."""
    from mosear_fast import ARConfig, MoSEConfig, apply_mosear

    ar = ARConfig(strength=ar_strength, **ar_options) if ar_strength is not None else None
    try:
        return apply_mosear(model, mose=MoSEConfig(r=4, num_experts=2, target_modules=TARGETS) if mose else None,
                            ar=ar)
    except ValueError as err:
        raise Refused(str(err).split(":", 1)[0]) from err


def _call_kwargs(family, inputs):
    """The inputs plus modality ids for the text families (multimodal ones derive theirs)."""
    return dict(inputs) if family.multimodal else {**inputs, "modality_ids": text_modality_ids(inputs)}


def _logits(model, kwargs):
    with torch.no_grad():
        return model(**kwargs).logits


class _Reference:
    """The family's tiny model with its own attention, its inputs and its outputs (computed once)."""

    def __init__(self, family):
        self.family = family
        self.model = family.build()
        self.inputs = family.inputs(self.model)
        self.kwargs = _call_kwargs(family, self.inputs)  # what the prepared models get
        self.real = self.inputs["attention_mask"].bool()
        self.logits = _logits(self.model, self.inputs)
        self._generated = {}

    def copy(self):
        return copy.deepcopy(self.model)

    def assert_same_logits(self, model, what):
        err = _rel_err(_logits(model, self.kwargs)[self.real], self.logits[self.real])
        assert err < _tol(), f"{what}: logits differ from the model's own by {err:.2e} (relative)"

    def generated(self, cache):
        if cache not in self._generated:
            self._generated[cache] = _generate(self.model, self.inputs, cache)
        return self._generated[cache]


def _generate(model, kwargs, cache):
    return model.generate(**kwargs, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0,
                          cache_implementation=cache, output_logits=True, return_dict_in_generate=True)


def check_mose(ref: _Reference) -> str:
    model = _prepare(ref.copy(), mose=True, ar_strength=None)
    ref.assert_same_logits(model, "MoSE with B = 0")
    from mosear_fast import aux_loss

    model.train()
    labels = ref.inputs["input_ids"].masked_fill(~ref.real, -100)
    out = model(**ref.kwargs, labels=labels)
    (out.loss + aux_loss(model)).backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    moved = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert trainable and all(".mose_adapter." in n for n in trainable), "parameters outside the adapters train"
    assert moved and moved <= trainable and any(n.endswith(".B") for n in moved), "no gradient reached B"
    return "yes"


def check_ar(ref: _Reference) -> str:
    ref.assert_same_logits(_prepare(ref.copy(), mose=False, ar_strength=0.0), "AR at strength 0")
    # all three modalities balanced, so a model with one kind of placeholder (image only) is reallocated too
    moved = _prepare(ref.copy(), mose=False, ar_strength=1.0, balance=("text", "visual", "audio"))
    err = _rel_err(_logits(moved, ref.kwargs)[ref.real], ref.logits[ref.real])
    assert err > 1e-4, f"AR at strength 1 left the logits unchanged ({err:.1e})"
    return "yes"


def _check_generation(ref: _Reference, cache) -> str:
    try:
        model, note = _prepare(ref.copy(), mose=True, ar_strength=0.0), ""
    except Refused:
        model, note = _prepare(ref.copy(), mose=True, ar_strength=None), " (MoSE only)"
    expected = ref.generated(cache)
    got = _generate(model, ref.kwargs, cache)
    assert torch.equal(got.sequences, expected.sequences), f"{cache} cache: generated tokens differ"
    err = _rel_err(torch.stack(got.logits), torch.stack(expected.logits))
    assert err < _tol(), f"{cache} cache: generation logits differ by {err:.2e}"
    return "yes" + note


def check_generate(ref: _Reference) -> str:
    return _check_generation(ref, "dynamic")


def check_static_cache(ref: _Reference) -> str:
    return _check_generation(ref, "static")


def check_export(ref: _Reference) -> str:
    if ref.family.multimodal:
        return "n/a: token inputs only"
    if ref.family.name not in EXPORT_FAMILIES:
        return "n/a: not run"
    from mosear_fast.export import export

    try:
        model, note = _prepare(ref.copy(), mose=True, ar_strength=0.5), ""
    except Refused:
        model, note = _prepare(ref.copy(), mose=True, ar_strength=None), " (MoSE only)"
    with tempfile.TemporaryDirectory() as tmp:
        report = export(model, Path(tmp) / "out", batch="1:2:2", seq="4:8:12")
    failed = [f"{s['shape']} (batch {s['batch']}, seq {s['seq']}): rel. error "
              f"{s['outputs']['logits'].get('rel_error', float('nan')):.1e}"
              for s in report["validation"]["shapes"] if not s["pass"]]
    assert not failed, "onnxruntime differs from PyTorch at " + "; ".join(failed)
    return "yes" + note


CHECKS = {"MoSE": check_mose, "AR": check_ar, "generate": check_generate, "static cache": check_static_cache,
          "export": check_export}


@functools.cache
def _reference(family_name: str) -> _Reference:
    return _Reference(FAMILIES[family_name])


def run_cell(family_name: str, column: str) -> str:
    """The cell's outcome (see the module docstring); never raises for a failing check."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return CHECKS[column](_reference(family_name))
    except Refused as refusal:
        return f"refused: {refusal}"
    except Exception as err:  # noqa: BLE001  (every other outcome is a failure the tests report)
        return f"fail: {type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"


def refusals(family_name: str) -> dict[str, str]:
    """The full messages of apply_mosear's refusals for the family (MoSE; AR), for the notes."""
    from mosear_fast import ARConfig, MoSEConfig, apply_mosear

    notes = {}
    for what, kwargs in (("MoSE", {"mose": MoSEConfig(r=4, target_modules=TARGETS)}), ("AR", {"ar": ARConfig()})):
        try:
            apply_mosear(_reference(family_name).copy(), **kwargs)
        except ValueError as err:
            notes[what] = str(err)
    return notes


# -------------------------------------------------------------------------------------------------
# The committed matrix and its README table
# -------------------------------------------------------------------------------------------------


def compute() -> dict:
    import transformers

    rows = []
    for name, family in FAMILIES.items():
        cells = {column: run_cell(name, column) for column in COLUMNS}
        print(f"{name}: {cells}", file=sys.stderr, flush=True)  # progress
        rows.append({"family": name, "class": family.model_class, "features": list(family.features),
                     "cells": cells, "refusals": refusals(name)})
    return {"transformers": transformers.__version__, "columns": list(COLUMNS), "families": rows}


def load() -> dict:
    return json.loads(MATRIX_JSON.read_text())


def committed_cell(matrix: dict, family_name: str, column: str) -> str | None:
    for row in matrix["families"]:
        if row["family"] == family_name:
            return row["cells"].get(column)
    return None


def _symbol(cell: str) -> str:
    """✓ / ✓ (MoSE only) / refused (`argument`) / – (why) / ✗ what."""
    if cell.startswith("yes"):
        return "✓" + cell[3:]
    kind, _, detail = cell.partition(": ")
    return {"refused": f"refused (`{detail}`)", "n/a": f"– ({detail})"}.get(kind, f"✗ {detail}")


def render(matrix: dict) -> str:
    """The README block: the table and the refusal messages."""
    lines = [f"Generated by `python -m tests.support_matrix --write` from `docs/support_matrix.json` "
             f"(transformers {matrix['transformers']}; tiny random models, checks in `tests/support_matrix.py`).",
             "", "| family | class | exercises | " + " | ".join(matrix["columns"]) + " |",
             "|---|---|---|" + "---|" * len(matrix["columns"])]
    for row in matrix["families"]:
        cells = " | ".join(_symbol(row["cells"][c]) for c in matrix["columns"])
        lines.append(f"| {row['family']} | `{row['class']}` | {', '.join(row['features']) or '-'} | {cells} |")
    notes = [(row["family"], what, message) for row in matrix["families"]
             for what, message in row["refusals"].items()]
    if notes:
        lines += ["", "Refusals (`apply_mosear` raises these before changing the model):", ""]
        lines += [f"- {family} ({what}): {message}" for family, what, message in notes]
    return "\n".join(lines) + "\n"


def replace_block(doc: str, text: str) -> str:
    if BEGIN not in doc or END not in doc:
        raise ValueError(f"README.md: no {BEGIN} ... {END} block")
    head, rest = doc.split(BEGIN, 1)
    return head + BEGIN + "\n" + text + END + rest.split(END, 1)[1]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.support_matrix", description=(
        "Rerun the support-matrix checks on tiny random models and print the matrix as JSON; with --write, "
        "save docs/support_matrix.json and the README table."))
    parser.add_argument("--write", action="store_true", help="write docs/support_matrix.json and README.md")
    args = parser.parse_args(argv)
    matrix = compute()
    text = json.dumps(matrix, indent=1, ensure_ascii=False) + "\n"
    if not args.write:
        print(text)
        return 0
    from mosear_fast.atomic import atomic_write_text

    atomic_write_text(MATRIX_JSON, text)
    atomic_write_text(README, replace_block(README.read_text(), render(matrix)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The with-past decoder's end-to-end checks: greedy decoding with onnxruntime (``OnnxGenerator``)
against PyTorch ``generate`` on the same prompts, and prefill / per-token decode latency of both.

Tokens are compared exactly. Logits are compared step by step (relative error of each step's (B, V)
logits against PyTorch's, the dtype's tolerance) up to the first step whose tokens differ: after it
the two runs continue from different prefixes. A differing token passes only as a near tie: PyTorch's
logit gap between the two tokens is within the tolerance of that row's norm (a low-precision graph
may then pick the other one); it is reported either way.
"""

from __future__ import annotations

import numpy as np
import torch

from mosear_fast.tolerances import rel_error

from .generate import OnnxGenerator
from .sources import example_inputs
from .validate import LATENCY_RUNS, median_ms
from .with_past import AudioVisualWithPast

DECODE_TOKENS = 16


def reference_generate(module, inputs, max_new_tokens: int):
    """PyTorch greedy ``generate`` of the module's model on prefill ``inputs`` (past 0), EOS off:
    (tokens (B, n) int64, logits (n, B, V) float32) as numpy."""
    from transformers import GenerationConfig

    named = dict(zip((s.name for s in module.input_specs()), inputs))
    lm = module._language_model()
    text = lm.config.get_text_config() if hasattr(lm.config, "get_text_config") else lm.config
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None,
                              pad_token_id=getattr(text, "pad_token_id", None) or 0, output_logits=True,
                              return_dict_in_generate=True)
    mask = named["attention_mask"]
    if isinstance(module, AudioVisualWithPast):
        from mosear_fast.av_model import placeholder_modality_ids

        ids = named["input_ids"]
        prompt = {"inputs_embeds": module.model.embed_inputs(ids, named["visual"], named["audio"]),
                  "modality_ids": placeholder_modality_ids(ids, mask)}
    else:
        prompt = {"input_ids": named["input_ids"], "modality_ids": named["modality_ids"]}
    with torch.no_grad():
        out = lm.generate(**prompt, attention_mask=mask, generation_config=config)
    new = out.sequences[:, -max_new_tokens:] if "input_ids" in prompt else out.sequences
    return new.numpy(), torch.stack(out.logits).float().numpy()


def compare_decoding(tokens, logits, ref_tokens, ref_logits, rtol: float) -> dict:
    """Token match and per-step logit errors (see the module docstring)."""
    steps = min(tokens.shape[1], ref_tokens.shape[1])
    same = tokens[:, :steps] == ref_tokens[:, :steps]
    mismatch = [s for s in range(steps) if not same[:, s].all()]
    first = mismatch[0] if mismatch else None
    upto = steps if first is None else first + 1
    errors = [rel_error(torch.from_numpy(logits[s]), torch.from_numpy(ref_logits[s])) for s in range(upto)]
    near_tie = None
    if first is not None:
        rows = np.nonzero(~same[:, first])[0]
        ref = ref_logits[first][rows]
        gap = ref[np.arange(len(rows)), ref_tokens[rows, first]] - ref[np.arange(len(rows)), tokens[rows, first]]
        near_tie = bool((gap <= rtol * np.linalg.norm(ref, axis=-1)).all())
    max_error = max(errors) if errors else 0.0
    passed = (first is None or near_tie) and max_error <= rtol and tokens.shape == ref_tokens.shape
    return {"new_tokens": int(steps), "tokens_equal": int(same.all(0).sum()) if first is None else int(first),
            "tokens_match": first is None, "first_mismatch_step": first, "near_tie": near_tie,
            "max_step_rel_error": max_error, "step_rel_errors": errors, "pass": bool(passed)}


def greedy_check(module, reference_module, folder, batch: int, length: int, rtol: float, *, session,
                 seed: int = 7, max_new_tokens: int = DECODE_TOKENS) -> dict:
    """ORT greedy decoding of the exported folder against PyTorch ``generate`` (of ``reference_module``,
    the fp32 model for low-precision graphs) on the same left-padded prompts."""
    inputs = example_inputs(module, batch, length, seed=seed, past=0)
    named = dict(zip((s.name for s in module.input_specs()), inputs))
    generator = OnnxGenerator(folder, session=session)
    features = {n: named[n] for n in generator.plan.feature_inputs}
    tokens, logits = generator.generate(named["input_ids"], named.get("modality_ids"), named["attention_mask"],
                                        max_new_tokens=max_new_tokens, eos_token_id=None, return_logits=True,
                                        **features)
    ref_inputs = example_inputs(reference_module, batch, length, seed=seed, past=0)
    ref_tokens, ref_logits = reference_generate(reference_module, ref_inputs, max_new_tokens)
    result = compare_decoding(tokens, logits, ref_tokens, ref_logits, rtol)
    result.update({"batch": batch, "prompt_length": length, "provider": generator.provider,
                   "reference": "PyTorch generate (greedy), fp32 model" if reference_module is not module
                   else "PyTorch generate (greedy)",
                   "tokens": tokens.tolist(), "reference_tokens": ref_tokens.tolist()})
    return result



def decoder_latency(module, session, batch: int, prompt: int) -> dict:
    """Median latency (ms) of one prefill call (``prompt`` tokens, empty past) and of one decode call
    (1 token after ``prompt`` cached ones), PyTorch (the module) and onnxruntime, same inputs."""
    names = [s.name for s in module.input_specs()]
    result = {"batch": batch, "prompt": prompt, "runs": LATENCY_RUNS, "statistic": "median",
              "pytorch_device": str(next(module.parameters()).device),
              "onnxruntime_provider": session.get_providers()[0] if session is not None else None}
    for phase, (length, past) in {"prefill": (prompt, 0), "decode": (1, prompt)}.items():
        inputs = example_inputs(module, batch, length, seed=123, past=past)
        feeds = {n: t.numpy() for n, t in zip(names, inputs)}
        with torch.no_grad():
            torch_ms = median_ms(lambda: module(*inputs))  # noqa: B023  (called right here)
        ort_ms = median_ms(lambda: session.run(None, feeds)) if session is not None else None  # noqa: B023
        result[phase] = {"seq": length, "past": past, "pytorch_ms": torch_ms, "onnxruntime_ms": ort_ms,
                         "onnxruntime_over_pytorch": ort_ms / torch_ms if ort_ms and torch_ms > 0 else None}
    return result


__all__ = ["compare_decoding", "decoder_latency", "greedy_check", "reference_generate"]

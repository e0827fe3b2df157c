"""apply_mosear on tiny LLaMA (MHA) and Qwen2 (GQA) models: exact start, AR effect and shares,
cached generation, left padding, gradients, inputs_embeds with modality spans."""

import pytest
import torch

from mosear_fast import (
    ARConfig,
    MoSEConfig,
    apply_mosear,
    attention_shares,
    aux_loss,
    modality_ids_from_spans,
)
from tests.models import TINY_MODELS, VOCAB, av_prompt, position_ids_from_mask

pytestmark = pytest.mark.parametrize("arch", sorted(TINY_MODELS))


def rel_err(a, b):
    return (torch.linalg.norm(a.double() - b.double()) / torch.linalg.norm(b.double())).item()


def prepared(arch, *, strength=0.7, random_adapters=True, routing="token", **ar_kwargs):
    model = TINY_MODELS[arch]()
    mose = MoSEConfig(r=4, num_experts=3, top_k=2, routing=routing, init_weights=not random_adapters,
                      target_modules=["q_proj", "v_proj", "o_proj"])
    torch.manual_seed(1)  # the same adapters for every strength
    return apply_mosear(model, mose=mose, ar=ARConfig(strength=strength, **ar_kwargs))


def test_fresh_adapters_and_zero_strength_leave_logits_unchanged(arch):
    model = TINY_MODELS[arch]()
    ids, mask, modality = av_prompt(2, 14, left_pad=[0, 3])
    positions = position_ids_from_mask(mask)
    with torch.no_grad():
        reference = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    apply_mosear(model, mose=MoSEConfig(r=4, num_experts=3), ar=ARConfig(strength=0.0))
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions,
                       modality_ids=modality).logits
    real = mask.bool()
    assert rel_err(logits[real], reference[real]) < 1e-5


def test_ar_changes_logits_and_moves_shares_toward_the_target(arch):
    ids, _, modality = av_prompt(2, 16, n_visual=8, n_audio=2)
    runs = {}
    for strength in (0.0, 1.0):
        model = prepared(arch, strength=strength)
        with torch.no_grad():
            logits = model(input_ids=ids, modality_ids=modality).logits
        runs[strength] = logits, attention_shares(model), attention_shares(model, reallocated=True)
    (logits0, before0, _), (logits1, before1, after1) = runs[0.0], runs[1.0]
    assert rel_err(logits1, logits0) > 1e-3
    assert sorted(before1) == [0, 1]
    # Layer 0 measures the same attention either way (AR acts after measuring).
    assert torch.allclose(before1[0], before0[0], atol=1e-6)
    for layer in before1:
        assert before1[layer].sum().item() == pytest.approx(1.0, abs=1e-5)
        gap_before = (before1[layer][1] - before1[layer][2]).abs()
        gap_after = (after1[layer][1] - after1[layer][2]).abs()
        assert gap_before > 0.01 and gap_after < 1e-5  # strength 1, uniform target: visual = audio
        # reallocation only moves mass within the balance set
        assert after1[layer][0].item() == pytest.approx(before1[layer][0].item(), abs=1e-6)


def test_ar_target_and_bias_change_the_balance(arch):
    ids, _, modality = av_prompt(1, 16)
    model = prepared(arch, strength=1.0, target=(1.0, 3.0), modality_bias={"audio": 0.5})
    with torch.no_grad():
        model(input_ids=ids, modality_ids=modality)
    after = attention_shares(model, reallocated=True)[0]
    assert (after[2] / after[1]).item() == pytest.approx(3.0, rel=1e-4)


def greedy_by_full_forward(model, ids, mask, modality, steps):
    """Greedy decoding that re-runs the whole growing sequence each step (no cache)."""
    tokens, logits_per_step = ids, []
    for _ in range(steps):
        grown = tokens.shape[1] - ids.shape[1]
        full_mask = torch.cat([mask, torch.ones(mask.shape[0], grown, dtype=mask.dtype)], 1)
        full_ids = torch.cat([modality, torch.zeros(modality.shape[0], grown, dtype=torch.long)], 1)
        with torch.no_grad():
            logits = model(input_ids=tokens, attention_mask=full_mask, modality_ids=full_ids,
                           position_ids=position_ids_from_mask(full_mask), use_cache=False).logits[:, -1]
        logits_per_step.append(logits)
        tokens = torch.cat([tokens, logits.argmax(-1, keepdim=True)], 1)
    return tokens, torch.stack(logits_per_step, 1)


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_cached_generate_equals_full_forward_passes(arch, cache):
    model = prepared(arch, strength=0.8)
    ids, mask, modality = av_prompt(2, 13, left_pad=[2, 0])
    out = model.generate(input_ids=ids, attention_mask=mask, modality_ids=modality, max_new_tokens=6,
                         do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0,
                         cache_implementation=cache)
    tokens, logits = greedy_by_full_forward(model, ids, mask, modality, 6)
    assert torch.equal(out.sequences, tokens)
    assert rel_err(torch.stack(out.logits, 1), logits) < 1e-5
    # the last step's shares come from the one decoded query (text) over prompt + generated keys
    assert sorted(attention_shares(model)) == [0, 1]


def test_left_padded_batch_equals_samples_run_alone(arch):
    model = prepared(arch, strength=0.8, routing="sequence")
    lengths = [15, 11]
    width = max(lengths)
    ids, mask, modality = av_prompt(2, width, left_pad=[width - n for n in lengths], seed=3)
    with torch.no_grad():
        batch_logits = model(input_ids=ids, attention_mask=mask, modality_ids=modality,
                             position_ids=position_ids_from_mask(mask)).logits
    batch_tokens = model.generate(input_ids=ids, attention_mask=mask, modality_ids=modality, max_new_tokens=4,
                                  do_sample=False, pad_token_id=0)
    for b, n in enumerate(lengths):
        alone = slice(width - n, width)
        with torch.no_grad():
            logits = model(input_ids=ids[b:b + 1, alone], modality_ids=modality[b:b + 1, alone]).logits
        assert rel_err(batch_logits[b, alone], logits[0]) < 1e-5
        tokens = model.generate(input_ids=ids[b:b + 1, alone], modality_ids=modality[b:b + 1, alone],
                                max_new_tokens=4, do_sample=False, pad_token_id=0)
        assert torch.equal(batch_tokens[b, width:], tokens[0, n:])


def test_gradients_reach_only_adapters_and_routers(arch):
    model = prepared(arch, strength=0.5).train()
    ids, mask, modality = av_prompt(2, 12)
    out = model(input_ids=ids, attention_mask=mask, modality_ids=modality, labels=ids)
    extra = aux_loss(model)
    assert extra.requires_grad and extra.item() > 0
    (out.loss + extra).backward()
    with_grad = {name for name, p in model.named_parameters()
                 if p.grad is not None and p.grad.abs().sum() > 0}
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert with_grad and with_grad <= trainable
    assert all(".mose_adapter." in name for name in trainable)
    assert any("router_weight" in name for name in with_grad)
    assert any(name.endswith(".A") for name in with_grad)
    model.eval()
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, modality_ids=modality)
    assert aux_loss(model).item() == 0.0


def test_gradient_checkpointing_gives_the_same_step(arch):
    """Layers rerun in backward see the same ids and weights, and update the dynamic weights once."""
    results = []
    for checkpointing in (False, True):
        model = prepared(arch, strength=0.5).train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        ids, mask, modality = av_prompt(2, 12)
        out = model(input_ids=ids, attention_mask=mask, modality_ids=modality, labels=ids, use_cache=False)
        (out.loss + aux_loss(model)).backward()
        adapter = model.get_decoder().layers[1].self_attn.q_proj.mose_adapter["default"]
        results.append((out.loss.detach(), adapter.update_norm_ema.clone(), adapter.A.grad.clone()))
    for plain, rerun in zip(*results, strict=True):
        assert torch.allclose(plain, rerun, rtol=1e-5, atol=1e-7)


def emotion_llama_like(model, *, seed=0):
    """inputs_embeds of [text x4][256-like visual patches x12][face][video][audio][text x5] with spans."""
    g = torch.Generator().manual_seed(seed)
    text_ids = torch.randint(3, VOCAB, (1, 9), generator=g)
    embed = model.get_input_embeddings()
    with torch.no_grad():
        text = embed(text_ids)
    features = torch.randn(1, 15, text.shape[-1], generator=g) * text.std()
    embeds = torch.cat([text[:, :4], features, text[:, 4:]], dim=1)  # 24 positions
    spans = [[(4, 16, "visual"), (16, 17, "visual"), (17, 18, "visual"), (18, 19, "audio")]]
    modality = modality_ids_from_spans(spans, length=embeds.shape[1])
    return embeds, modality


def test_inputs_embeds_with_modality_spans(arch):
    model = prepared(arch, strength=0.8)
    embeds, modality = emotion_llama_like(model)
    assert modality.tolist()[0] == [0] * 4 + [1] * 14 + [2] + [0] * 5
    out = model.generate(inputs_embeds=embeds, modality_ids=modality, max_new_tokens=5, do_sample=False,
                         output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    new_tokens = out.sequences[:, -5:]  # generate returns only the new tokens for embeddings prompts
    grown = embeds
    for step in range(5):
        ids = torch.cat([modality, torch.zeros(1, grown.shape[1] - modality.shape[1], dtype=torch.long)], 1)
        with torch.no_grad():
            logits = model(inputs_embeds=grown, modality_ids=ids, use_cache=False).logits[:, -1]
        assert rel_err(out.logits[step], logits) < 1e-5
        assert logits.argmax(-1).item() == new_tokens[0, step].item()
        with torch.no_grad():
            grown = torch.cat([grown, model.get_input_embeddings()(new_tokens[:, step:step + 1])], 1)
    shares = attention_shares(model)
    assert all(share[2] > 0 for share in shares.values())  # the single audio token is seen


def test_record_shares_off_gives_the_same_logits_and_no_shares(arch):
    ids, mask, mod = av_prompt(2, 16)
    logits = {}
    for record in (True, False):
        model = prepared(arch, record_shares=record)
        logits[record] = model(input_ids=ids, attention_mask=mask, modality_ids=mod).logits
        if record:
            assert len(attention_shares(model)) > 0
        else:
            with pytest.raises(ValueError, match="record_shares"):
                attention_shares(model)
    assert torch.equal(logits[True], logits[False])


def padding_mask(form, mask):
    """The padding of ``mask`` (B, T) in the form a caller may pass: 2-D, or a 4-D causal mask (bool, True =
    attend; or additive float, -inf = hidden)."""
    if form == "2-D":
        return mask
    length = mask.shape[1]
    visible = torch.tril(torch.ones(length, length, dtype=torch.bool))[None, None] & mask.bool()[:, None, None, :]
    if form == "4-D bool":
        return visible
    return torch.zeros(visible.shape).masked_fill(~visible, float("-inf"))


@pytest.mark.parametrize("ids_at_pads", ["zero", "none"])
@pytest.mark.parametrize("form", ["2-D", "4-D bool", "4-D float"])
def test_padding_comes_from_the_attention_mask(arch, form, ids_at_pads):
    """Pads given modality 0 (or no ids at all) are still padding: each sample's logits equal the sample
    alone (sequence routing averages over the real tokens only; AR attends no pad)."""
    model = prepared(arch, strength=0.8, routing="sequence")
    lengths = [14, 9]
    width = max(lengths)
    ids, mask, modality = av_prompt(2, width, left_pad=[width - n for n in lengths], seed=5)
    modality = modality.clamp_min(0) if ids_at_pads == "zero" else None
    with torch.no_grad():
        batch_logits = model(input_ids=ids, attention_mask=padding_mask(form, mask), modality_ids=modality,
                             position_ids=position_ids_from_mask(mask)).logits
    for b, n in enumerate(lengths):
        alone = slice(width - n, width)
        with torch.no_grad():
            logits = model(input_ids=ids[b:b + 1, alone],
                           modality_ids=None if modality is None else modality[b:b + 1, alone]).logits
        assert rel_err(batch_logits[b, alone], logits[0]) < 1e-5


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_left_padded_generate_equals_the_models_own_attention(arch, cache):
    """AR at strength 0 with fresh adapters generates the plain model's tokens and logits from a left-padded
    batch whose pads carry modality 0: with a static cache, generate hands the model prepared 4-D masks (a
    dict of them for models with layer types), so the padding must come from the prompt's 2-D mask."""
    reference = TINY_MODELS[arch]()
    model = apply_mosear(TINY_MODELS[arch](), mose=MoSEConfig(r=4, num_experts=3), ar=ARConfig(strength=0.0))
    ids, mask, modality = av_prompt(2, 13, left_pad=[0, 4], seed=2)
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0,
                  cache_implementation=cache, output_logits=True, return_dict_in_generate=True)
    expected = reference.generate(**kwargs)
    out = model.generate(**kwargs, modality_ids=modality.clamp_min(0))
    assert torch.equal(out.sequences, expected.sequences)
    assert rel_err(torch.stack(out.logits), torch.stack(expected.logits)) < 1e-5


def test_a_second_mose_is_refused_and_ar_can_be_replaced(arch):
    model = prepared(arch, strength=0.5)
    with pytest.raises(ValueError, match=r"mose: .* already has MoSE adapters \(\['default'\] on 6 linear layers\); "
                                         "apply_mosear adds MoSE once"):
        apply_mosear(model, mose=MoSEConfig(r=4))
    with pytest.raises(ValueError, match="already has MoSE adapters"):
        apply_mosear(model, mose=MoSEConfig(r=4), adapter_name="second")
    ids, mask, modality = av_prompt(2, 12)
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask, modality_ids=modality).logits
        apply_mosear(model, ar=ARConfig(strength=0.0))  # replaces the AR settings; the adapters stay
        after = model(input_ids=ids, attention_mask=mask, modality_ids=modality).logits
    assert rel_err(after, before) > 1e-3
    assert sum(".mose_adapter." in name for name, _ in model.named_parameters()) > 0

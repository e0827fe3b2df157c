"""What MoSETrainer logs besides the loss: modality weights, expert load and attention shares.

``MoSEStats`` hooks the model's MoSE adapters and accumulates, between two logging steps, the
fraction of routing decisions that went to each expert per modality (averaged over layers). The
modality weights are read from the adapters' buffers at log time; attention shares come from AR
when the model runs it. Values are plain floats keyed ``group/modality[/expert]`` so every
transformers logging integration (and ``trainer_state.json``) takes them as they are.
"""

from __future__ import annotations

import torch


class MoSEStats:
    """Per-modality expert counts gathered by forward hooks on every ``MoSEAdapter`` of ``model``."""

    def __init__(self, model, modalities):
        from .adapter_state import mose_adapters

        self.modalities = tuple(modalities)
        self.adapters = mose_adapters(model)
        self.counts: torch.Tensor | None = None  # [M, E] routing units per modality and expert
        self._handles = [a.register_forward_hook(self._record) for a in self.adapters]

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    @torch.no_grad()
    def _record(self, adapter, args, output) -> None:
        if not adapter.training:
            return
        x, _, modality = args[:3]
        sample = args[3] if len(args) > 3 else None
        n_samples = args[4] if len(args) > 4 else 1
        slot = torch.where(modality >= 0, adapter.slot_of_modality[modality.clamp_min(0)], -1)
        # The adapter's own routing (token or sequence units): the decisions it just made.
        _, unit_logits, unit_slot, present = adapter._router_logits(x, slot, sample, n_samples)
        unit_logits, unit_slot = unit_logits[present], unit_slot[present]  # the units with tokens
        chosen = unit_logits.float().topk(adapter.top_k, dim=-1).indices  # [U, k]
        counts = torch.zeros(adapter.num_modalities, adapter.num_experts, device=x.device)
        modality_of_unit = adapter.adapted_ids[unit_slot].unsqueeze(1).expand_as(chosen)
        counts.index_put_((modality_of_unit.reshape(-1), chosen.reshape(-1)),
                          torch.full((chosen.numel(),), 1.0 / adapter.top_k, device=x.device), accumulate=True)
        counts = counts.cpu()
        self.counts = counts if self.counts is None or self.counts.shape != counts.shape else self.counts + counts

    def pop_logs(self, attention: dict | None = None) -> dict[str, float]:
        """The values to log now (and reset the expert counts)."""
        logs: dict[str, float] = {}
        if self.adapters:
            weights = torch.stack([a.modality_weight.float().cpu() for a in self.adapters]).mean(0)
            for m in sorted({m for a in self.adapters for m in a.adapted}):
                logs[f"modality_weight/{self.modalities[m]}"] = round(float(weights[m]), 6)
        if self.counts is not None:
            totals = self.counts.sum(1, keepdim=True)
            load = self.counts / totals.clamp_min(1e-12)
            for m in range(load.shape[0]):
                if totals[m] > 0:
                    for e in range(load.shape[1]):
                        logs[f"expert_load/{self.modalities[m]}/e{e}"] = round(float(load[m, e]), 6)
            self.counts = None
        for m, share in (attention or {}).items():
            logs[f"attention_share/{m}"] = round(float(share), 6)
        return logs


def mean_attention_shares(llm, modalities) -> dict[str, float] | None:
    """AR's pre-reallocation attention share per modality, averaged over the AR layers of the last
    forward; None when the model has no AR."""
    from mosear_fast import attention_shares

    context = getattr(llm, "_mosear_context", None)
    if context is None or context.ar is None or not context.shares:
        return None
    shares = torch.stack(list(attention_shares(llm).values())).mean(0)
    return {name: float(shares[m]) for m, name in enumerate(modalities)}

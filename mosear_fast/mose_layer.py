"""MoSELinear: a frozen ``nn.Linear`` plus modality-specific LoRA experts (DESIGN 2.1).

``MoSEAdapter`` holds one adapter's tensors for the adapted modalities ("slots"):
``A (Ma, r, d_in)``, ``B (Ma, E, d_out, r)``, routers ``(Ma, E, d_in)`` + bias ``(Ma, E)``, and the
dynamic-weight state as buffers (saved with the adapter): the EMA of the update norm per modality
and the weights ``w_m`` derived from it. ``MoSELinear`` wraps the base layer and keeps its adapters
in a ``ModuleDict`` keyed by adapter name (the layout PEFT expects; one adapter is active).

Per forward, routing is a few batched tensor ops (no Python loop over modalities or experts), then
one ``mose_linear`` call computes base + update (the base layer's weight and bias borrowed, the
update's norm for the dynamic weights returned with it), or, with adapter dropout in training, the
base layer and one ``mose_lora`` call. Pure PyTorch: no transformers or peft import here.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .modality import check_modality_range
from .ops import mose_linear, mose_lora


class MoSEAdapter(nn.Module):
    """One MoSE adapter of a ``d_in -> d_out`` linear layer.

    ``adapted``: ascending ids of the modalities with an adapter (slot i serves modality adapted[i]);
    ``balance``: modality ids whose dynamic weights are balanced; ``scale``: s = alpha / r (or / sqrt r).
    """

    def __init__(self, d_in: int, d_out: int, *, num_modalities: int, adapted, r: int, scale: float,
                 num_experts: int, top_k: int, routing: str = "token", dropout: float = 0.0,
                 dynamic_weights: bool = True, balance=(), beta: float = 0.9, gamma: float = 1.0,
                 weight_clip=(0.5, 2.0), load_balance_coef: float = 0.0, z_loss_coef: float = 0.0,
                 router_init_std: float = 0.02, init_weights: bool = True, dtype=None, device=None):
        super().__init__()
        adapted = tuple(sorted(int(m) for m in adapted))
        if not adapted or adapted[0] < 0 or adapted[-1] >= num_modalities:
            raise ValueError(f"adapted: expected modality ids in [0, {num_modalities}), got {adapted!r}")
        if top_k not in (1, 2) or top_k > num_experts:
            raise ValueError(f"top_k: expected 1 or 2 and <= num_experts={num_experts}, got {top_k!r}")
        if routing not in ("token", "sequence"):
            raise ValueError(f"routing: expected 'token' or 'sequence', got {routing!r}")
        self.d_in, self.d_out = d_in, d_out
        self.num_modalities, self.adapted = num_modalities, adapted
        self.num_experts, self.top_k = num_experts, top_k
        self.rank, self.scale, self.routing = r, float(scale), routing
        self.dynamic_weights, self.balance = dynamic_weights, tuple(int(m) for m in balance)
        self.beta, self.gamma, self.weight_clip = float(beta), float(gamma), (float(weight_clip[0]),
                                                                               float(weight_clip[1]))
        self.load_balance_coef, self.z_loss_coef = float(load_balance_coef), float(z_loss_coef)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        n_slots = len(adapted)
        to = dict(dtype=dtype, device=device)
        self.A = nn.Parameter(torch.empty(n_slots, r, d_in, **to))
        self.B = nn.Parameter(torch.empty(n_slots, num_experts, d_out, r, **to))
        self.router_weight = nn.Parameter(torch.empty(n_slots, num_experts, d_in, **to))
        self.router_bias = nn.Parameter(torch.zeros(n_slots, num_experts, **to))
        slot_of_modality = torch.full((num_modalities,), -1, dtype=torch.long, device=device)
        slot_of_modality[list(adapted)] = torch.arange(n_slots, device=device)
        # Derived from the config, so not saved; the dynamic-weight state is saved with the adapter.
        self.register_buffer("slot_of_modality", slot_of_modality, persistent=False)
        self.register_buffer("adapted_ids", torch.tensor(adapted, device=device), persistent=False)
        f32 = dict(dtype=torch.float32, device=device)
        self.register_buffer("update_norm_ema", torch.zeros(num_modalities, **f32))
        self.register_buffer("modality_weight", torch.ones(num_modalities, **f32))
        self.router_init_std = router_init_std
        self.reset_parameters(init_weights)
        self.last_regularizers: dict[str, torch.Tensor] | None = None
        self._measured_forward: int | None = None  # the model forward whose update norms were measured
        self._measured_scale: torch.Tensor | None = None  # and the s * w_m it used

    @torch.no_grad()
    def reset_parameters(self, init_weights: bool = True):
        """LoRA init: A Kaiming-uniform, B zero (the wrapped layer computes exactly the base at step 0);
        ``init_weights=False`` draws B at random too. Routers: small Gaussian, zero bias."""
        for a in self.A:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        if init_weights:
            self.B.zero_()
        else:
            nn.init.normal_(self.B, std=self.rank ** -0.5)
        nn.init.normal_(self.router_weight, std=self.router_init_std)
        self.router_bias.zero_()
        self.update_norm_ema.zero_()
        self.modality_weight.fill_(1.0)

    def __getstate__(self):
        # The regularizers of the last forward belong to that forward's autograd graph: a copy (or a
        # pickle) of the adapter starts without them, as a fresh adapter does.
        state = dict(self.__dict__)
        state["last_regularizers"] = None
        state["_measured_scale"] = None
        state["_measured_forward"] = None
        return state

    def extra_repr(self) -> str:
        return (f"d_in={self.d_in}, d_out={self.d_out}, adapted={self.adapted}, r={self.rank}, "
                f"experts={self.num_experts}, top_k={self.top_k}, routing={self.routing!r}")

    # ---------------------------------------------------------------------------------------------

    def scale_vector(self) -> torch.Tensor:
        """(Ma,) float32: ``s * w_m`` per slot."""
        return self.scale * self.modality_weight[self.adapted_ids]

    def forward(self, x: torch.Tensor, base: torch.Tensor | None, modality: torch.Tensor,
                sample: torch.Tensor | None = None, n_samples: int = 1, forward_id: int | None = None, *,
                linear: tuple[torch.Tensor, torch.Tensor | None] | None = None):
        """``base + update`` for x (N, d_in), base (N, d_out), modality (N,) ids in [-1, M).

        With ``linear=(weight, bias)`` (and ``base`` None) the base layer is computed with the
        update in one ``mose_linear`` call instead, which needs the adapter to read x itself (no
        dropout). ``sample`` (N,) gives each token's sample index in [0, n_samples) (sequence
        routing). ``forward_id`` identifies the model forward: a rerun with the same id (gradient
        checkpointing) does not update the dynamic weights again.
        """
        slot = torch.where(modality >= 0, self.slot_of_modality[modality.clamp_min(0)], -1)  # [N]
        logits, unit_logits, unit_slot, unit_present = self._router_logits(x, slot, sample, n_samples)
        probs = torch.softmax(logits.float(), dim=-1)  # [N, E]
        top_p, expert = probs.topk(self.top_k, dim=-1)  # [N, k]
        gate = top_p if self.top_k == 1 else top_p / top_p.sum(-1, keepdim=True)

        scale = self.scale_vector()
        A, B = self.A.to(x.dtype), self.B.to(x.dtype)
        measure = self.training and self.dynamic_weights
        rerun = measure and forward_id is not None and forward_id == self._measured_forward
        if rerun:
            # Gradient checkpointing recomputes this forward: use the weights it used, update nothing.
            scale = self._measured_scale
        record = measure and not rerun
        norms = None
        if linear is not None:
            # The norm of the update before s * w_m comes with the output (no separate update tensor).
            y = mose_linear(x, linear[0], linear[1], slot, expert, gate, A, B, scale, return_update_norm=record,
                            validate=False)
            if record:
                y, norms = y
        elif measure:
            # The update alone, to measure its norm before s * w_m (one mose_lora call either way).
            update = mose_lora(self.dropout(x), slot, expert, gate, A, B, scale, validate=False)
            y = base.to(x.dtype) + update
            if record:
                with torch.no_grad():
                    norms = torch.where(slot >= 0, update.float().norm(dim=-1) / scale[slot.clamp_min(0)], 0.0)
        else:
            y = mose_lora(self.dropout(x), slot, expert, gate, A, B, scale, out=base.to(x.dtype), validate=False)
        if record:
            self._measured_forward, self._measured_scale = forward_id, scale.detach()
            self._update_dynamic_weights(norms, slot)

        self.last_regularizers = self._regularizers(unit_logits, unit_slot, unit_present) if self.training else None
        return y

    @property
    def reads_dropped_input(self) -> bool:
        """Whether the update reads ``dropout(x)`` now (training with dropout > 0), so it cannot
        share the base layer's matmul input."""
        return self.training and isinstance(self.dropout, nn.Dropout)

    def _router_logits(self, x, slot, sample, n_samples):
        """Per-token router logits (N, E), and the routing units' logits (U, E), slots (U,) and presence
        (U,) bool (a unit without tokens, or a token without adapter, counts for nothing).

        No boolean indexing and no bincount: every shape is known from N, so nothing is read on the
        host (no sync on CUDA, no data-dependent shape under torch.compile or CUDA-graph capture)."""
        n_slots, n_experts = len(self.adapted), self.num_experts
        adapted = slot >= 0
        if self.routing == "token":
            # All slots' logits in one matmul, then each token's own slot (E is small).
            every = F.linear(x, self.router_weight.reshape(n_slots * n_experts, -1).to(x.dtype),
                             self.router_bias.reshape(-1).to(x.dtype))  # [N, Ma*E]
            index = slot.clamp_min(0).view(-1, 1, 1).expand(-1, 1, n_experts)
            logits = every.view(-1, n_slots, n_experts).gather(1, index).squeeze(1)  # [N, E]
            return logits, logits, slot, adapted
        # Sequence routing: one unit per (sample, modality), routed on the mean of its tokens.
        if sample is None:
            sample = torch.zeros_like(slot)
        unit = sample * n_slots + slot.clamp_min(0)  # [N]
        n_units = n_samples * n_slots
        sums = x.new_zeros(n_units, x.shape[1], dtype=torch.float32).index_add(
            0, unit, torch.where(adapted[:, None], x.float(), 0.0))  # rows without adapter add exact zeros
        counts = x.new_zeros(n_units, dtype=torch.float32).index_add(0, unit, adapted.float())
        means = (sums / counts.clamp_min(1).unsqueeze(1)).to(x.dtype)  # [U_all, d_in]
        unit_slots = torch.arange(n_slots, device=x.device).repeat(n_samples)  # [U_all]
        unit_logits = torch.einsum("ud,ued->ue", means, self.router_weight.to(x.dtype)[unit_slots]) \
            + self.router_bias.to(x.dtype)[unit_slots]  # [U_all, E]
        return unit_logits[unit], unit_logits, unit_slots, counts > 0

    def _regularizers(self, unit_logits, unit_slot, present) -> dict[str, torch.Tensor]:
        """DESIGN 2.1: load balance (mean over adapted modalities present) and router z-loss.

        ``L_lb = mean_m E * sum_e f_{m,e} P_{m,e}`` with ``f = F / C`` and ``P = S / C``: ``F`` the dispatch
        sums (each of k choices counts 1/k), ``S`` the router-probability sums and ``C`` the routing units
        of modality m. ``L_z = Z / N``, ``Z`` the sum of ``logsumexp(z)^2`` over the ``N`` units.

        Data-parallel training (torch.distributed initialised, world size W > 1, a coefficient on): the
        statistics are those of the global batch, as one process would compute them. One all_reduce
        sums F, S, C and Z over the ranks (sums and counts, never means), so every rank returns the
        same, global value. Gradient: a rank differentiates only its own units' share, ``S_local`` and
        ``Z_local``, with the global F and C as constants, and scales it by W; DDP and FSDP average
        gradients over the ranks (sum / W), which then gives exactly the single-process gradient
        ``d L / d S = sum over ranks of d S_local``. Every rank must run the same adapters in the same
        order (data parallelism does), including a rank whose batch has no units for this adapter.
        """
        n_slots, n_experts, k = len(self.adapted), self.num_experts, self.top_k
        # Units not present count for nothing: their logits are replaced by zeros (no gradient reaches
        # them) and their rows add exact zeros to the sums.
        logits = torch.where(present[:, None], unit_logits.float(), 0.0)
        weight = present.to(logits.dtype)  # [U]
        slot = unit_slot.clamp_min(0)
        probs = torch.softmax(logits, dim=-1)  # [U, E]
        chosen = probs.topk(k, dim=-1).indices  # [U, k]
        share = torch.full_like(chosen, 1.0 / k, dtype=probs.dtype)  # each of k choices counts 1/k
        dispatch = torch.zeros_like(probs).scatter_add(1, chosen, share) * weight[:, None]
        count = probs.new_zeros(n_slots).index_add(0, slot, weight)  # [Ma]  C
        dispatched = probs.new_zeros(n_slots, n_experts).index_add(0, slot, dispatch)  # [Ma, E]  F
        prob_sum = torch.zeros_like(dispatched).index_add(0, slot, probs * weight[:, None])  # [Ma, E]  S
        z_sum = (torch.logsumexp(logits, dim=-1).pow(2) * weight).sum()  # Z, differentiable

        def load_balance_of(prob_sums):  # reads F and C when called: after the all_reduce, the global ones
            per_slot = n_experts * (dispatched * prob_sums).sum(-1) / count.clamp_min(1) ** 2  # E * sum_e f * P
            present = (count > 0).to(per_slot.dtype)  # (no boolean indexing: no host sync)
            return (per_slot * present).sum() / present.sum().clamp_min(1)

        world = self._data_parallel_world()
        if world == 1:
            return {"load_balance": load_balance_of(prob_sum), "z_loss": z_sum / count.sum().clamp_min(1)}
        import torch.distributed as dist

        stats = torch.cat([dispatched.detach().flatten(), prob_sum.detach().flatten(), count, z_sum.detach().view(1)])
        dist.all_reduce(stats)  # sums over the ranks
        n = n_slots * n_experts
        dispatched = stats[:n].view(n_slots, n_experts)
        count = stats[2 * n:2 * n + n_slots]
        global_load_balance = load_balance_of(stats[n:2 * n].view(n_slots, n_experts))
        n_units = count.sum().clamp_min(1)
        local_load_balance = world * load_balance_of(prob_sum)  # this rank's units, F and C global
        local_z = world * z_sum / n_units
        return {"load_balance": local_load_balance + (global_load_balance - local_load_balance).detach(),
                "z_loss": local_z + (stats[-1] / n_units - local_z).detach()}

    def _data_parallel_world(self) -> int:
        """W for :meth:`_regularizers`: the default group's size in a distributed run whose regularizers
        count (a coefficient > 0), else 1."""
        import torch.distributed as dist

        if not (self.load_balance_coef or self.z_loss_coef) or not dist.is_available() or not dist.is_initialized():
            return 1
        return dist.get_world_size()

    @torch.no_grad()
    def _update_dynamic_weights(self, norms, slot):
        """EMA of the per-modality mean update norm before s * w_m (``norms`` (N,), 0 for tokens
        without adapter), then w_m (DESIGN 2.1).

        Written without boolean indexing or host reads: a training step on CUDA does not synchronise
        in every adapted layer."""
        adapted = slot >= 0
        slot0 = slot.clamp_min(0)
        total = torch.zeros(len(self.adapted), device=norms.device).index_add(0, slot0, norms.float())
        count = torch.zeros_like(total).index_add(0, slot0, adapted.float())
        ema = self.update_norm_ema[self.adapted_ids]
        batch_mean = total / count.clamp_min(1)
        # only the modalities present in the batch move
        self.update_norm_ema[self.adapted_ids] = torch.where(count > 0, self.beta * ema + (1 - self.beta) * batch_mean,
                                                             ema)
        self.refresh_modality_weights()

    @torch.no_grad()
    def refresh_modality_weights(self):
        """``w_m = clip((cbar / c_m)^gamma, w_min, w_max)`` on the balance set; 1 while any c_m is 0."""
        if not self.balance:
            return
        ids = self.slot_of_modality.new_tensor(self.balance)
        c = self.update_norm_ema[ids]
        w = (c.mean() / c.clamp_min(1e-30)).pow(self.gamma).clamp(*self.weight_clip)
        self.modality_weight[ids] = torch.where((c > 0).all(), w, torch.ones_like(c))


class MoSELinear(nn.Module):
    """A frozen ``nn.Linear`` (``base_layer``) plus MoSE adapters (``mose_adapter[name]``).

    ``forward(x, modality=None)``: ``modality`` holds the ids of x's tokens (shape ``x.shape[:-1]``);
    inside a model prepared by ``apply_mosear`` / PEFT it comes from the model's modality context.
    Without adapter dropout (always in eval) the base layer's weight and bias are borrowed and base
    + update run as one ``mose_linear`` (``fuse_base``); otherwise the base layer runs, then the
    update is added by ``mose_lora``.
    """

    adapter_layer_names = ("mose_adapter",)
    # Base + update in one mose_linear call whenever the adapter reads x itself (no dropout now);
    # False (on the class or one layer) keeps the unfused path: base layer, then mose_lora(out=base).
    fuse_base: bool = True

    def __init__(self, base_layer: nn.Linear, adapter_name: str = "default", **adapter_kwargs):
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"base_layer: expected an nn.Linear, got {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.base_layer.requires_grad_(False)
        self.mose_adapter = nn.ModuleDict()
        self._active_adapter = adapter_name
        self._disable_adapters = False
        self.merged_adapters = []
        self._mosear_context = None
        if adapter_kwargs:
            self.add_adapter(adapter_name, **adapter_kwargs)

    def add_adapter(self, adapter_name: str, **adapter_kwargs):
        weight = self.base_layer.weight
        self.mose_adapter[adapter_name] = MoSEAdapter(
            self.base_layer.in_features, self.base_layer.out_features, dtype=weight.dtype,
            device=weight.device,
            **adapter_kwargs)

    def active_mose_adapter(self) -> MoSEAdapter | None:
        """The active adapter, or None when adapters are disabled or absent."""
        if self._disable_adapters:
            return None
        active = self._active_adapter
        names = [active] if isinstance(active, str) else list(active)
        names = [n for n in names if n in self.mose_adapter]
        if len(names) > 1:
            raise ValueError(f"active adapters: MoSE runs one adapter at a time, got {names}; call "
                             "set_adapter(<one name>)")
        return self.mose_adapter[names[0]] if names else None

    def forward(self, x: torch.Tensor, *args, modality: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        adapter = self.active_mose_adapter()
        if adapter is None:
            return self.base_layer(x, *args, **kwargs)
        forward_id = None
        if modality is None:
            modality = self._context_modality(x)
            # under torch.compile there is no Python rerun to detect (see ModalityContext.forward_count)
            forward_id = None if torch.compiler.is_compiling() else self._mosear_context.forward_count
        if not isinstance(modality, torch.Tensor) or tuple(modality.shape) != tuple(x.shape[:-1]):
            got = tuple(modality.shape) if isinstance(modality, torch.Tensor) else type(modality).__name__
            raise ValueError(f"modality: expected ids of shape {tuple(x.shape[:-1])} (x.shape[:-1]), got "
                             f"{got}")
        if forward_id is None:  # ids given directly; a model checks its ids once at entry instead
            check_modality_range(modality, adapter.num_modalities, name="modality")
        if x.dim() >= 3 and adapter.routing == "sequence":  # (B, T, d): the samples of the routing units
            n_samples = int(math.prod(x.shape[:-2]))
            sample = torch.arange(n_samples, device=x.device).repeat_interleave(x.shape[-2])
        else:
            n_samples, sample = 1, None
        tokens = (x.reshape(-1, x.shape[-1]), modality.reshape(-1).long(), sample, n_samples, forward_id)
        if self._fuses_base(adapter, x, args, kwargs):
            # borrowed, not copied: the base layer keeps owning (and saving) its weight and bias
            y = adapter(tokens[0], None, *tokens[1:], linear=(self.base_layer.weight, self.base_layer.bias))
            return y.view(*x.shape[:-1], y.shape[-1])
        base = self.base_layer(x, *args, **kwargs)
        y = adapter(tokens[0], base.reshape(-1, base.shape[-1]), *tokens[1:])
        return y.view(*base.shape[:-1], y.shape[-1]).to(base.dtype)

    def _fuses_base(self, adapter: MoSEAdapter, x: torch.Tensor, args, kwargs) -> bool:
        """Whether this call computes base + update in one ``mose_linear``: ``fuse_base`` is on, the
        adapter reads x itself (no dropout now), and the base layer is a plain ``nn.Linear`` call
        (no extra arguments, hooks or autocast) whose weight and bias have x's dtype."""
        base = self.base_layer
        if not self.fuse_base or adapter.reads_dropped_input or args or kwargs:
            return False
        if type(base).forward is not nn.Linear.forward or base._forward_hooks or base._forward_pre_hooks:
            return False
        if torch.is_autocast_enabled(x.device.type):
            return False
        return base.weight.dtype == x.dtype and (base.bias is None or base.bias.dtype == x.dtype)

    def _context_modality(self, x):
        context = self._mosear_context
        if context is None:
            raise ValueError("modality: MoSELinear needs the modality id of every token; pass modality=... "
                             "or prepare the model with apply_mosear / get_peft_model and call it with "
                             "modality_ids")
        return context.query_modality_for(tuple(x.shape[:-1]))

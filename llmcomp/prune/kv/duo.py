"""DuoAttention: retrieval heads keep the full cache, streaming heads only sinks + a recent window.

Which KV heads are retrieval heads is calibrated (``calibrate``): every KV head gets a gate α ∈ [0, 1]
mixing full attention and streaming attention (``α·full + (1-α)·streaming``); the gates are optimized
on synthetic passkey-retrieval sequences built from the calibration text to keep the final hidden
states of the answer tokens equal to the full model's (mean squared error) while an L1 penalty pushes
gates to zero. The ``(1 - streaming)`` fraction of heads with the largest gates become retrieval
heads; the resulting per-layer head mask is stored in the config (``heads``, one 0/1 string per
layer) and so in the artifact's manifest.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from llmcomp.core.config import register_config
from llmcomp.core.progress import NULL
from llmcomp.errors import UserError
from llmcomp.prune.kv.attention import eager_attention
from llmcomp.prune.kv.base import KV_METHODS, KVPolicy, check_ratio, check_tokens
from llmcomp.prune.kv.cache import PolicyLayer, attention, attention_modules, check_supported, tensor_bytes

CALIB_IMPL = "llmcomp_duo_calibration"


class DuoLayer(PolicyLayer):
    def __init__(self, layer_idx, runtime, retrieval: list[bool], sinks: int, window: int):
        super().__init__(layer_idx, runtime)
        self.retrieval, self.sinks, self.window = retrieval, sinks, window
        self.ret = [i for i, r in enumerate(retrieval) if r]
        self.stream = [i for i, r in enumerate(retrieval) if not r]
        self.clear()

    def clear(self):
        self.kr = self.vr = None  # retrieval heads, every token [B, n_ret, T, D]
        self.ks = self.vs = None  # streaming heads, sinks + window [B, n_stream, P, D]
        self.spos = None  # int32 [P]: positions the streaming heads hold

    def nbytes(self) -> int:
        return tensor_bytes(self.kr, self.vr, self.ks, self.vs, self.spos)

    def past(self):  # only used when every head is a retrieval head
        return self.kr, self.vr, None

    @staticmethod
    def _query_heads(kv_heads: list[int], n_rep: int, device) -> torch.Tensor:
        return torch.tensor([h * n_rep + g for h in kv_heads for g in range(n_rep)], device=device)

    def compute(self, module, q, k_new, v_new, mask, scaling):
        if not self.stream:
            return super().compute(module, q, k_new, v_new, mask, scaling)
        n_rep = q.shape[1] // k_new.shape[1]
        out = q.new_empty(q.shape[0], q.shape[2], q.shape[1], q.shape[3])  # [B, Q, H, D]
        groups = [(self.ret, self.kr, self.vr, None), (self.stream, self.ks, self.vs, self.spos)]
        for heads, k_past, v_past, pos in groups:
            if not heads:
                continue
            qi = self._query_heads(heads, n_rep, q.device)
            ki = torch.tensor(heads, device=q.device)
            k, v = k_new[:, ki], v_new[:, ki]
            held = 0 if k_past is None else k_past.shape[-2]
            if held:
                k, v = torch.cat([k_past, k], dim=-2), torch.cat([v_past, v], dim=-2)
            sub_mask = self.held_mask(mask, held, pos, n_rep, q.shape[2], q.device)
            if pos is not None and held and self.lead is not None:  # the union of the rows' sinks is held:
                mine = self._own(pos, self.seen)  # each row sees only its own sinks and the window
                extra = torch.ones(mine.shape[0], q.shape[2], dtype=torch.bool, device=q.device)
                sub_mask = sub_mask & torch.cat([mine, extra], dim=-1)[:, None, None, :]
            out[:, :, qi] = attention(module, q[:, qi], k, v, sub_mask, scaling)[0]
        self.append(k_new, v_new, None)
        return out

    def append(self, k, v, probs):
        q = k.shape[-2]
        ki = torch.tensor(self.ret, device=k.device)
        if self.ret:
            kr, vr = k[:, ki], v[:, ki]
            self.kr = kr if self.kr is None else torch.cat([self.kr, kr], dim=-2)
            self.vr = vr if self.vr is None else torch.cat([self.vr, vr], dim=-2)
        if not self.stream:
            return
        si = torch.tensor(self.stream, device=k.device)
        pos = torch.arange(self.seen, self.seen + q, device=k.device, dtype=torch.int32)
        ks, vs = k[:, si], v[:, si]
        if self.ks is not None:
            ks, vs, pos = torch.cat([self.ks, ks], -2), torch.cat([self.vs, vs], -2), torch.cat([self.spos, pos])
        own = self._own(pos, self.seen + q)
        keep = (own.any(0) if own.dim() == 2 else own).nonzero().squeeze(-1)  # (rows: the union of their sinks)
        self.ks, self.vs, self.spos = ks[:, :, keep], vs[:, :, keep], pos[keep]

    def _own(self, pos: torch.Tensor, seen: int) -> torch.Tensor:
        """bool [P] (or [B, P] in a left-padded batch): what a streaming head keeps of the tokens at ``pos``
        after ``seen`` tokens — each row's first ``sinks`` real tokens and the ``window`` most recent."""
        real = self.real_positions(pos)
        return ((real >= 0) & (real < self.sinks)) | (pos >= seen - self.window)


def _streaming_mask(n: int, sinks: int, window: int, device) -> torch.Tensor:
    """bool [n, n]: causal, and a key is a sink, the query's own token or one of the ``window`` before it — what a
    streaming head sees at a decode step (its held window, then the new token). (``i - j < window`` trained the
    gates on one token less than inference gives.)"""
    i = torch.arange(n, device=device)[:, None]
    j = torch.arange(n, device=device)[None, :]
    return (j <= i) & ((j < sinks) | (i - j <= window))


def _gated_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Calibration attention: α·full + (1-α)·streaming per KV head (gates on ``module._duo_gate``)."""
    n = query.shape[2]
    scaling = module.scaling if scaling is None else scaling
    gate = module._duo_gate.clamp(0, 1).repeat_interleave(query.shape[1] // key.shape[1])[None, :, None, None]
    causal = torch.ones(n, n, dtype=torch.bool, device=query.device).tril()
    full, _ = eager_attention(query, key, value, causal, scaling)
    stream, _ = eager_attention(query, key, value, _streaming_mask(n, *module._duo_window, query.device), scaling)
    out = gate * full + (1 - gate) * stream
    return out.transpose(1, 2).contiguous(), None


def calibrate_gates(model, tokenizer, cfg: "DuoConfig", progress=NULL, device=None) -> torch.Tensor:
    """Optimize per-KV-head gates [layers, Hkv] on passkey sequences; returns them (float, in [0, 1])."""
    from transformers.modeling_utils import AttentionInterface

    from llmcomp.core.passkey import passkey_sequences

    mods = check_supported(model)
    device = torch.device(device or next(model.parameters()).device)
    model.to(device)  # the whole model runs forward + backward here (prune_kv moves it back to the CPU)
    AttentionInterface.register(CALIB_IMPL, _gated_attention)
    n_kv = model.config.num_key_value_heads
    gates = torch.ones(len(mods), n_kv, device=device, requires_grad=True)
    previous, was_training = model.config._attn_implementation, model.training
    params = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    for i, m in enumerate(mods):
        m._duo_gate, m._duo_window = gates[i], (cfg.sinks, cfg.window)
    samples = passkey_sequences(tokenizer, cfg.calib_seq_len, cfg.calib_steps, seed=cfg.seed, split="calib",
                                hint="the calibration length (--seq-len, DuoConfig.calib_seq_len)")
    opt = torch.optim.Adam([gates], lr=cfg.lr)
    base = model.base_model
    try:
        if hasattr(model, "activation_checkpointing_enable"):  # the newer transformers name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()  # checkpointing is active in training mode only (these models have no dropout)
        for ids, _answer in progress.track(samples, "Calibrating DuoAttention gates"):
            ids = ids[None].to(device)
            model.set_attn_implementation("eager")
            with torch.no_grad():
                target = base(input_ids=ids, use_cache=False).last_hidden_state[:, -cfg.tail:]
            model.set_attn_implementation(CALIB_IMPL)
            hidden = base(input_ids=ids, use_cache=False).last_hidden_state[:, -cfg.tail:]
            loss = (hidden - target).pow(2).mean() + cfg.l1 * gates.clamp(0, 1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            with torch.no_grad():
                gates.clamp_(0, 1)
    finally:
        (getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable)()
        model.train(was_training)
        model.set_attn_implementation(previous)
        for p, r in zip(model.parameters(), params):
            p.requires_grad_(r)
        for m in mods:
            del m._duo_gate, m._duo_window
    return gates.detach().cpu()


def select_heads(gates: torch.Tensor, streaming: float) -> tuple[str, ...]:
    """The ``round((1-streaming)·n)`` heads with the largest gates are retrieval heads ('1')."""
    flat = gates.flatten()
    n_ret = round((1 - streaming) * flat.numel())
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[flat.argsort(descending=True, stable=True)[:n_ret]] = True
    return tuple("".join("1" if x else "0" for x in row) for row in keep.view_as(gates).tolist())


@KV_METHODS.register("duo")
@register_config
@dataclass(frozen=True)
class DuoConfig(KVPolicy):
    """Retrieval heads (full cache) vs streaming heads (``sinks`` + ``window`` tokens).

    ``streaming``: fraction of KV heads made streaming heads. ``heads``: the calibrated mask, one
    string of '1' (retrieval) / '0' (streaming) per layer; empty until calibrated. The remaining fields
    are the calibration recipe (recorded for reproducibility)."""

    streaming: float = 0.5
    sinks: int = 16
    window: int = 64
    heads: tuple = ()
    calib_steps: int = 16
    calib_seq_len: int = 768
    tail: int = 32
    lr: float = 0.05
    l1: float = 0.05
    seed: int = 0

    method = "duo"
    needs_calibration = True
    VERSION = 1

    def __post_init__(self):
        check_ratio("streaming", self.streaming)
        check_tokens("sinks", self.sinks)
        check_tokens("window", self.window, 1)
        check_tokens("calib_steps", self.calib_steps, 0)
        if not self.heads and self.streaming > 0 and self.calib_steps == 0:  # (every gate 1: the first heads)
            raise UserError("calib_steps 0 with no heads given would split duo's heads arbitrarily; calibrate "
                            "(≥ 1 step) or give the split (DuoConfig(heads=...)).")  # (field first: the CLI's flag)
        check_tokens("calib_seq_len", self.calib_seq_len, 64)
        object.__setattr__(self, "heads", tuple(str(h) for h in self.heads))
        if any(set(h) - {"0", "1"} for h in self.heads):
            raise UserError("duo heads must be strings of 0/1, one per layer.")

    @property
    def calibrated_on_text(self) -> bool:
        return not self.heads and self.streaming > 0 and self.calib_steps > 0

    def windows(self):
        return {"streaming window": self.sinks + self.window}

    def calibration_lengths(self):
        return {"calibration length": self.calib_seq_len} if self.calibrated_on_text else {}

    def check_model(self, model) -> None:
        n_layers, n_kv = len(attention_modules(model)), model.config.num_key_value_heads
        if self.heads and (len(self.heads) != n_layers or any(len(h) != n_kv for h in self.heads)):
            raise UserError(f"duo heads give {len(self.heads)} layers of {sorted({len(h) for h in self.heads})} "
                            f"heads; the model has {n_layers} layers of {n_kv} KV heads.")

    def calibrate(self, model, tokenizer, progress=NULL, device=None):
        n_layers, n_kv = len(attention_modules(model)), model.config.num_key_value_heads
        if self.heads:
            self.check_model(model)
            return self, {}
        if not self.calibrated_on_text:
            gates = torch.ones(n_layers, n_kv)
        else:
            gates = calibrate_gates(model, tokenizer, self, progress, device)
        return replace(self, heads=select_heads(gates, self.streaming)), {"gates": [[round(g, 4) for g in row]
                                                                                     for row in gates.tolist()]}

    def make_layer(self, layer_idx, runtime):
        if not self.heads:
            raise UserError("This DuoAttention policy is not calibrated (no head mask); run llmcomp prune kv.")
        return DuoLayer(layer_idx, runtime, [c == "1" for c in self.heads[layer_idx]], self.sinks, self.window)

    def describe(self) -> str:
        return f"duo {self.streaming:g} streaming heads, sinks {self.sinks} window {self.window}"

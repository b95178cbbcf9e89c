"""MoEfication: split a dense Llama-style model's MLPs into routed experts (a real MoE with trained weights).

For every decoder layer, through the shared calibration driver (so each router is calibrated on inputs
that already carry the earlier layers' MoE error):

1. Capture the MLP's inputs X [T, H] on the calibration text; neuron activations h = act(gate·x)·(up·x).
2. Optionally move the ``shared`` most important neurons (mean h² · ‖down column‖²) into an always-on
   shared expert (the target is then Qwen2-MoE; without one it is Mixtral — both have Llama's attention).
3. Cluster the other neurons into ``experts`` equal-size groups by balanced k-means on their activation
   patterns |h| over the calibration tokens (neurons that fire together share an expert).
4. Router: ridge least squares from x to each expert's output norm ‖down_e·h_e‖ on the calibration
   tokens; top-k of the prediction picks the experts. Its logits are scaled to a small spread so the
   renormalized top-k softmax weights are ≈ 1/k, and each expert's down_proj is multiplied by k:
   the block then computes (shared +) Σ over the chosen experts of their exact dense partial sums.
5. Replace the layer's MLP by the MoE block; the driver pushes its output on to the next layer.
Nothing is trained by gradient descent; the result is a stock transformers MoE model.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from llmcomp.core.calib import calibrate_layerwise
from llmcomp.core.config import register_config
from llmcomp.core.hfcompat import fit_experts
from llmcomp.core.model import decoder_layers
from llmcomp.core.progress import NULL, Progress
from llmcomp.errors import UserError

SOURCE_TYPES = ("llama", "mistral")


@register_config
@dataclass(frozen=True)
class MoefyConfig:
    """Split each MLP into ``experts`` routed experts (``top_k`` per token) plus ``shared`` always-on neurons.

    The defaults are ``llmcomp convert moefy``'s (one set, checked by a test): 8 experts, top-2 and 512
    shared neurons, the README's measured test bed (bundled model: ppl 59.69; without the shared expert,
    a quarter of each MLP active, 2130)."""

    experts: int = 8
    top_k: int = 2
    shared: int = 512
    kmeans_iters: int = 15
    ridge: float = 1e-3
    router_spread: float = 0.01
    seed: int = 0

    VERSION = 1

    def __post_init__(self):
        if self.experts < 2:
            raise UserError(f"--experts must be at least 2, got {self.experts}.")
        if not 1 <= self.top_k <= self.experts:
            raise UserError(f"--top-k must be between 1 and --experts ({self.experts}), got {self.top_k}.")
        if self.shared < 0:
            raise UserError(f"--shared must be ≥ 0 neurons, got {self.shared}.")
        if self.kmeans_iters < 1 or self.ridge <= 0 or not 0 < self.router_spread <= 1:
            raise UserError("kmeans_iters must be ≥ 1, ridge > 0 and router_spread in (0, 1].")

    @property
    def family(self) -> str:
        return "qwen2_moe" if self.shared else "mixtral"


def balanced_kmeans(v: torch.Tensor, k: int, iters: int, seed: int = 0) -> torch.Tensor:
    """Cluster the rows of ``v`` [N, D] (cosine similarity) into ``k`` groups of exactly N/k rows.

    Each round assigns (row, centroid) pairs greedily in order of similarity, a centroid taking rows
    until it is full; centroids are then the normalized means. Returns the group of each row [N]."""
    n = v.shape[0]
    cap = n // k
    assert cap * k == n, (n, k)
    v = F.normalize(v.float(), dim=1)
    gen = torch.Generator().manual_seed(seed)
    centroids = v[torch.randperm(n, generator=gen)[:k]].clone()
    assign = torch.zeros(n, dtype=torch.long)
    for _ in range(iters):
        sim = v @ centroids.T  # (N, k)
        order = torch.argsort(sim.flatten(), descending=True).tolist()
        owner, fill, left = [-1] * n, [0] * k, n
        for flat in order:  # plain Python lists: this loop is the hot spot
            row, c = divmod(flat, k)
            if owner[row] >= 0 or fill[c] == cap:
                continue
            owner[row] = c
            fill[c] += 1
            left -= 1
            if left == 0:
                break
        new_assign = torch.tensor(owner)
        if torch.equal(new_assign, assign):
            break
        assign = new_assign
        centroids = F.normalize(F.one_hot(assign, k).T.float() @ v, dim=1)
    return assign


def fit_router(x: torch.Tensor, target: torch.Tensor, ridge: float) -> torch.Tensor:
    """Ridge least squares ``W`` [E, H] with x Wᵀ ≈ target; ``ridge`` is relative to mean diag(XᵀX)."""
    x = x.double()
    gram = x.T @ x
    gram.diagonal().add_(ridge * float(gram.diagonal().mean()))
    return torch.linalg.solve(gram, x.T @ target.double()).T.float()


def target_config(src, cfg: MoefyConfig):
    """The MoE config with the dense model's attention, norms and embeddings."""
    if src.model_type not in SOURCE_TYPES:
        raise UserError(f"moefy converts Llama/Mistral-style dense models; {src.model_type!r} is not supported.")
    if getattr(src, "attention_bias", False) or getattr(src, "mlp_bias", False):
        raise UserError("moefy needs a model without attention/MLP biases.")
    inter = src.intermediate_size
    routed = inter - cfg.shared
    if routed <= 0:
        raise UserError(f"--shared {cfg.shared} leaves no neurons to route: the MLP has {inter}; use a smaller "
                        "--shared (0: no shared expert, a Mixtral).")
    if routed % cfg.experts:
        raise UserError(f"The MLP has {inter} neurons; {inter} − {cfg.shared} shared must split evenly into "
                        f"{cfg.experts} experts.")
    head_dim = getattr(src, "head_dim", None) or src.hidden_size // src.num_attention_heads
    common = dict(vocab_size=src.vocab_size, hidden_size=src.hidden_size, num_hidden_layers=src.num_hidden_layers,
                  num_attention_heads=src.num_attention_heads, num_key_value_heads=src.num_key_value_heads,
                  hidden_act=src.hidden_act, max_position_embeddings=src.max_position_embeddings,
                  initializer_range=src.initializer_range, rms_norm_eps=src.rms_norm_eps,
                  tie_word_embeddings=src.tie_word_embeddings, rope_parameters=dict(src.rope_parameters),
                  bos_token_id=src.bos_token_id, eos_token_id=src.eos_token_id, pad_token_id=src.pad_token_id,
                  num_experts_per_tok=cfg.top_k, attention_dropout=getattr(src, "attention_dropout", 0.0))
    if cfg.family == "mixtral":
        from transformers import MixtralConfig

        return MixtralConfig(**common, head_dim=head_dim, intermediate_size=routed // cfg.experts,
                             num_local_experts=cfg.experts, sliding_window=getattr(src, "sliding_window", None))
    from transformers import Qwen2MoeConfig

    if head_dim != src.hidden_size // src.num_attention_heads:
        raise UserError("Qwen2-MoE derives head_dim from hidden_size / heads, which this model does not.")
    window = getattr(src, "sliding_window", None)  # (Mistral: every layer; Qwen2: the layers its types say)
    types = getattr(src, "layer_types", None) or ["sliding_attention"] * src.num_hidden_layers
    sliding = {"use_sliding_window": True, "sliding_window": window, "layer_types": list(types)} if window else {
        "use_sliding_window": False}
    return Qwen2MoeConfig(**common, intermediate_size=inter, moe_intermediate_size=routed // cfg.experts,
                          shared_expert_intermediate_size=cfg.shared, num_experts=cfg.experts, norm_topk_prob=True,
                          qkv_bias=False, decoder_sparse_step=1, mlp_only_layers=[], **sliding)


@torch.no_grad()
def moefy_mlp(mlp: nn.Module, x: torch.Tensor, block: nn.Module, cfg: MoefyConfig, seed: int) -> dict:
    """Fill the MoE ``block`` from the dense ``mlp`` and its calibration inputs x [T, H]; returns metrics."""
    W_gate, W_up, W_down = (m.weight.float() for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))
    x = x.float()
    h = mlp.act_fn(x @ W_gate.T) * (x @ W_up.T)  # (T, I)
    importance = h.pow(2).mean(0) * W_down.pow(2).sum(0)
    order = torch.argsort(importance, descending=True)
    shared, routed = order[: cfg.shared], order[cfg.shared:]
    every = max(1, h.shape[0] // 4096)  # activation patterns over ≤ 4096 tokens are enough to cluster
    groups_of = balanced_kmeans(h[::every, routed].abs().T, cfg.experts, cfg.kmeans_iters, seed)
    groups = [routed[groups_of == e].sort().values for e in range(cfg.experts)]
    norms = torch.stack([(h[:, g] @ W_down[:, g].T).norm(dim=-1) for g in groups], 1)  # (T, E)
    router = fit_router(x, norms, cfg.ridge)
    logits = x @ router.T
    scale = cfg.router_spread / float(logits.std().clamp(min=1e-12))
    k = cfg.top_k
    dt = block.gate.weight.dtype
    block.gate.weight.copy_((router * scale).to(dt))
    block.experts.gate_up_proj.copy_(torch.stack([torch.cat([W_gate[g], W_up[g]]) for g in groups]).to(dt))
    block.experts.down_proj.copy_(torch.stack([W_down[:, g] * k for g in groups]).to(dt))
    if cfg.shared:
        block.shared_expert.gate_proj.weight.copy_(W_gate[shared].to(dt))
        block.shared_expert.up_proj.weight.copy_(W_up[shared].to(dt))
        block.shared_expert.down_proj.weight.copy_((W_down[:, shared] * 2).to(dt))  # sigmoid(0) = 1/2
        block.shared_expert_gate.weight.zero_()
    # How well the calibrated router picks the experts an oracle (largest output norm) would pick.
    chosen = logits.topk(k, dim=1).indices
    oracle = norms.topk(k, dim=1).indices
    hits = (chosen[:, :, None] == oracle[:, None, :]).any(-1).float().mean()
    y = h @ W_down.T
    # the block as it runs (its router's softmax weights, down × k): a sum of the chosen experts at weight 1 read
    # 0.0 % at top-k = every expert while the model's MLPs, and its perplexity, had moved
    out = block(x[None].to(dt))
    y_moe = (out[0] if isinstance(out, tuple) else out)[0].float()
    rel = float((y_moe - y).pow(2).sum() / y.pow(2).sum().clamp(min=1e-30))
    return {"router_oracle_agreement": round(float(hits), 4), "mlp_rel_error": round(rel, 5)}


def moefy_model(model: nn.Module, calib_ids: torch.Tensor, cfg: MoefyConfig, device=None,
                progress: Progress = NULL) -> tuple[nn.Module, dict]:
    """Convert ``model`` (dense, modified in place and consumed) into a stock MoE model. Returns
    ``(moe_model, {layer path: metrics})``."""
    from transformers import AutoModelForCausalLM

    moe_cfg = target_config(model.config, cfg)
    target = AutoModelForCausalLM.from_config(moe_cfg, dtype=next(model.parameters()).dtype)
    fit_experts(target)
    _, target_layers = decoder_layers(target)
    block_cls = type(target_layers[0].mlp)
    moe_cfg = target.config  # carries the experts implementation chosen at init
    report: dict = {}

    def handler(path, layer, runner):
        seen: list[torch.Tensor] = []
        runner.run({layer.mlp: lambda mod, inputs, out: seen.append(inputs[0].reshape(-1, inputs[0].shape[-1]))})
        x = torch.cat(seen)
        block = block_cls(moe_cfg).to(device=x.device, dtype=layer.mlp.down_proj.weight.dtype)
        report[path] = moefy_mlp(layer.mlp, x, block, cfg, cfg.seed + len(report))
        layer.mlp = block

    calibrate_layerwise(model, calib_ids, handler, device=device, progress=progress)
    target.load_state_dict(model.state_dict(), strict=True)
    target.tie_weights()
    target.eval()
    if getattr(model, "generation_config", None) is not None:
        target.generation_config = model.generation_config
    errors = [r["mlp_rel_error"] for r in report.values()]
    report["_summary"] = {"family": cfg.family, "mean_mlp_rel_error": round(sum(errors) / len(errors), 5),
                          "active_mlp_fraction": round((cfg.shared + (moe_cfg.num_experts_per_tok *
                                                        _width(moe_cfg))) / model.config.intermediate_size, 4)}
    return target, report


def _width(moe_cfg) -> int:
    return getattr(moe_cfg, "moe_intermediate_size", None) or moe_cfg.intermediate_size

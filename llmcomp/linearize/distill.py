"""Distil softmax attention into linear attention (LoLCATs-style two stages), with a hybrid layout.

Stage 1 — attention transfer: the calibration driver walks the decoder with the *teacher* in place;
for each layer a hook captures the attention's inputs and outputs, a student (``student.py``) is built
on the same projections and its new parameters (feature maps, gates, mixing weights; q/k/v/o frozen)
are trained to minimise the MSE to the teacher's attention output. Each layer's relative transfer error
``MSE / mean(y²)`` is measured on the captured data; as every layer sees teacher inputs, the errors
are comparable, and ``keep_softmax`` keeps the worst-transferring fraction of layers as softmax.

Stage 2 — end-to-end fine-tune: LoRA on the students' q/k/v/o (plus the students' own parameters),
loss KL(teacher ‖ student) over every position of windows of the bundled calibration text. The teacher
is the same model with the students switched to their original softmax path and LoRA off, so no
second copy is held. ``tokens`` sets the budget; past the end of the text the windows cycle (with a
note). LoRA is merged into the projections at the end.

Resume: stage 1's students, each as its layer is done, and, every ``checkpoint_every`` steps, stage 2's
trainable tensors and AdamW state are written (temp name + rename) into the output's resume directory
(``core/resume.py``); the same command continues from the last checkpoint and, the data order and
learning-rate schedule being functions of the step, ends with the same weights as an uninterrupted run. The
directory is keyed by what stage 1 reads (``transfer_settings``), so a rerun that changes only the fine-tune or the
choice of softmax layers (``AFTER_TRANSFER``) keeps the finished transfer; stage 2's checkpoint carries the whole
config as its own key and is dropped then.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from llmcomp.core import memory, resume
from llmcomp.core.calib import calibrate_layerwise, equal_batch
from llmcomp.core.config import register_config, to_dict
from llmcomp.core.model import decoder_layers
from llmcomp.core.progress import NULL, Progress
from llmcomp.errors import UserError
from llmcomp.linearize.lora import PROJECTIONS, add_lora, merge_lora
from llmcomp.linearize.student import (METHODS, LinearAttention, StudentSpec, attention_of, install, students_of,
                                       teacher_mode)

KIND = "linearize"


@register_config
@dataclass(frozen=True)
class LinearizeConfig:
    VERSION = 1
    method: str = "hedgehog"  # hedgehog | liger | gla | mamba
    window: int = 64  # sliding-window softmax tokens inside each linear layer (0 = pure linear)
    keep_softmax: float = 0.0  # fraction of layers kept as softmax (worst transfer error first)
    keep_layers: Optional[tuple] = None  # explicit softmax layer indices (instead of keep_softmax)
    feature_dim: int = 0  # hedgehog features per sign (0 = head dim)
    transfer_steps: int = 100  # stage 1 optimizer steps per layer
    transfer_lr: float = 1e-2
    tokens: int = 1_000_000  # stage 2 token budget (0 = attention transfer only)
    seq_len: int = 512  # stage 2 window length
    batch_size: int = 8  # stage 2 windows per step
    lr: float = 1e-3  # stage 2 peak learning rate (cosine to 10 %)
    lora_rank: int = 8
    lora_alpha: float = 16.0
    checkpoint_every: int = 50  # stage 2 steps between checkpoints
    seed: int = 0

    def __post_init__(self):
        if self.method not in METHODS:
            raise UserError(f"Unknown linearize method {self.method!r}; choose one of: {', '.join(METHODS)}.")
        if not 0.0 <= self.keep_softmax <= 1.0 or math.isnan(self.keep_softmax):
            raise UserError(f"--keep-softmax must be a fraction in [0, 1] (got {self.keep_softmax}).")
        if self.keep_layers is not None and any((not isinstance(i, int)) or i < 0 for i in self.keep_layers):
            raise UserError("--keep-layers must be non-negative layer indices, e.g. 0,5.")
        if self.keep_layers is not None and self.keep_softmax:  # (it was ignored, yet recorded in the manifest)
            raise UserError("--keep-layers names the softmax layers itself; drop --keep-softmax.")
        if self.window < 0:
            raise UserError(f"--window must be ≥ 0 (got {self.window}; 0 = pure linear attention).")
        if self.tokens < 0 or self.transfer_steps < 0:
            raise UserError("--tokens and --transfer-steps must be ≥ 0.")
        for name, value, low in (("--seq-len", self.seq_len, 2), ("--batch-size", self.batch_size, 1),
                                 ("--lora-rank", self.lora_rank, 1), ("--checkpoint-every", self.checkpoint_every, 1)):
            if value < low:  # (one message listed all four, not the one at fault)
                raise UserError(f"{name} must be ≥ {low}, got {value}.")
        if not (0 < self.lr < math.inf and 0 < self.transfer_lr < math.inf):
            raise UserError(f"Learning rates must be positive and finite (got --lr {self.lr}, transfer "
                            f"{self.transfer_lr}).")
        if not isinstance(self.feature_dim, int) or self.feature_dim < 0:
            raise UserError(f"The feature dimension must be ≥ 0 (0 = the head dimension), got {self.feature_dim}.")
        if not self.lora_alpha > 0:
            raise UserError(f"The LoRA alpha must be positive, got {self.lora_alpha}.")

    def spec(self) -> StudentSpec:
        return dataclasses.replace(METHODS[self.method], window=self.window, feature_dim=self.feature_dim)


def check_model(model: nn.Module, stages: list[dict]) -> None:
    """A model linearize can convert: supported attention classes, plain linear projections, not linearized."""
    from llmcomp.linearize.student import check_supported

    if any(s.get("kind") == KIND for s in stages):
        raise UserError("This artifact is already linearized; linearize the original model.")
    if any(s.get("kind") == "kv" for s in stages):  # (its policy cannot run on linear attention)
        raise UserError("This artifact has a KV-cache policy, which linear attention cannot use; linearize the model "
                        "without it.")
    check_supported(model)
    _, layers = decoder_layers(model)
    for i, layer in enumerate(layers):
        for name in PROJECTIONS:
            if type(getattr(attention_of(layer), name)) is not nn.Linear:
                raise UserError(f"Layer {i} attention {name} is not a plain linear (quantized?); linearize before "
                                "quantizing.")


def _trainable(student: LinearAttention) -> dict[str, nn.Parameter]:
    """The student's own parameters (not the shared projections or their LoRA)."""
    return {n: p for n, p in student.named_parameters() if n.split(".")[0] not in PROJECTIONS}


# The settings stage 1 does not read: the fine-tune's, and the choice of the softmax layers, made from the errors of
# a transfer that covers every layer. (``batch_size`` is not one: the transfer trains on the captured batches.)
AFTER_TRANSFER = ("keep_softmax", "keep_layers", "tokens", "seq_len", "lr", "lora_rank", "lora_alpha")
SAVE_ONLY = ("checkpoint_every",)  # how often the work is saved: not what the job computes
FINETUNE_FILE = "finetune.safetensors"
TRANSFER_TIME = "elapsed-transfer.json"  # the job's seconds at its last finished transfer layer (``rewind_time``)


def _settings(config: LinearizeConfig, leave_out: tuple) -> dict:
    return {k: v for k, v in to_dict(config).items() if k not in leave_out}


def transfer_settings(config: LinearizeConfig) -> dict:
    """The config as stage 1 reads it: part of the resume directory's key (``api.linearize``)."""
    return _settings(config, AFTER_TRANSFER + SAVE_ONLY)


def _finetune_key(config: LinearizeConfig) -> str:
    """The key stage 2's checkpoint carries: every setting but how often it is saved (its directory's key leaves
    the fine-tune's out)."""
    return json.dumps(_settings(config, SAVE_ONLY), sort_keys=True)


_ON_CPU = "linearize with --device cpu"  # (what a CUDA out-of-memory error suggests, after the flags to lower)
FINETUNE_REMEDY = "lower --batch-size or --seq-len"  # (the fine-tune's out-of-memory error and its memory check)


# -- stage 1: attention transfer ---------------------------------------------------------------------

def transfer(model: nn.Module, ids: torch.Tensor, config: LinearizeConfig, device, progress: Progress = NULL,
             checkpoint: Optional[resume.Checkpoint] = None) -> tuple[dict[int, LinearAttention], dict[int, float]]:
    """Build and train one student per decoder layer against the teacher; (students, relative errors). With a
    ``checkpoint``, each layer's student is saved as it is done and a saved one is read instead of trained (the
    teacher's layers are not changed here, so the next layer's inputs are the same either way)."""
    spec = config.spec()
    students: dict[int, LinearAttention] = {}
    errors: dict[int, float] = {}

    def handler(path: str, layer: nn.Module, runner) -> None:
        idx = int(path.rsplit(".", 1)[1])
        attn = attention_of(layer)
        saved = _transfer_file(checkpoint, idx)
        if saved is not None and saved.exists():
            students[idx] = _student(attn, spec, config.seed + idx)
            errors[idx] = _load_student(saved, students[idx])
            return
        seen = []

        def capture(mod, args, kwargs, out):
            x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            seen.append((x, kwargs["position_embeddings"], out[0]))

        handle = attn.register_forward_hook(capture, with_kwargs=True)
        try:
            runner.run(keep_outputs=False)  # (its outputs were a fourth copy of every window's hidden states)
        finally:
            handle.remove()
        student = _student(attn, spec, config.seed + idx)
        params = list(_trainable(student).values())
        if params and config.transfer_steps:
            opt = torch.optim.Adam(params, lr=config.transfer_lr)
            with torch.enable_grad():
                for step in range(config.transfer_steps):
                    x, pe, y = seen[step % len(seen)]
                    loss = F.mse_loss(student(x, position_embeddings=pe)[0].float(), y.float())
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
        with torch.no_grad():
            mse = sum(F.mse_loss(student(x, position_embeddings=pe)[0].float(), y.float()).item() for x, pe, y in seen)
            power = sum(y.float().pow(2).mean().item() for _, _, y in seen)
        errors[idx] = mse / max(power, 1e-30)
        students[idx] = student
        if saved is not None:
            resume.save_state({n: p.detach().cpu().contiguous() for n, p in _trainable(student).items()}, saved,
                              {"error": json.dumps(errors[idx])})
            checkpoint.mark_time()
            checkpoint.mark_time(TRANSFER_TIME)
            resume._kill_point(f"linearize-transfer-{idx}")

    model.requires_grad_(False)
    # (the layer's inputs, and the attention's inputs and outputs ``seen`` holds: the driver's check counted 2)
    calibrate_layerwise(model, ids, handler, batch_size=config.batch_size, device=device, progress=progress,
                        copies=3, remedy=f"lower --calib-samples or --batch-size, or {_ON_CPU}")
    home = next(model.parameters()).device
    for s in students.values():
        s.to(home)
    return students, errors


def choose_softmax_layers(errors: dict[int, float], n_layers: int, config: LinearizeConfig) -> list[int]:
    """Explicit ``keep_layers``, else the ``keep_softmax · n`` layers (rounded half up, at least one for a fraction
    above 0) with the largest transfer error."""
    if config.keep_layers is not None:
        bad = [i for i in config.keep_layers if i >= n_layers]
        if bad:
            raise UserError(f"--keep-layers {bad[0]} is out of range: the model has {n_layers} layers "
                            f"(0-{n_layers - 1}).")
        return sorted(set(config.keep_layers))
    k = math.floor(config.keep_softmax * n_layers + 0.5)  # (round() halves to even: 0.25 of 2 layers kept none)
    k = max(k, 1 if config.keep_softmax > 0 else 0)
    return sorted(sorted(errors, key=lambda i: -errors[i])[:k])


# -- stage 2: end-to-end fine-tune -------------------------------------------------------------------

def _kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(teacher ‖ student)."""
    t = teacher_logits.float().log_softmax(-1)
    s = student_logits.float().log_softmax(-1)
    return (t.exp() * (t - s)).sum(-1).mean()


def finetune_steps(config: LinearizeConfig) -> int:
    """Stage 2's optimizer steps: the ``tokens`` budget in whole steps of ``batch_size × seq_len`` tokens, rounded
    down, at least one."""
    return max(1, config.tokens // (config.batch_size * config.seq_len))


def note_budget(config: LinearizeConfig, note) -> None:
    """Say where whole steps make the fine-tune's tokens another number than ``--tokens``: 1000 ran as 960, without
    a word (the stage's ``metrics.finetune.tokens`` records what ran)."""
    per_step = config.batch_size * config.seq_len
    used = finetune_steps(config) * per_step
    if config.tokens and used != config.tokens:
        note(f"--tokens {config.tokens} runs as {used}: the fine-tune takes whole steps of --batch-size "
             f"{config.batch_size} × --seq-len {config.seq_len} = {per_step} tokens.")


def training_windows(stream: torch.Tensor, config: LinearizeConfig, note=lambda m: None) -> tuple[torch.Tensor, int]:
    """(windows [n, seq_len] in a seeded order, steps). A budget beyond the text cycles through it."""
    n = stream.numel() // config.seq_len
    if n == 0:
        raise UserError(f"The calibration text is shorter than one window of {config.seq_len} tokens.")
    steps = finetune_steps(config)
    if steps * config.batch_size > n:
        note(f"Token budget {config.tokens} is larger than the calibration text ({n * config.seq_len} tokens in "
             f"windows of {config.seq_len}); cycling through it {steps * config.batch_size / n:.1f} times.")
    windows = stream[: n * config.seq_len].view(n, config.seq_len)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(config.seed))
    return windows[order], steps


def _lr(config: LinearizeConfig, step: int, steps: int) -> float:
    return config.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / max(1, steps))))


def _save_state(path, params: dict[str, torch.Tensor], opt: torch.optim.Optimizer, step: int, losses: list,
                key: str) -> None:
    tensors = {f"param.{n}": p.detach().cpu().contiguous() for n, p in params.items()}
    for i, p in enumerate(params.values()):
        for k, v in opt.state.get(p, {}).items():
            v = v.detach().cpu()
            tensors[f"opt.{i}.{k}"] = (v.reshape(-1) if v.dim() == 0 else v).contiguous()  # safetensors: no 0-d
    resume.save_state(tensors, path, {"step": str(step), "losses": json.dumps(losses)}, key=key)


def _load_state(path, params: dict[str, torch.Tensor], opt: torch.optim.Optimizer) -> tuple[int, list]:
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        keys = set(f.keys())
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(f.get_tensor(f"param.{n}"))
        for i, p in enumerate(params.values()):
            state = {k.rsplit(".", 1)[1]: f.get_tensor(k).to(p.device) for k in keys if k.startswith(f"opt.{i}.")}
            if "step" in state:
                state["step"] = state["step"].reshape(()).cpu()
            if state:
                opt.state[p] = state
    return int(meta["step"]), json.loads(meta["losses"])


def finetune(model: nn.Module, stream: torch.Tensor, config: LinearizeConfig, device, progress: Progress = NULL,
             checkpoint: Optional[resume.Checkpoint] = None) -> dict:
    """Stage 2 on the token ``stream`` (int64 [N]); returns losses and counts. Leaves LoRA merged."""
    students = students_of(model)
    if not students or config.tokens == 0:
        return {"steps": 0, "tokens": 0}
    windows, steps = training_windows(stream, config, progress.note)
    torch.manual_seed(config.seed)
    adapters = add_lora(students, config.lora_rank, config.lora_alpha)
    params: dict[str, nn.Parameter] = {}
    for name, p in model.named_parameters():
        if ".lora_" in name or (any(p is q for s in students for q in _trainable(s).values())):
            p.requires_grad_(True)
            params[name] = p
    try:
        start, losses = _tune(model, windows, steps, params, config, device, progress, checkpoint)
    except torch.cuda.OutOfMemoryError:  # (a traceback; the transfer's is one line, from the calibration driver)
        raise memory.out_of_memory("Fine-tuning", device, f"{FINETUNE_REMEDY}, or {_ON_CPU}") from None
    model.requires_grad_(False)
    del adapters
    merge_lora(model)
    return {"steps": steps, "tokens": steps * config.batch_size * config.seq_len, "resumed_at_step": start,
            "kl_first": losses[0] if losses else None, "kl_last": losses[-1] if losses else None,
            "kl_curve": losses[:: max(1, len(losses) // 20)]}


PROBE_TOKENS = 512  # (the probe's window, where --seq-len is longer: a layer's activations grow linearly past it)
KL_COPIES = 8  # float32 copies of the logits in the KL and its backward: log-softmaxes, exp, difference, gradients
# glibc keeps freed blocks resident: one step's resident peak ran 0.96-1.43× ``finetune_memory`` in 8 settings of the
# bundled model (CPU, all four methods), torch's own allocations 0.80-0.89× of it. (Not measured on a GPU, where the
# same ops train and torch's caching allocator keeps the blocks; an out-of-memory error there is one line anyway.)
CPU_SLACK = 1.5


def finetune_memory(model: nn.Module, config: LinearizeConfig) -> dict[str, int]:
    """Bytes stage 2 holds at its peak, by part; an estimate on the high side, made before any work::

        weights      the model's tensors (tied ones once): the fine-tune moves them all to its device
        trainable    n_lin × (LoRA's float32 parameters + the student's own) × 4: value, gradient, AdamW's 2 moments
        activations  batch × (n_lin · a_lin + n_soft · a_soft + max(a_lin, a_soft))
        logits       batch × seq_len × vocab × (2 model-dtype copies, teacher's and student's, + KL_COPIES × 4 B)

    ``a_lin`` / ``a_soft``: what autograd keeps for the backward of one window of ``seq_len`` tokens through a
    decoder layer, linearized (with LoRA) or kept softmax, measured by a forward of layer 0 on random inputs (on
    ``PROBE_TOKENS`` of a longer window, scaled: every part grows linearly once a window and a chunk fit); the last
    term is the backward's working gradients. Every layer but those kept softmax counts as linearized. The sum counts
    torch's allocations (it ran 13-24 % above their peak in the settings ``CPU_SLACK`` names), not what an allocator
    keeps besides."""
    _, layers = decoder_layers(model)
    n_soft = len(choose_softmax_layers(dict.fromkeys(range(len(layers)), 0.0), len(layers), config))
    n_lin = len(layers) - n_soft
    tokens = min(config.seq_len, max(PROBE_TOKENS, config.window + 64))
    layer, attn = layers[0], attention_of(layers[0])
    p = next(model.parameters())
    model.requires_grad_(False)  # (as the job does first: frozen weights keep no inputs for their gradients)
    with torch.random.fork_rng(devices=[]):  # (the probe's initialisation leaves the job's random state as it was)
        x = torch.randn(1, tokens, model.config.hidden_size, dtype=p.dtype, device=p.device, requires_grad=True)
        student = LinearAttention(attn, config.spec())
        add_lora([student], config.lora_rank, config.lora_alpha)
        held = {t.untyped_storage().data_ptr() for t in [*model.state_dict().values(), *student.parameters()]}
        a_soft = _saved_bytes(model, layer, x, held)
        layer.self_attn = student
        try:
            a_lin = _saved_bytes(model, layer, x, held)
        finally:
            layer.self_attn = attn
    scale = config.batch_size * config.seq_len / tokens
    trainable = sum(t.numel() * t.element_size() for t in student.parameters() if t.requires_grad)
    vocab = model.get_output_embeddings().weight.shape[0]
    return {"weights": memory.state_bytes(model.state_dict()), "trainable": 4 * n_lin * trainable,
            "activations": int(scale * (n_lin * a_lin + n_soft * a_soft + max(a_lin, a_soft))),
            "logits": config.batch_size * config.seq_len * vocab * (2 * p.element_size() + KL_COPIES * 4)}


def _saved_bytes(model: nn.Module, layer: nn.Module, x: torch.Tensor, held: set) -> int:
    """Bytes autograd keeps for the backward of one ``layer`` forward on ``x`` (each storage once; the model's own
    tensors, held anyway, left out)."""
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in held:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    position = torch.arange(x.shape[1], device=x.device)[None]
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x, attention_mask=None, position_ids=position, use_cache=False,
              position_embeddings=model.base_model.rotary_emb(x, position))
    return sum(seen.values())


def check_finetune_fits(model: nn.Module, config: LinearizeConfig, device) -> None:
    """Refuse, before any work, a fine-tune that would not fit in ``device``'s free memory (``finetune_memory``; on
    the CPU the weights are held already, and the rest counts ``CPU_SLACK`` times): it had no check, and ran out of
    memory after the whole attention transfer (on the CPU, the OOM killer ended it without a word)."""
    if not config.tokens:
        return
    parts = finetune_memory(model, config)
    on_gpu = torch.device(device).type == "cuda"
    if not on_gpu:
        del parts["weights"]
    shown = ", ".join(f"{k} {memory.format_bytes(v)}" for k, v in parts.items())
    shown += "" if on_gpu else f"; × {CPU_SLACK} for the CPU allocator"
    memory.check_fits(int(sum(parts.values()) * (1 if on_gpu else CPU_SLACK)),
                      f"The fine-tune ({config.batch_size} windows × {config.seq_len} tokens a step: {shown})",
                      FINETUNE_REMEDY + (f", or {_ON_CPU}" if on_gpu else ""), device)


def _tune(model, windows, steps, params, config, device, progress, checkpoint) -> tuple[int, list]:
    """``finetune``'s loop, from the last checkpoint; (the step it resumed at, the KL of every step)."""
    model.to(device)
    opt = torch.optim.AdamW(params.values(), lr=config.lr, weight_decay=0.0)
    path = checkpoint.dir / FINETUNE_FILE if checkpoint is not None else None
    start, losses = 0, []
    if path is not None and path.exists():
        start, losses = _load_state(path, params, opt)
        progress.note(f"Resuming fine-tuning at step {start} of {steps}")
    task = progress.task("Fine-tuning (KL to the teacher)", steps)
    progress.advance(task, start)
    n = windows.shape[0]
    for step in range(start, steps):
        rows = (torch.arange(config.batch_size) + step * config.batch_size) % n
        batch = windows[rows].to(device)
        with torch.no_grad(), teacher_mode(model):
            target = model(input_ids=batch, use_cache=False).logits
        loss = _kl(target, model(input_ids=batch, use_cache=False).logits)
        for group in opt.param_groups:
            group["lr"] = _lr(config, step, steps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params.values(), 1.0)
        opt.step()
        losses.append(round(loss.item(), 5))
        if not math.isfinite(losses[-1]):
            raise UserError(f"Fine-tuning diverged: the KL to the teacher is {losses[-1]} at step {step + 1} of "
                            f"{steps}; lower --lr (it is {config.lr}).")
        progress.advance(task)
        if path is not None and ((step + 1) % config.checkpoint_every == 0 or step + 1 == steps):
            _save_state(path, params, opt, step + 1, losses, _finetune_key(config))
            checkpoint.mark_time()
            resume._kill_point(f"linearize-step-{step + 1}")
    progress.done(task)
    return start, losses


# -- the whole job -----------------------------------------------------------------------------------

def _transfer_file(checkpoint: Optional[resume.Checkpoint], idx: int):
    return checkpoint.dir / f"transfer-{idx:04d}.safetensors" if checkpoint is not None else None


def _student(attn: nn.Module, spec: StudentSpec, seed: int) -> LinearAttention:
    torch.manual_seed(seed)  # new parameters' initialisation (mamba's dt / A) is seeded
    return LinearAttention(attn, spec)


def _load_student(path, student: LinearAttention) -> float:
    """A layer's student's parameters as ``transfer`` saved them; its transfer error."""
    with safe_open(str(path), framework="pt") as f, torch.no_grad():
        for n, p in _trainable(student).items():
            p.copy_(f.get_tensor(n))
        return float(json.loads(f.metadata()["error"]))


def check_layers(model: nn.Module, config: LinearizeConfig, calib_seq_len: Optional[int] = None) -> None:
    """An out-of-range ``--keep-layers``, a LoRA rank past the projections' size or a window that covers the
    training windows fails before any work (api.linearize calls it before the resume directory exists)."""
    _, layers = decoder_layers(model)
    kept = choose_softmax_layers(dict.fromkeys(range(len(layers)), 0.0), len(layers), config)
    if len(kept) == len(layers):  # (the job ran, trained nothing and wrote the original under a linearize stage)
        how = "--keep-layers names" if config.keep_layers is not None else f"--keep-softmax {config.keep_softmax} keeps"
        raise UserError(f"{how} every one of the model's {len(layers)} layers as softmax: nothing would be "
                        "linearized; keep fewer.")
    shortest = min(config.seq_len, calib_seq_len or config.seq_len)
    if len(kept) < len(layers) and config.window >= shortest:  # (every position inside the softmax window)
        raise UserError(f"--window {config.window} is not smaller than the training windows ({shortest} tokens): "
                        "no linear attention would be trained; lower --window or raise --seq-len.")
    smallest = min(min(p.in_features, p.out_features) for layer in layers
                   for p in (getattr(attention_of(layer), n) for n in PROJECTIONS))
    if config.lora_rank > smallest:
        raise UserError(f"--lora-rank {config.lora_rank} is larger than the attention projections allow "
                        f"({smallest}).")


def linearize_model(model: nn.Module, ids: torch.Tensor, stream: torch.Tensor, config: LinearizeConfig, *,
                    device, progress: Progress = NULL, checkpoint: Optional[resume.Checkpoint] = None
                    ) -> tuple[list[str], dict]:
    """Run both stages on ``model`` in place. ``ids``: stage-1 calibration windows [n, T]; ``stream``: the
    stage-2 token stream. Returns (layout: "softmax" | "linear" per layer, report)."""
    model.requires_grad_(False)
    _, layers = decoder_layers(model)
    check_layers(model, config)
    done = sum(_transfer_file(checkpoint, i).exists() for i in range(len(layers))) if checkpoint is not None else 0
    if checkpoint is not None and checkpoint.drop_stale(FINETUNE_FILE, _finetune_key(config)):
        checkpoint.rewind_time(TRANSFER_TIME)  # (the dropped fine-tune's seconds are no part of the artifact's)
        progress.note(f"Reusing the attention transfer of {done} of {len(layers)} layers from the interrupted job; "
                      "its fine-tune settings differ, so the fine-tune starts over")
    elif done:
        progress.note(f"Resuming: the attention transfer of {done} of {len(layers)} layers is done")
    if done == len(layers):  # (no pass over the calibration windows just to read every layer back)
        students = {i: _student(attention_of(layer), config.spec(), config.seed + i) for i, layer in enumerate(layers)}
        errors = {i: _load_student(_transfer_file(checkpoint, i), s) for i, s in students.items()}
    else:
        students, errors = transfer(model, ids, config, device, progress, checkpoint)
    softmax = choose_softmax_layers(errors, len(layers), config)
    install(model, {i: s for i, s in students.items() if i not in softmax})
    tuned = finetune(model, stream, config, device, progress, checkpoint)
    layout = ["softmax" if i in softmax else "linear" for i in range(len(layers))]
    report = {"transfer_rel_mse": {str(i): round(e, 6) for i, e in sorted(errors.items())},
              "transfer_batch_size": equal_batch(ids.shape[0], config.batch_size),  # (not always --batch-size)
              "softmax_layers": softmax, "finetune": tuned}
    return layout, report

"""Agreement with the original model: KL divergence, top-1 agreement, greedy common prefix.

The reference model runs first and its log-probabilities for every evaluation window are **streamed to
a float32 ``.npy`` file on disk** (numpy memmap), one batch at a time; then the reference model is
freed and the compressed model runs over the same windows, reading the reference back batch by batch.
So only one model and one batch of logits are in memory at a time, whatever the text length.
"""
from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from llmcomp.core.memory import input_device
from llmcomp.core.progress import NULL, Progress
from llmcomp.eval.perplexity import ppl_of, window_batches
from llmcomp.errors import UserError

PROMPT_TOKENS = 32
GREEDY_TOKENS = 32


class Reference:
    """The reference model's next-token log-probs on ``windows`` (on disk) and greedy continuations."""

    def __init__(self, windows: torch.Tensor, logprobs: np.memmap, continuations: torch.Tensor, ppl: float,
                 workdir: tempfile.TemporaryDirectory, tokenizer: str | None = None):
        self.windows, self.logprobs, self.continuations, self.ppl = windows, logprobs, continuations, ppl
        self.tokenizer = tokenizer  # tokenizer_id of the reference's tokenizer (the windows are its token ids)
        self.asked = None  # (n_windows, seq_len) api.record_reference asked for (the text may hold fewer windows)
        self.source = None  # the reference model's path as given (api.record_reference), shown in each row against it
        self._workdir = workdir  # removed when the Reference is garbage-collected

    def check_model(self, name: str, tok, vocab_size: int | None) -> None:
        """A model compared with this reference reads the same token ids and scores the same vocabulary: another
        tokenizer would be scored on text it cannot read (or crash), another logits width cannot be compared."""
        if self.tokenizer is not None and tokenizer_id(tok) != self.tokenizer:
            raise other_tokenizer(name)
        if vocab_size is not None and vocab_size != self.logprobs.shape[-1]:
            raise UserError(f"{name} scores {vocab_size} tokens, the reference model {self.logprobs.shape[-1]}; "
                            "agreement needs the same vocabulary.")

    @classmethod
    @torch.no_grad()
    def record(cls, model, windows: torch.Tensor, batch_size: int = 4, n_prompts: int = 8,
               progress: Progress = NULL, tokenizer: str | None = None) -> "Reference":
        n, t = windows.shape
        vocab = model.config.vocab_size
        workdir = tempfile.TemporaryDirectory(prefix="llmcomp-ref-")
        mm = np.lib.format.open_memmap(Path(workdir.name) / "ref_logprobs.npy", mode="w+", dtype=np.float32,
                                       shape=(n, t - 1, vocab))
        device = input_device(model)
        nll, count = 0.0, 0
        batches = window_batches(windows, batch_size)
        for i, batch in enumerate(progress.track(batches, "Reference log-probs")):
            batch = batch.to(device)
            logp = F.log_softmax(model(input_ids=batch, use_cache=False).logits[:, :-1].float(), dim=-1)
            nll -= float(logp.gather(-1, batch[:, 1:, None]).sum())
            count += batch[:, 1:].numel()
            mm[i * batch_size : i * batch_size + batch.shape[0]] = logp.cpu().numpy()
        mm.flush()
        continuations = greedy(model, prompts(windows, n_prompts))
        return cls(windows, mm, continuations, ppl_of(nll / count), workdir, tokenizer)

    def comparer(self) -> "Comparer":
        return Comparer(self)


def other_tokenizer(name: str) -> UserError:
    return UserError(f"{name} has a different tokenizer from the reference model; agreement needs the same one (pass "
                     "a --reference with this model's tokenizer).")


def tokenizer_id(tok) -> str:
    """A fingerprint of a tokenizer's vocabulary (token → id, added tokens included)."""
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()[:16]


def prompts(windows: torch.Tensor, n_prompts: int) -> torch.Tensor:
    return windows[:n_prompts, :PROMPT_TOKENS]


@torch.no_grad()
def greedy(model, prompt_ids: torch.Tensor) -> torch.Tensor:
    device = input_device(model)
    out = model.generate(prompt_ids.to(device), max_new_tokens=GREEDY_TOKENS, min_new_tokens=GREEDY_TOKENS,
                         do_sample=False, attention_mask=torch.ones_like(prompt_ids, device=device))
    return out[:, prompt_ids.shape[1]:].cpu()


def common_prefix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per row: number of leading positions where ``a`` and ``b`` agree."""
    same = (a == b).int()
    return same.cumprod(dim=1).sum(dim=1)


class Comparer:
    """Accumulates per-token KL(reference ‖ model) and top-1 agreement as batches arrive."""

    def __init__(self, ref: Reference):
        self.ref, self.kl, self.agree = ref, [], []

    def observe(self, start: int, logits: torch.Tensor) -> None:
        """``logits``: the model's [B, T, V] logits for windows ``start .. start+B``."""
        q = F.log_softmax(logits[:, :-1].float(), dim=-1)
        p = torch.from_numpy(np.asarray(self.ref.logprobs[start : start + logits.shape[0]])).to(q.device)
        self.kl.append((p.exp() * (p - q)).sum(-1).flatten().cpu())
        self.agree.append((p.argmax(-1) == q.argmax(-1)).flatten().cpu())

    def summary(self, model) -> dict:
        kl = torch.cat(self.kl).clamp(min=0)  # tiny negatives are float round-off
        agree = torch.cat(self.agree).float()
        mine = greedy(model, prompts(self.ref.windows, self.ref.continuations.shape[0]))
        return {
            "kld_mean": float(kl.mean()),
            "kld_p99": float(torch.quantile(kl, 0.99)),
            "top1_agree": float(agree.mean()),
            "greedy_prefix": float(common_prefix(mine, self.ref.continuations).float().mean()),
            "greedy_prompts": int(mine.shape[0]),  # (up to 8: fewer where fewer windows were scored)
            "ref_ppl": self.ref.ppl,
        }

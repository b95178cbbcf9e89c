"""Perplexity on the held-out split: fixed windows, no BOS, deterministic."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from llmcomp.core.data import check_vocab, eval_windows
from llmcomp.core.memory import input_device
from llmcomp.core.progress import NULL, Progress


def window_batches(windows: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, ...]:
    """``windows`` in batches of ``batch_size`` rows (any positive int: ``split`` takes an int64, so a huge one is
    cut to the window count)."""
    return windows.split(min(batch_size, max(1, len(windows))))


def ppl_of(nll: float) -> float:
    """exp(mean NLL); inf past float64's range (a broken model's NLL of > 709 nats), not an OverflowError."""
    try:
        return math.exp(nll)
    except OverflowError:
        return math.inf


@torch.no_grad()
def perplexity(model, tokenizer, seq_len: int = 512, n_windows: int = 16, batch_size: int = 4,
               progress: Progress = NULL, source: str | None = None, windows: torch.Tensor | None = None,
               comparer=None) -> dict:
    """Mean next-token NLL over ``n_windows`` consecutive windows of ``seq_len`` held-out tokens.

    Each window is scored on positions 1..seq_len-1 (the first token has no context). Returns
    ``{"ppl", "nll", "tokens", "windows", "seq_len"}``. ``windows`` overrides the text; a ``comparer``
    (eval/agreement.py) sees every batch of logits and adds its agreement metrics.
    """
    if windows is None:
        windows = eval_windows(tokenizer, seq_len, n_windows, source)
    check_vocab(windows, model)
    device = input_device(model)
    total, count = 0.0, 0
    batches = window_batches(windows, batch_size)
    for i, batch in enumerate(progress.track(batches, "Perplexity")):
        batch = batch.to(device)
        logits = model(input_ids=batch, use_cache=False).logits.float()  # (B, T, V)
        if comparer is not None:
            comparer.observe(i * batch_size, logits)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                               reduction="sum")
        total += float(loss)
        count += batch[:, 1:].numel()
    nll = total / count
    out = {"ppl": ppl_of(nll), "nll": nll, "tokens": count, "windows": windows.shape[0], "seq_len": windows.shape[1]}
    if comparer is not None:
        out.update(comparer.summary(model))
    return out

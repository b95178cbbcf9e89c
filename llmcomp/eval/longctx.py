"""Long-context evaluation with the model's KV cache policy active (``llmcomp eval --long``).

- **Continuation perplexity**: each held-out window of ``context`` tokens is split into a prefix that
  is prefilled into the cache (and compressed by the policy), then the remaining ``continuation``
  tokens are fed in chunks of ``chunk`` tokens on top of that cache (teacher forcing; the policy
  runs after every chunk) and scored. Only the continuation is scored.
- **KV bytes**: what the cache holds right after the prefix (``KVCache.nbytes``, or the key/value
  tensors of a dense cache) and what a dense cache would hold for the same tokens.
- **Passkey retrieval** (``core/passkey.py``): greedy answers to prompts of each length, needle depths
  spread over the prompt; accuracy = the first number generated is the key.
Nothing here knows the policy: a loaded artifact applies it on any cached forward / ``generate``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from llmcomp.core.data import eval_windows
from llmcomp.core.passkey import answer_correct, passkey_samples
from llmcomp.core.progress import NULL, Progress
from llmcomp.core.hfcompat import cache_kwarg as cache_kw, output_cache


def kv_nbytes(cache) -> tuple[int, int]:
    """(bytes held, bytes a dense cache would hold) for a KVCache or a plain transformers cache."""
    if hasattr(cache, "dense_nbytes"):
        return cache.nbytes(), cache.dense_nbytes()
    held = 0
    for layer in cache.layers:
        if hasattr(layer, "nbytes"):  # a layer that counts itself (linearized attention: state + window)
            held += layer.nbytes()
        else:
            held += sum(t.numel() * t.element_size() for t in (getattr(layer, "keys", None),
                                                               getattr(layer, "values", None)) if t is not None)
    return held, held


@torch.no_grad()
def continuation_perplexity(model, tokenizer, *, context: int = 2048, prefix: int = 1536, n_windows: int = 4,
                            chunk: int = 64, progress: Progress = NULL) -> dict:
    windows = eval_windows(tokenizer, context, n_windows)
    device = next(model.parameters()).device
    total, count, held, dense = 0.0, 0, [], []
    for w in progress.track(list(windows), "Long-context perplexity"):
        w = w[None].to(device)
        out = model(input_ids=w[:, :prefix], use_cache=True, logits_to_keep=1)
        cache = output_cache(out)
        h, d = kv_nbytes(cache)
        held.append(h)
        dense.append(d)
        logits = [out.logits[:, -1:].float()]
        for s in range(prefix, context - 1, chunk):
            o = model(input_ids=w[:, s:min(s + chunk, context - 1)], **{cache_kw(model): cache}, use_cache=True)
            cache = output_cache(o)
            logits.append(o.logits.float())
        logits = torch.cat(logits, dim=1)  # predicts tokens prefix .. context-1
        target = w[:, prefix:]
        total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum"))
        count += target.numel()
    nll = total / count
    return {"ppl": math.exp(nll), "nll": nll, "tokens": count, "windows": windows.shape[0], "context": context,
            "prefix": prefix, "chunk": chunk, "kv_bytes": sum(held) / len(held), "kv_dense_bytes": sum(dense) / len(dense)}


@torch.no_grad()
def passkey_accuracy(model, tokenizer, lengths=(1024, 2048), n: int = 10, seed: int = 0, max_new_tokens: int = 7,
                     progress: Progress = NULL) -> dict:
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = {}
    for length in lengths:
        hits = 0
        for s in progress.track(passkey_samples(tokenizer, length, n, seed=seed), f"Passkey {length} tokens"):
            ids = s.prompt[None].to(device)
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=pad)
            hits += answer_correct(tokenizer.decode(gen[0, ids.shape[1]:], skip_special_tokens=True), s.answer)
        out[str(length)] = hits / n
    return out


def long_context_eval(model, tokenizer, *, context: int = 2048, prefix: int | None = None, n_windows: int = 4,
                      chunk: int = 64, passkey_lengths=(1024, 2048), passkey_n: int = 10, seed: int = 0,
                      progress: Progress = NULL) -> dict:
    prefix = prefix or context * 3 // 4
    result = continuation_perplexity(model, tokenizer, context=context, prefix=prefix, n_windows=n_windows,
                                     chunk=chunk, progress=progress)
    if passkey_lengths and passkey_n:
        result["passkey"] = passkey_accuracy(model, tokenizer, passkey_lengths, passkey_n, seed, progress=progress)
        result["passkey_samples"] = passkey_n
    return result

"""Long-context evaluation with the model's KV cache policy active (``llmcomp eval --long``).

- **Continuation perplexity**: each held-out window of ``context`` tokens is split into a prefix that
  is prefilled into the cache (and compressed by the policy), then the remaining ``continuation``
  tokens are fed in chunks of ``chunk`` tokens on top of that cache (teacher forcing; the policy
  runs after every chunk) and scored. Only the continuation is scored.
- **KV bytes**: what the cache holds right after the prefix (``KVCache.nbytes``, or the key/value
  tensors of a dense cache) and what a dense cache would hold for the same tokens.
- **Passkey retrieval** (``core/passkey.py``): greedy answers to prompts of each length, needle depths
  spread over the prompt; accuracy = the first number generated is the key.
- **Multi-key needle retrieval** (``needle_keys`` > 0): the same with several labelled needles per
  prompt and the question asking for one label's key (the others are distractors).
Nothing here knows the policy: a loaded artifact applies it on any cached forward / ``generate``.
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from llmcomp.core.data import check_vocab, eval_windows
from llmcomp.core.passkey import answer_correct, multikey_samples, passkey_samples
from llmcomp.core.progress import NULL, Progress
from llmcomp.eval.perplexity import ppl_of
from llmcomp.core.hfcompat import cache_kwarg as cache_kw, output_cache
from llmcomp.prune.kv.base import head_dim, kv_heads
from llmcomp.prune.kv.cache import tensor_bytes


def kv_nbytes(cache, model=None) -> tuple[int, int]:
    """(bytes held, bytes a dense cache would hold) for a KVCache or a plain transformers cache. A linearized
    layer's dense bytes are the keys and values of the softmax layer it replaced, in ``model``'s KV heads, head
    size and dtype (its state is float32 whatever the model's); without a model, what it holds."""
    if hasattr(cache, "dense_nbytes"):
        return cache.nbytes(), cache.dense_nbytes()
    held = dense = 0
    for layer in cache.layers:
        if hasattr(layer, "nbytes"):  # a layer that counts itself (linearized attention: state + window)
            n = layer.nbytes()
            dense += n if model is None else layer.dense_nbytes(kv_heads(model.config), head_dim(model.config),
                                                                model.dtype.itemsize)
        else:
            n = tensor_bytes(getattr(layer, "keys", None), getattr(layer, "values", None))
            dense += n
        held += n
    return held, dense


@torch.no_grad()
def continuation_perplexity(model, tokenizer, *, context: int = 2048, prefix: int = 1536, n_windows: int = 4,
                            chunk: int = 64, progress: Progress = NULL) -> dict:
    windows = eval_windows(tokenizer, context, n_windows)
    check_vocab(windows, model)
    device = next(model.parameters()).device
    total, count, held, dense = 0.0, 0, [], []
    for w in progress.track(list(windows), "Long-context perplexity"):
        w = w[None].to(device)
        out = model(input_ids=w[:, :prefix], use_cache=True, logits_to_keep=1)
        cache = output_cache(out)
        h, d = kv_nbytes(cache, model)
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
    return {"ppl": ppl_of(nll), "nll": nll, "tokens": count, "windows": windows.shape[0], "context": context,
            "prefix": prefix, "chunk": chunk, "kv_bytes": sum(held) / len(held), "kv_dense_bytes": sum(dense) / len(dense)}


ANSWER_TOKENS = 7  # greedy tokens generated per prompt: " " + 5 digits + one more (a longer number is wrong)


def answer_positions(length: int) -> int:
    """Positions a retrieval prompt of ``length`` tokens uses: the prompt + the generated tokens fed back."""
    return length + ANSWER_TOKENS - 1


@torch.no_grad()
def retrieval_accuracy(model, tokenizer, samples: dict, what: str, progress: Progress = NULL,
                       times: dict | None = None) -> dict:
    """Share of greedy answers whose first number is the key, per prompt length (``samples``: length →
    list of ``PasskeySample``). ``times``, when given, receives the seconds spent per length."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = {}
    for length, prompts in samples.items():
        start, hits = time.perf_counter(), 0
        for s in progress.track(prompts, f"{what} {length} tokens"):
            ids = s.prompt[None].to(device)
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=ANSWER_TOKENS,
                                 do_sample=False, pad_token_id=pad)
            hits += answer_correct(tokenizer.decode(gen[0, ids.shape[1]:], skip_special_tokens=True), s.answer)
        out[str(length)] = hits / len(prompts)
        if times is not None:
            times[str(length)] = round(time.perf_counter() - start, 2)
    return out


def passkey_accuracy(model, tokenizer, lengths=(1024, 2048), n: int = 10, seed: int = 0,
                     progress: Progress = NULL) -> dict:
    samples = {n_tok: passkey_samples(tokenizer, n_tok, n, seed=seed) for n_tok in lengths}
    return retrieval_accuracy(model, tokenizer, samples, "Passkey", progress)


def long_context_eval(model, tokenizer, *, context: int = 2048, prefix: int | None = None, n_windows: int = 4,
                      chunk: int = 64, passkey_lengths=(1024, 2048), passkey_n: int = 10, needle_keys: int = 0,
                      seed: int = 0, progress: Progress = NULL) -> dict:
    """Continuation ppl, KV bytes, passkey and (``needle_keys`` > 0) multi-key needle accuracy per length;
    ``times_s`` holds the seconds of each part. Every prompt is built (and so checked) before anything runs."""
    prefix = prefix or context * 3 // 4
    tasks = {}
    if passkey_lengths and passkey_n:
        tasks["passkey"] = ("Passkey",
                            {n: passkey_samples(tokenizer, n, passkey_n, seed=seed, hint="--passkey-lengths")
                             for n in passkey_lengths})
        if needle_keys:
            tasks["multikey"] = (f"{needle_keys}-key needle",
                                 {n: multikey_samples(tokenizer, n, passkey_n, keys=needle_keys, seed=seed,
                                                      hint="--passkey-lengths")
                                  for n in passkey_lengths})
    start = time.perf_counter()
    result = continuation_perplexity(model, tokenizer, context=context, prefix=prefix, n_windows=n_windows,
                                     chunk=chunk, progress=progress)
    times = {"ppl": round(time.perf_counter() - start, 2)}
    for name, (what, samples) in tasks.items():
        times[name] = {}
        result[name] = retrieval_accuracy(model, tokenizer, samples, what, progress, times[name])
    if tasks:
        result["passkey_samples"] = passkey_n
    if "multikey" in tasks:
        result["needle_keys"] = needle_keys
    result["times_s"] = times
    return result

"""Split-KV attention for one query token a sequence with grouped-query heads (the decode step), in Triton.

A decode step's attention reads the whole cache once and does almost no math, yet as two batched GEMMs and a
softmax (or cuDNN's flash kernel: ~16 µs a layer on an H200 for 8 key/value heads × 4 query heads at batch 1,
bench/results/kernels_h200_notes.md) it takes several launches and runs on few SMs. Here:

1. ``_decode_attention_partial``: one program per (sequence, key/value head, chunk of ``CHUNK`` cache positions) — enough programs
   to fill the GPU at batch 1 — scores its head's ``groups`` query heads (padded to 16 rows for ``tl.dot``)
   against the chunk, softmax-weights the values with a running maximum, and writes the unnormalized sum, the
   maximum and the weight total (fp32). Positions after the chunk's last attended one (a static cache's unused
   tail) are not read, by masked loads rather than a branch a block, so Triton pipelines the loop's K/V loads.
2. The merge of a (sequence, key/value head)'s chunks (log-sum-exp) into the output, either
   ``_decode_attention_combine`` (one program per (sequence, query head), a second launch) or, with many heads, the
   partial kernel itself: each program counts itself done on an atomic counter of its (sequence, head), and the one
   that finishes last merges and resets the counter to 0 for the next launch (so a CUDA graph replays it as it is).
   The merging program reads all chunks' maxima first, then sums the chunks in an unrolled loop (no running-maximum
   chain, so the loads issue together). On an H200 (bench/results/decode_attention_h200_unrolled_*.json, 8B shapes):
   batch 16 15.0-15.1 / 15.8 µs fused against 16.2-16.3 / 16.9 separate; batch 1 7.65 against 6.33 — with 8 heads
   the last program's merge is a serial tail on an idle GPU (8.3 with the running-maximum loop). Hence fused when
   the (sequence, head) pairs are at least half the SMs (``fused_merge``; ``LLMCOMP_ATTN_FUSED_MERGE=1``/``0``
   forces it). The counters are one int32 a (sequence, head) a device, kept for
   the process (a captured graph holds their address), made outside graph capture (a call captured before any
   exist merges separately); two such calls at once on different streams of one device would share them — the
   decode runner makes one at a time. (Under torch.compile's ``reduce-overhead`` mode, whose warm-up runs in the
   graphs' memory pool, call the op once outside it first.)

Inputs as the decode runner has them: ``q`` [B, H, D] (the step's one token), ``k``/``v`` [B, KVH, L, D] (the
cache as it is, last dim contiguous), an optional mask [B, L] (bool: True attends; or additive float). A row with
no position to attend gives zeros (SDPA would give NaN). Registered as the custom op
``llmcomp::decode_attention`` so that torch.compile keeps it as one call.
"""
from __future__ import annotations

import functools
import os
from typing import Optional

import torch

from llmcomp.kernels.switches import env_off, env_switch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: ``supports`` says no, callers take their torch path
    triton = tl = None

MAX_SPLITS = 32
# The partial kernel's software-pipeline depth (K/V blocks in flight, 32 KB of shared memory each at head dim 128). On
# an H200 at the 8B decode shapes (bench/results/decode_attention_h200.json), batch 16: 16.6 / 17.3 / 19.0 µs at 3 / 2 /
# 1 (the unpipelined kernel with a branch a block: 19.9); batch 1 (one block a program): 6.4 µs at any depth (6.6).
# Head dim 256 takes at most 2 (3 need ~138 KB a program, past the 99 KB of sm_86/89/120 GPUs); a launch that still
# runs out of shared memory is retried unpipelined, and that depth kept for the head dim and device (_STAGES).
NUM_STAGES = 3
_STAGES: dict = {}


# None: by fused_merge's rule; LLMCOMP_ATTN_FUSED_MERGE forces it on or off (env_switch)
FUSED_MERGE: Optional[bool] = env_switch("LLMCOMP_ATTN_FUSED_MERGE")
# Both kernels launched as programmatic dependents (sm_90+), so their launch overlaps the kernel before: on while the
# decode runner's dependent launch is (eval.decode_bench.dependent_launch sets this; LLMCOMP_ATTN_PDL=0 keeps it
# off there), or everywhere with LLMCOMP_ATTN_PDL=1. In the replayed W4 8B step (H200, batch 1) the GPU idled ~14 µs
# a step before each of them without it, ~6 µs before the partial kernel with it; the step 2.01 ms against 2.07
# (bench/results/kernels_h200_notes.md, sixteenth session).
ATTN_PDL = env_switch("LLMCOMP_ATTN_PDL") is True
# Under dependent launch, each kernel lets the next one launch first thing, then waits for the one before to finish
# (LLMCOMP_ATTN_EARLY=0: waits first): the merge's dependent, the o projection, whose weight loads come before its
# own wait, then streams its weights while the partial kernel runs. Either order is correct (each kernel still waits
# for the one before it). Compiled 8B W4 decode at batch 1 on an H200 (twenty-sixth session, kernels_h200_notes.md):
# 1.742 / 1.726 / 1.738 ms a step against 1.768 / 1.759 — the o projection 4.6 µs a layer against 6.1, the partial
# kernel 4.9 against 4.0. (Letting it launch after the partial kernel's mask scan instead: 1.744.)
ATTN_EARLY = not env_off("LLMCOMP_ATTN_EARLY")
_COUNTERS: dict = {}  # device -> int32 counters (zero between launches)
_KEEP: list = []  # counters outgrown, still alive for the graphs captured with them


def _counters(n: int, device: torch.device) -> Optional[torch.Tensor]:
    """At least n zeroed counters on ``device``, or None while a CUDA graph is being captured and there are not
    enough yet: a tensor made during capture would only be zeroed when the graph is replayed (and would live in the
    graph's memory pool), so such a call merges with the separate kernel instead."""
    c = _COUNTERS.get(device)
    if c is None or c.numel() < n:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        if c is not None:
            _KEEP.append(c)
        c = _COUNTERS[device] = torch.zeros(max(n, 1024), dtype=torch.int32, device=device)
    return c


def dependent_launch(device: torch.device) -> bool:
    """Whether the kernels launch as programmatic dependents: ``ATTN_PDL`` on a GPU of compute capability 9+."""
    return ATTN_PDL and device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


def stages(d: int, device: torch.device) -> int:
    return _STAGES.get((d, device), NUM_STAGES if d <= 128 else min(NUM_STAGES, 2))


def supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: int) -> bool:
    d = q.shape[-1]
    return (triton is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and k.dtype == q.dtype
            and v.dtype == q.dtype and d in (64, 128, 256) and v.shape[-1] == d and 1 <= groups <= 16
            and k.stride(-1) == 1 and v.stride(-1) == 1)


def fused_merge(batch_heads: int, sms: int) -> bool:
    """Whether the partial kernel merges (module docstring): ``FUSED_MERGE`` if set, else at least sms / 2 pairs."""
    return FUSED_MERGE if FUSED_MERGE is not None else 2 * batch_heads >= sms


def _chunk_override() -> Optional[int]:
    """``LLMCOMP_ATTN_CHUNK``: positions a program, a power of two ≥ 64 (for timing the rule against fixed sizes:
    bench/decode_attention_ab.py --chunks); anything else is ignored with a warning."""
    text = os.environ.get("LLMCOMP_ATTN_CHUNK", "").strip()
    if not text:
        return None
    if text.isdigit() and int(text) >= 64 and int(text) & (int(text) - 1) == 0:
        return int(text)
    import warnings

    warnings.warn(f"LLMCOMP_ATTN_CHUNK={text!r} is not a power of two >= 64; the chunk size follows its rule")
    return None


# None: chunk_size's rule; else the positions a program (at least, so that there are at most MAX_SPLITS chunks)
CHUNK: Optional[int] = _chunk_override()


def chunk_size(batch_heads: int, length: int, sms: int) -> int:
    """Positions a program: a power of two ≥ 64 such that about two programs an SM run (at most MAX_SPLITS chunks);
    ``CHUNK`` where set (raised to keep at most MAX_SPLITS chunks)."""
    want = max(1, min(MAX_SPLITS, -(-2 * sms // max(batch_heads, 1)))) if CHUNK is None else MAX_SPLITS
    chunk = 64 if CHUNK is None else CHUNK
    while -(-length // chunk) > want:
        chunk *= 2
    return chunk


if triton is not None:  # (a kernel's helpers must be module globals for Triton to find them)
    @triton.jit
    def _bias(m_row, sm_l, pos, valid, MASK: tl.constexpr):
        """The mask as an additive fp32 bias at ``pos`` (a bool mask's False: -inf); -inf where not ``valid``."""
        if MASK == 1:
            bias = tl.where(tl.load(m_row + pos * sm_l, mask=valid, other=0) != 0, 0.0, float("-inf"))
        elif MASK == 2:
            bias = tl.load(m_row + pos * sm_l, mask=valid, other=float("-inf")).to(tl.float32)
        else:
            bias = tl.where(valid, 0.0, float("-inf"))
        return bias

    @triton.jit
    def _rescale(m_old, m_cand):
        """A running maximum's step: the new maximum, the one to subtract (0 while nothing is attended, so -inf rows
        stay 0 instead of NaN) and the factor that rescales what was summed under ``m_old``."""
        m_new = tl.maximum(m_old, m_cand)
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        return m_new, m_use, tl.exp(m_old - m_use)

    @triton.jit
    def _rotated(x, partner, cs, sn):
        """x · cos + rotate_half(x) · sin in fp32, rounded to x's dtype (``sn`` carries rotate_half's signs)."""
        return (x.to(tl.float32) * cs + partner.to(tl.float32) * sn).to(x.dtype)

    @triton.jit
    def _dependent_start(PDL: tl.constexpr):
        """Under programmatic dependent launch: wait until the kernel before has finished (its writes visible), then
        let the next kernel launch — it waits for this one the same way, so only its launch and prologue (our
        GEMMs' first weight loads) overlap this kernel. PDL 2 (``ATTN_EARLY``): the next kernel launched first."""
        if PDL == 2:
            tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
        if PDL == 1:
            tl.extra.cuda.gdc_launch_dependents()


@functools.lru_cache(maxsize=1)
def _kernels():
    @triton.jit
    def _decode_attention_partial(q_ptr, k_ptr, v_ptr, m_ptr, acc_ptr, ml_ptr, cnt_ptr, out_ptr, L, KVH, nsplit, scale,
                 sq_b, sq_h, sk_b, sk_h, sk_l, sv_b, sv_h, sv_l, sm_b, sm_l,
                 kn_ptr, vn_ptr, cos_ptr, sin_ptr, pos_ptr, skn_b, skn_h, svn_b, svn_h, scs_b,
                 GROUPS: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr,
                 MASK: tl.constexpr, MERGE: tl.constexpr, SP: tl.constexpr, PDL: tl.constexpr, ROPE: tl.constexpr):
        # MASK: 0 none, 1 bool (as uint8), 2 additive float. PDL: launched as a dependent (``dependent_launch``;
        # 2: ``ATTN_EARLY``)
        # ROPE (``decode_attention_rope``): q, the new key (kn) and value (vn) come unrotated and not yet cached; the
        # rotary embedding (cos, sin) is applied here, the program whose chunk holds the new position (*pos_ptr)
        # reads the rotated key and the value from registers at that position (its cache load there is stale) and
        # writes them into the cache there.
        if PDL:
            _dependent_start(PDL)
        bh = tl.program_id(0)
        s = tl.program_id(1)
        b = bh // KVH
        h = bh % KVH
        g = tl.arange(0, GP)
        d = tl.arange(0, D)
        start = s * CHUNK
        # The chunk's last attended position, found before the loop: K/V loads are masked off past it (a static
        # cache's unused tail is not read) instead of a branch a block, so the loop's body has no branch and Triton
        # software-pipelines it (the next block's K/V loads in flight while this one is computed). Blocks with nothing
        # to attend before that position are read and weigh zero.
        q_rows = q_ptr + b * sq_b + (h * GROUPS + g)[:, None] * sq_h
        if ROPE:
            # Loaded before the mask's scan, so their latency passes under it. rotate_half's partner of column d and
            # its sign; fp32 math before the loop, rounded once (as inductor's fused rotary). (Two other forms lost
            # on an H200, 8B W4 decode at batch 1, kernels_h200_notes.md twenty-second session: the rotation in the
            # loop after the block's K/V loads, 1.792 ms a step against 1.773 without the fused op; every vector in
            # the layout it is used in with the new key's score apart, 1.819 against 1.778. This one: 1.790 against
            # 1.798, twenty-first session.)
            dp = (d + D // 2) % D
            cs = tl.load(cos_ptr + b * scs_b + d).to(tl.float32)
            sn = tl.load(sin_ptr + b * scs_b + d).to(tl.float32) * tl.where(d < D // 2, -1.0, 1.0)
            qa = tl.load(q_rows + d[None, :], mask=(g < GROUPS)[:, None], other=0.0)
            qb = tl.load(q_rows + dp[None, :], mask=(g < GROUPS)[:, None], other=0.0)
            k_row = kn_ptr + b * skn_b + h * skn_h
            ka = tl.load(k_row + d)
            kb = tl.load(k_row + dp)
            v_new = tl.load(vn_ptr + b * svn_b + h * svn_h + d)
            at = tl.load(pos_ptr).to(tl.int32)
        else:
            q = tl.load(q_rows + d[None, :], mask=(g < GROUPS)[:, None], other=0.0)
        if MASK == 0:
            end = tl.minimum(start + CHUNK, L)
        else:
            end = start
            for i in range(0, CHUNK, BLOCK):  # a block of the mask at a time (CHUNK grows with the length)
                cpos = start + i + tl.arange(0, BLOCK)
                attend = _bias(m_ptr + b * sm_b, sm_l, cpos, cpos < L, MASK) > float("-inf")
                end = tl.maximum(end, tl.max(tl.where(attend, cpos, -1), 0) + 1)
        if ROPE:
            q = _rotated(qa, qb, cs[None, :], sn[None, :])
            k_new = _rotated(ka, kb, cs, sn)
        m_i = tl.full([GP], float("-inf"), tl.float32)
        l_i = tl.zeros([GP], tl.float32)
        acc = tl.zeros([GP, D], tl.float32)
        for i in range(0, CHUNK, BLOCK):
            pos = start + i + tl.arange(0, BLOCK)
            inside = pos < end
            kk = tl.load(k_ptr + b * sk_b + h * sk_h + pos[:, None] * sk_l + d[None, :], mask=inside[:, None],
                         other=0.0)
            vv = tl.load(v_ptr + b * sv_b + h * sv_h + pos[:, None] * sv_l + d[None, :], mask=inside[:, None],
                         other=0.0)
            if ROPE:
                fresh = (pos == at)[:, None]
                kk = tl.where(fresh, k_new[None, :], kk)
                vv = tl.where(fresh, v_new[None, :], vv)
            sc = tl.dot(q, tl.trans(kk)) * scale + _bias(m_ptr + b * sm_b, sm_l, pos, inside, MASK)[None, :]
            m_new, m_use, alpha = _rescale(m_i, tl.max(sc, 1))
            p = tl.exp(sc - m_use[:, None])
            acc = acc * alpha[:, None] + tl.dot(p.to(vv.dtype), vv)
            l_i = l_i * alpha + tl.sum(p, 1)
            m_i = m_new
        if ROPE:  # (after the loop: its loads at that position read the stale entry, replaced in registers)
            own = (at >= start) & (at < start + CHUNK)
            tl.store(k_ptr + b * sk_b + h * sk_h + at * sk_l + d, k_new, mask=own & (d < D))
            tl.store(v_ptr + b * sv_b + h * sv_h + at * sv_l + d, v_new, mask=own & (d < D))
        row = (bh * GROUPS + g) * nsplit + s  # [B * H, splits] order: query head bh * GROUPS + g
        tl.store(ml_ptr + row * 2, m_i, mask=g < GROUPS)
        tl.store(ml_ptr + row * 2 + 1, l_i, mask=g < GROUPS)
        tl.store(acc_ptr + row[:, None] * D + d[None, :], acc, mask=(g < GROUPS)[:, None])
        if MERGE:
            # Every thread's stores before the counter's release; the program that finishes last acquires the
            # others' and merges (its loads bypass L1: .cg).
            tl.debug_barrier()
            done = tl.atomic_add(cnt_ptr + bh, 1, sem="acq_rel", scope="gpu")
            if done == nsplit - 1:
                tl.store(cnt_ptr + bh, 0)
                # The maxima of all chunks first ([GP, SP] in one load), so each chunk's weight is known on its own
                # and the unrolled loop's loads issue together (no running-maximum chain).
                sp = tl.arange(0, SP)
                rows = (bh * GROUPS + g)[:, None] * nsplit + sp[None, :]
                both = (g < GROUPS)[:, None] & (sp < nsplit)[None, :]
                top = tl.max(tl.load(ml_ptr + rows * 2, mask=both, other=float("-inf"), cache_modifier=".cg"), 1)
                top = tl.where(top == float("-inf"), 0.0, top)
                l_run = tl.zeros([GP], tl.float32)
                o = tl.zeros([GP, D], tl.float32)
                for t in tl.static_range(SP):
                    rt = (bh * GROUPS + g) * nsplit + t
                    there = (g < GROUPS) & (t < nsplit)
                    w_t = tl.exp(tl.load(ml_ptr + rt * 2, mask=there, other=float("-inf"), cache_modifier=".cg") - top)
                    l_run += w_t * tl.load(ml_ptr + rt * 2 + 1, mask=there, other=0.0, cache_modifier=".cg")
                    o += w_t[:, None] * tl.load(acc_ptr + rt[:, None] * D + d[None, :], mask=there[:, None], other=0.0,
                                                cache_modifier=".cg")
                o = o / tl.where(l_run == 0.0, 1.0, l_run)[:, None]
                tl.store(out_ptr + (bh * GROUPS + g)[:, None] * D + d[None, :], o.to(out_ptr.dtype.element_ty),
                         mask=(g < GROUPS)[:, None])

    @triton.jit
    def _decode_attention_combine(acc_ptr, ml_ptr, out_ptr, S, D: tl.constexpr, SP: tl.constexpr, PDL: tl.constexpr):
        if PDL:
            _dependent_start(PDL)
        r = tl.program_id(0)  # query head of a sequence: b * H + head
        s = tl.arange(0, SP)
        d = tl.arange(0, D)
        m = tl.load(ml_ptr + (r * S + s) * 2, mask=s < S, other=float("-inf"))
        l = tl.load(ml_ptr + (r * S + s) * 2 + 1, mask=s < S, other=0.0)
        top = tl.max(m, 0)
        w = tl.where(m == float("-inf"), 0.0, tl.exp(m - tl.where(top == float("-inf"), 0.0, top)))
        acc = tl.load(acc_ptr + (r * S + s)[:, None] * D + d[None, :], mask=(s < S)[:, None], other=0.0)
        total = tl.sum(w * l, 0)
        o = tl.sum(acc * w[:, None], 0) / tl.where(total == 0.0, 1.0, total)
        tl.store(out_ptr + r * D + d, o.to(out_ptr.dtype.element_ty))

    return _decode_attention_partial, _decode_attention_combine


def _mask_args(mask: Optional[torch.Tensor], b: int, length: int, device) -> tuple:
    if mask is None:
        return torch.empty(1, device=device), 0, 0, 0
    mask = mask.reshape(mask.shape[0], mask.shape[-1]).expand(b, length)
    if mask.dtype == torch.bool:
        mask = mask.view(torch.uint8)
        return mask, mask.stride(0), mask.stride(1), 1
    return mask, mask.stride(0), mask.stride(1), 2


@torch.library.custom_op("llmcomp::decode_attention", mutates_args=())
def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
                     scale: float) -> torch.Tensor:
    """q [B, H, D], k/v [B, KVH, L, D], mask None or [B, 1, 1, L] / [B, L] (bool or additive) → [B, H, D]
    (the kernels; on CPU tensors Triton's interpreter runs them, and without Triton this is ``reference``)."""
    if triton is None:
        return reference(q, k, v, mask, scale)
    return _attend(q, k, v, mask, scale, None)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor], scale: float,
            rope: Optional[tuple]) -> torch.Tensor:
    """The kernels' launch; ``rope``: (k_new, v_new, cos, sin, position) of ``decode_attention_rope``, else None."""
    b, h, d = q.shape
    kvh, length = k.shape[1], k.shape[2]
    groups = h // kvh
    q = q if q.stride(-1) == 1 else q.contiguous()
    sms = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 4  # 4: the interpreter
    chunk = chunk_size(b * kvh, length, sms)
    splits = -(-length // chunk)
    part = torch.empty(b * h * splits, d, device=q.device, dtype=torch.float32)
    ml = torch.empty(b * h * splits, 2, device=q.device, dtype=torch.float32)
    out = torch.empty(b, h, d, device=q.device, dtype=q.dtype)
    m, sm_b, sm_l, how = _mask_args(mask, b, length, q.device)
    partial, combine = _kernels()
    counters = _counters(b * kvh, q.device) if fused_merge(b * kvh, sms) else None
    fused = counters is not None
    sp = max(2, triton.next_power_of_2(splits))
    pdl = (2 if ATTN_EARLY else 1) if dependent_launch(q.device) else 0
    launch_kw = {"launch_pdl": True} if pdl else {}
    if rope is None:  # (unused pointers: any tensor; strides 0)
        extra = (q, q, q, q, q, 0, 0, 0, 0, 0)
    else:
        k_new, v_new, cos, sin, position = rope
        extra = (k_new, v_new, cos, sin, position, k_new.stride(0), k_new.stride(1), v_new.stride(0),
                 v_new.stride(1), cos.stride(0))

    def launch(depth: int):
        partial[(b * kvh, splits)](q, k, v, m, part, ml, counters if fused else ml, out, length, kvh, splits, scale,
                                   q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2),
                                   v.stride(0), v.stride(1), v.stride(2), sm_b, sm_l, *extra,
                                   GROUPS=groups, GP=max(16, triton.next_power_of_2(groups)), D=d,
                                   BLOCK=min(chunk, 64), CHUNK=chunk, MASK=how, MERGE=int(fused), SP=sp, PDL=pdl,
                                   ROPE=int(rope is not None), num_warps=4, num_stages=depth,
                                   **launch_kw)

    depth = stages(d, q.device)
    try:
        launch(depth)
    except triton.runtime.errors.OutOfResources:
        if depth == 1:
            raise
        _STAGES[(d, q.device)] = 1
        launch(1)
    if not fused:
        combine[(b * h,)](part, ml, out, splits, D=d, SP=sp, PDL=pdl, num_warps=4, **launch_kw)
    return out


@decode_attention.register_fake
def _(q, k, v, mask, scale):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


@torch.library.custom_op("llmcomp::decode_attention_rope", mutates_args=("k_cache", "v_cache"))
def decode_attention_rope(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, cos: torch.Tensor,
                          sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, position: torch.Tensor,
                          mask: Optional[torch.Tensor], scale: float) -> torch.Tensor:
    """The decode step's rotary embedding, cache write and attention in one launch (the partial kernel's ``ROPE``):
    q [B, H, D] and the step's key and value k_new / v_new [B, KVH, D] as the projections give them (not rotated),
    cos / sin [B, D] (the rotary embedding at the step's position, ``rotate_half`` convention), the static cache
    k_cache / v_cache [B, KVH, L, D] (written at ``position``, a one-element integer tensor on the device: the
    cache's length before the step) and the mask as ``decode_attention``'s → [B, H, D]. Where the kernel does not
    apply (no CUDA or Triton, other shapes): ``reference_rope``, in place alike."""
    b, h, d = q.shape
    groups = h // k_cache.shape[1]
    if (triton is not None and q.is_cuda and supports(q, k_cache, v_cache, groups) and k_new.stride(-1) == 1
            and v_new.stride(-1) == 1 and cos.stride(-1) == 1 and sin.stride(-1) == 1 and cos.dtype == q.dtype
            and sin.dtype == q.dtype and sin.stride(0) == cos.stride(0) and k_new.dtype == q.dtype
            and v_new.dtype == q.dtype and position.numel() == 1 and not position.is_floating_point()
            and (mask is None or mask.shape[-1] == k_cache.shape[2])):
        return _attend(q, k_cache, v_cache, mask, scale, (k_new, v_new, cos, sin, position))
    return reference_rope(q, k_new, v_new, cos, sin, k_cache, v_cache, position, mask, scale)


@decode_attention_rope.register_fake
def _(q, k_new, v_new, cos, sin, k_cache, v_cache, position, mask, scale):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """transformers' ``apply_rotary_pos_emb`` on x [B, N, D] with cos / sin [B, D], in fp32, rounded once."""
    half = x.shape[-1] // 2
    xf = x.float()
    turned = torch.cat((-xf[..., half:], xf[..., :half]), -1)
    return (xf * cos[:, None].float() + turned * sin[:, None].float()).to(x.dtype)


def reference_rope(q, k_new, v_new, cos, sin, k_cache, v_cache, position, mask, scale) -> torch.Tensor:
    """``decode_attention_rope`` in torch: the rotated key and the value into the cache at ``position``, then
    ``reference`` on the rotated query."""
    at = position.reshape(1).long()
    k_cache.index_copy_(2, at, rotate(k_new, cos, sin)[:, :, None])
    v_cache.index_copy_(2, at, v_new[:, :, None].to(v_cache.dtype))
    return reference(rotate(q, cos, sin), k_cache, v_cache, mask, scale)


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
              scale: float) -> torch.Tensor:
    """The same in torch (fp32 softmax): the kernel's test oracle and its CPU path."""
    b, h, d = q.shape
    kvh = k.shape[1]
    qg = q.reshape(b, kvh, h // kvh, d)
    scores = torch.matmul(qg.float(), k.float().transpose(-1, -2)) * scale
    if mask is not None:
        mask = mask.reshape(mask.shape[0], 1, 1, mask.shape[-1])
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.float()
    weights = torch.nan_to_num(scores.softmax(-1), nan=0.0)
    return torch.matmul(weights, v.float()).reshape(b, h, d).to(q.dtype)

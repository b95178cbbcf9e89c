"""Where a CUDA-graph decode step's time goes: the kernels of a few graph replays on the GPU's own timeline.

The eager breakdown (``decode_bench.kernel_breakdown``) says what each kernel costs; a graph replay runs the same
kernels back to back, and what separates its step time from the sum of its kernels is the time the GPU runs none
(launch latency between dependent kernels, tails). This module measures that directly from the profiler's kernel
records: busy time (the union of the kernels' intervals), idle time (the rest of the span), what the busy time was
spent on, and which kernels the GPU waited for most.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch


def timeline_stats(kernels: Iterable[tuple[str, float, float]], steps: int, kind: Callable[[str], str],
                   top: int = 8) -> dict:
    """``kernels``: ``(name, start_us, end_us)`` of every kernel of ``steps`` replays. Per step: kernels, span (first
    start to last end), busy (union of the intervals: overlapping kernels count once), idle (span − busy), the busy
    time by ``kind`` and the ``top`` kernels by it, and the ``top`` kernels the GPU sat idle before starting (gap
    since every earlier kernel had ended).

    Under programmatic dependent launch a kernel starts before the one it depends on has finished and waits, so
    its own interval includes the other's work. The busy time is therefore attributed to the *oldest* running
    kernel at each instant (the one the others wait for); the attributions sum to the busy time. A kernel's work
    done while an older one still runs (e.g. weight loads issued before its wait) counts for the older one."""
    spans = sorted((float(a), float(b), name) for name, a, b in kernels)
    if not spans:
        return {"error": "the profiler saw no kernels of the graph replays"}
    idle_before: dict[str, float] = {}
    calls: dict[str, int] = {}
    mine = [0.0] * len(spans)  # busy time attributed to each kernel (by its place in ``spans``)
    idle, reach = 0.0, spans[0][0]
    running: list[int] = []  # indices into ``spans``, oldest first: appended in ``spans``' order
    t = spans[0][0]

    def advance(until: float) -> None:
        """Attribute [t, until) to the oldest kernel still running, dropping those that end on the way."""
        nonlocal t
        while running and t < until:
            _, b, _ = spans[running[0]]
            upto = min(b, until)
            if upto > t:
                mine[running[0]] += upto - t
                t = upto
            if b <= t:
                running.pop(0)
        t = max(t, until)

    for i, (a, b, name) in enumerate(spans):
        advance(a)
        gap = max(0.0, a - reach)
        idle += gap
        idle_before[name] = idle_before.get(name, 0.0) + gap
        reach = max(reach, b)
        calls[name] = calls.get(name, 0) + 1
        running.append(i)
    advance(reach)
    own: dict[str, float] = {}  # busy time attributed to each kernel name
    for (_, _, name), us in zip(spans, mine):
        if us > 0:
            own[name] = own.get(name, 0.0) + us
    span = reach - spans[0][0]
    by_kind: dict[str, float] = {}
    for name, us in own.items():
        k = kind(name)
        by_kind[k] = by_kind.get(k, 0.0) + us

    def ms(us: float) -> float:
        return round(us / steps / 1e3, 4)

    return {"replays": steps, "kernels_per_step": round(len(spans) / steps, 1), "span_ms": ms(span),
            "busy_ms": ms(span - idle), "idle_ms": ms(idle),
            "ms_per_step": {k: ms(v) for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
            "top": [{"name": n[:160], "calls_per_step": round(calls[n] / steps, 2), "us_per_step": round(us / steps, 2)}
                    for n, us in sorted(own.items(), key=lambda kv: -kv[1])[:top]],
            "idle_before": [{"name": n[:160], "us_per_step": round(us / steps, 2)}
                            for n, us in sorted(idle_before.items(), key=lambda kv: -kv[1])[:top] if us > 0],
            "layer": layer_sequence([name for _, _, name in spans], mine, steps)}


def periodic_run(names: list[str], max_period: int = 96) -> tuple[int, int, int]:
    """(start, period, repeats) of the longest stretch of ``names`` made of one sequence repeated (a decoder layer's
    kernels, layer after layer), by the kernels it covers; the shortest period among equals. (0, 0, 0) if nothing
    repeats twice."""
    best, cover = (0, 0, 0), 0
    for p in range(1, min(max_period, len(names) // 2) + 1):
        run = 0
        for i in range(len(names) - p + 1):
            if i < len(names) - p and names[i] == names[i + p]:
                run += 1
                continue
            reps = (run + p) // p  # names[i - run : i + p] repeats with period p
            if reps >= 2 and reps * p > cover:
                best, cover = (i - run, p, reps), reps * p
            run = 0
    return best


def layer_sequence(names: list[str], mine: list[float], steps: int) -> dict:
    """One decoder layer of the replayed step, kernel by kernel in launch order: ``periodic_run`` over the first
    replay's kernels finds the layer (its first kernel wherever the repetition begins), and each place gets the
    median of its attributed busy time over every layer and replay. The linears of a layer share kernel names
    (o and down run the same instantiation), so only this view tells them apart. {} if the replays differ in length
    or nothing repeats."""
    if not names or len(names) % steps:
        return {}
    n = len(names) // steps
    start, period, reps = periodic_run(names[:n])
    if not period:
        return {}
    kernels = []
    for j in range(period):
        at = [r * n + start + q * period + j for r in range(steps) for q in range(reps)]
        us = sorted(mine[i] for i in at)
        kernels.append({"name": names[start + j][:100], "us": round(us[len(us) // 2], 2)})
    return {"period": period, "repeats": reps, "us": round(sum(k["us"] for k in kernels), 2), "kernels": kernels}


@torch.no_grad()
def graph_timeline(replay: Callable[[], None], kind: Callable[[str], str], steps: int = 3) -> dict:
    """Profile ``steps`` calls of ``replay`` (a CUDA graph's replay) and return ``timeline_stats`` of the device
    records the profiler saw (kernels, copies, sets)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            replay()
        torch.cuda.synchronize()
    records = [(e.name, e.time_range.start, e.time_range.end) for e in prof.events()
               if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)]  # kernels, not ranges
    return timeline_stats(records, steps, kind)

"""Where a CUDA-graph decode step's time goes: the kernels of a few graph replays on the GPU's own timeline.

The eager breakdown (``decode_bench.kernel_breakdown``) says what each kernel costs; a graph replay runs the same
kernels back to back, and what separates its step time from the sum of its kernels is the time the GPU runs none
(launch latency between dependent kernels, tails). This module measures that directly from the profiler's kernel
records: busy time (the union of the kernels' intervals), idle time (the rest of the span) and which kernels the
GPU waited for most.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch


def timeline_stats(kernels: Iterable[tuple[str, float, float]], steps: int, kind: Callable[[str], str],
                   top: int = 8) -> dict:
    """``kernels``: ``(name, start_us, end_us)`` of every kernel of ``steps`` replays. Per step: kernels, span (first
    start to last end), busy (union of the intervals: overlapping kernels count once), idle (span − busy), device
    time by ``kind`` (overlaps counted in each kernel), the ``top`` kernels by time and the ``top`` kernels the GPU
    sat idle before starting (gap since every earlier kernel had ended)."""
    spans = sorted((float(a), float(b), name) for name, a, b in kernels)
    if not spans:
        return {"error": "the profiler saw no kernels of the graph replays"}
    idle_before: dict[str, float] = {}
    cost: dict[str, list] = {}
    by_kind: dict[str, float] = {}
    idle, reach = 0.0, spans[0][0]
    for a, b, name in spans:
        gap = max(0.0, a - reach)
        idle += gap
        idle_before[name] = idle_before.get(name, 0.0) + gap
        reach = max(reach, b)
        c = cost.setdefault(name, [0, 0.0])
        c[0] += 1
        c[1] += b - a
        by_kind[kind(name)] = by_kind.get(kind(name), 0.0) + (b - a)
    span = reach - spans[0][0]

    def ms(us: float) -> float:
        return round(us / steps / 1e3, 4)

    return {"replays": steps, "kernels_per_step": round(len(spans) / steps, 1), "span_ms": ms(span),
            "busy_ms": ms(span - idle), "idle_ms": ms(idle),
            "ms_per_step": {k: ms(v) for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
            "top": [{"name": n[:160], "calls_per_step": round(c / steps, 2), "us_per_step": round(us / steps, 2)}
                    for n, (c, us) in sorted(cost.items(), key=lambda kv: -kv[1][1])[:top]],
            "idle_before": [{"name": n[:160], "us_per_step": round(us / steps, 2)}
                            for n, us in sorted(idle_before.items(), key=lambda kv: -kv[1])[:top] if us > 0]}


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
               if e.device_type == DeviceType.CUDA]
    return timeline_stats(records, steps, kind)

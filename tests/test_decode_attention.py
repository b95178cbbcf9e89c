"""The split-KV decode attention kernel (llmcomp.kernels.decode_attention) against its torch reference: on CPU under
Triton's interpreter where Triton is installed (fp16: the interpreter has no bf16), on CUDA in both dtypes, and in
the decode runner's packed attention on a real decode."""
import os

import pytest
import torch

from llmcomp.kernels import decode_attention as da

CASES = [  # batch, query heads, kv heads, cache length, head dim, valid positions (None: no mask), mask kind
    (1, 32, 8, 200, 128, 150, "bool"),
    (2, 8, 2, 70, 64, None, None),
    (3, 12, 4, 300, 64, 100, "float"),
    (1, 4, 4, 64, 128, 1, "bool"),
    (2, 16, 1, 1000, 128, 999, "bool"),  # 16 query heads a kv head; several blocks a chunk
    (1, 8, 2, 700, 64, 600, "holes"),  # whole blocks masked inside the attended range
    (2, 8, 1, 500, 128, 450, "float-holes"),
    (1, 4, 1, 300, 64, 63, "bool"),  # chunks with nothing to attend after the first
    (1, 4, 1, 300, 64, 63, "float"),
    (2, 8, 2, 300, 64, 200, "none-left"),  # a sequence with no position to attend: zeros
]


def _inputs(b, h, kvh, length, d, valid, kind, dtype, device):
    g = torch.Generator().manual_seed(b * 1000 + length)
    q, k, v = (torch.randn(*s, generator=g).to(device, dtype) for s in ((b, h, d), (b, kvh, length, d), (b, kvh, length, d)))
    if kind == "bool":
        mask = torch.zeros(b, 1, 1, length, dtype=torch.bool)
        mask[..., :valid] = True
        if b > 1:
            mask[1, ..., :5] = False  # a sequence with left padding
    elif kind == "float":
        mask = torch.randn(b, 1, 1, length, generator=g)
        mask[0, ..., valid:] = float("-inf")
    elif kind == "holes":
        mask = torch.zeros(b, 1, 1, length, dtype=torch.bool)
        mask[..., :valid] = True
        mask[..., 70:300] = False  # spans whole 64-position blocks
        mask[..., 3] = False
    elif kind == "float-holes":
        mask = torch.randn(b, 1, 1, length, generator=g)
        mask[..., valid:] = float("-inf")
        mask[..., 10:200] = float("-inf")
    elif kind == "none-left":
        mask = torch.zeros(b, 1, 1, length, dtype=torch.bool)
        mask[0, ..., :valid] = True
    else:
        mask = None
    return q, k, v, None if mask is None else mask.to(device)


def _check(case, dtype, device, tol):
    q, k, v, mask = _inputs(*case, dtype, device)
    d = q.shape[-1]
    got = da.decode_attention(q, k, v, mask, d ** -0.5)
    want = da.reference(q, k, v, mask, d ** -0.5)
    assert got.shape == q.shape and got.dtype == dtype
    err = (got.float() - want.float()).abs().max().item()
    assert err <= tol * max(want.float().abs().max().item(), 1.0), (case, err)


ROPE_CASES = [  # batch, query heads, kv heads, cache length, head dim, the step's position, mask kind
    (1, 32, 8, 576, 128, 520, "bool"),
    (2, 8, 2, 300, 64, 63, "bool"),  # the last position of the first chunk
    (2, 8, 2, 300, 64, 64, "bool"),  # the first of the second
    (1, 16, 1, 1000, 128, 999, "bool"),  # several blocks a chunk, the cache's last position
    (2, 8, 2, 70, 64, 69, None),  # no mask
]


def _rope_inputs(b, h, kvh, length, d, at, kind, dtype, device):
    """As the decode step has them: q, k and v slices of one stacked projection output, cos / sin of random angles
    (``rotate_half`` layout), a cache of stale values (at the step's position too), the mask attending up to it."""
    g = torch.Generator().manual_seed(b * 100 + at)
    qkv = torch.randn(b, (h + 2 * kvh) * d, generator=g)
    caches = [torch.randn(b, kvh, length, d, generator=g) for _ in range(2)]
    angle = torch.rand(b, d // 2, generator=g) * 6
    cos, sin = torch.cat((angle, angle), -1).cos(), torch.cat((angle, angle), -1).sin()
    mask = None
    if kind == "bool":
        mask = torch.zeros(b, 1, 1, length, dtype=torch.bool)
        mask[..., :at + 1] = True
        if b > 1:
            mask[1, ..., :5] = False  # a sequence with left padding
    dev = [t.to(device, dtype) for t in (qkv, *caches, cos, sin)]
    q, k_new, v_new = (t.reshape(b, -1, d) for t in dev[0].split([h * d, kvh * d, kvh * d], -1))
    return (q, k_new, v_new, dev[3], dev[4], dev[1], dev[2], torch.tensor([at], device=device),
            None if mask is None else mask.to(device))


def _check_rope(case, dtype, device, tol, call=None):
    """The fused call (``call``: by default the op) against ``reference_rope`` on copies of the cache: the output
    within ``tol``, the value written as it is, the rotated key within an ulp, the rest of the cache untouched."""
    q, k_new, v_new, cos, sin, k_cache, v_cache, pos, mask = _rope_inputs(*case, dtype, device)
    d, at = q.shape[-1], case[5]
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    before = k_cache.clone()
    want = da.reference_rope(q, k_new, v_new, cos, sin, ref_k, ref_v, pos, mask, d ** -0.5)
    call = call or da.decode_attention_rope
    got = call(q, k_new, v_new, cos, sin, k_cache, v_cache, pos, mask, d ** -0.5)
    assert got.shape == q.shape and got.dtype == dtype
    assert torch.equal(v_cache, ref_v)
    others = torch.ones(k_cache.shape[2], dtype=torch.bool, device=device)
    others[at] = False
    assert torch.equal(k_cache[:, :, others], before[:, :, others])
    kerr = (k_cache[:, :, at].float() - ref_k[:, :, at].float()).abs().max().item()
    assert kerr <= 2 ** -7 * max(ref_k[:, :, at].float().abs().max().item(), 1.0), (case, kerr)
    err = (got.float() - want.float()).abs().max().item()
    assert err <= tol * max(want.float().abs().max().item(), 1.0), (case, err)


def _attend_rope(q, k_new, v_new, cos, sin, k_cache, v_cache, pos, mask, scale):
    """The kernels with ``ROPE`` as the op launches them, without the op's CUDA check (the interpreter runs on CPU)."""
    return da._attend(q, k_cache, v_cache, mask, scale, (k_new, v_new, cos, sin, pos))


def test_rope_reference_rotates_as_transformers_and_writes_the_cache():
    """``rotate`` is transformers' ``apply_rotary_pos_emb`` (fp32 here: the same numbers); the op on CPU (its torch
    path) writes the rotated key and the value at the position and attends as ``reference`` on the rotated query."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    q, k_new, v_new, cos, sin, *_ = _rope_inputs(*ROPE_CASES[1], torch.float32, "cpu")
    want_q, want_k = apply_rotary_pos_emb(q[:, :, None], k_new[:, :, None], cos[:, None], sin[:, None])
    assert torch.allclose(da.rotate(q, cos, sin), want_q[:, :, 0], atol=1e-6)
    assert torch.allclose(da.rotate(k_new, cos, sin), want_k[:, :, 0], atol=1e-6)
    for case in ROPE_CASES:
        _check_rope(case, torch.float32, "cpu", 1e-6)
    q, k_new, v_new, cos, sin, k_cache, v_cache, pos, mask = _rope_inputs(*ROPE_CASES[0], torch.float32, "cpu")
    got = da.decode_attention_rope(q, k_new, v_new, cos, sin, k_cache, v_cache, pos, mask, 0.1)
    assert torch.equal(v_cache[:, :, 520], v_new) and torch.allclose(k_cache[:, :, 520], da.rotate(k_new, cos, sin))
    assert torch.allclose(got, da.reference(da.rotate(q, cos, sin), k_cache, v_cache, mask, 0.1))


def test_rope_kernel_matches_reference_in_the_interpreter():
    """The partial kernel's ``ROPE`` (rotary embedding, cache write, the new key and value from registers) under
    Triton's interpreter (fp16), both merges."""
    import subprocess
    import sys

    pytest.importorskip("triton")
    code = ("import torch, test_decode_attention as t\n"
            "for fused in (True, False):\n    t.da.FUSED_MERGE = fused\n"
            "    for case in t.ROPE_CASES:\n"
            "        t._check_rope(case, torch.float16, 'cpu', 2e-3, t._attend_rope)\n"
            "print('ok')")
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join([os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


def test_kernel_matches_reference_in_the_interpreter():
    """CPU (where Triton is installed; CI has none): a fresh process, since the interpreter is chosen at import. Both
    merges (in the partial kernel by the chunk that finishes last, and the separate combine kernel); the counters
    are back at zero after; a sequence with nothing to attend gives exact zeros through the fused merge."""
    import subprocess
    import sys

    pytest.importorskip("triton")
    code = ("import torch, test_decode_attention as t\n"
            "for fused in (True, False):\n    t.da.FUSED_MERGE = fused\n"
            "    for case in t.CASES[:4] + t.CASES[5:]:\n        t._check(case, torch.float16, 'cpu', 2e-3)\n"
            "assert int(t.da._COUNTERS[torch.device('cpu')].abs().sum()) == 0\n"
            "t.da.FUSED_MERGE = True\nq, k, v, mask = t._inputs(*t.CASES[-1], torch.float16, 'cpu')\n"
            "assert torch.equal(t.da.decode_attention(q, k, v, mask, 0.125)[1], torch.zeros_like(q[1]))\nprint('ok')")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join([os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


def test_a_launch_out_of_shared_memory_is_retried_unpipelined(monkeypatch):
    """Head dim 256 asks for 2 pipeline stages (3 do not fit 99 KB GPUs); should a launch still run out of shared
    memory, it is retried with 1 and that depth kept for the head dim and device."""
    triton = pytest.importorskip("triton")
    depths = []

    class Partial:
        def __getitem__(self, grid):
            def launch(*args, num_stages, **kwargs):
                depths.append(num_stages)
                if num_stages > 1:
                    raise triton.runtime.errors.OutOfResources(141312, 101376, "shared memory")
            return launch

    class Combine:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: None

    monkeypatch.setattr(da, "_kernels", lambda: (Partial(), Combine()))
    monkeypatch.setattr(da, "_STAGES", {})
    q, kv = torch.zeros(1, 4, 256), torch.zeros(1, 1, 100, 256)
    assert da.stages(128, q.device) == da.NUM_STAGES and da.stages(256, q.device) == 2
    da.decode_attention._init_fn(q, kv, kv, None, 0.1)
    assert depths == [2, 1] and da.stages(256, q.device) == 1
    da.decode_attention._init_fn(q, kv, kv, None, 0.1)
    assert depths == [2, 1, 1]


def test_the_merge_is_fused_with_many_heads(monkeypatch):
    monkeypatch.setattr(da, "FUSED_MERGE", None)
    assert not da.fused_merge(8, 132) and da.fused_merge(128, 132)  # batch 1 / 16 of an 8-kv-head model, H200
    monkeypatch.setattr(da, "FUSED_MERGE", True)
    assert da.fused_merge(8, 132)


def test_chunks_fill_the_gpu():
    assert da.chunk_size(8, 576, 132) == 64  # batch 1 of an 8-kv-head model: 9 chunks, 72 programs
    assert da.chunk_size(128, 576, 132) == 256  # batch 16: 3 chunks a head, 384 programs
    assert -(-8192 // da.chunk_size(8, 8192, 132)) <= da.MAX_SPLITS


def test_chunk_size_can_be_fixed(monkeypatch):
    """``CHUNK`` (LLMCOMP_ATTN_CHUNK) fixes the positions a program, raised only past MAX_SPLITS chunks; a value that
    is not a power of two ≥ 64 is ignored with a warning."""
    monkeypatch.setattr(da, "CHUNK", 256)
    assert da.chunk_size(8, 576, 132) == 256 and da.chunk_size(128, 576, 132) == 256
    assert da.chunk_size(8, 65536, 132) == 2048  # 32 chunks, not 256
    for text, want in [("512", 512), ("96", None), ("32", None), ("x", None), ("", None)]:
        monkeypatch.setenv("LLMCOMP_ATTN_CHUNK", text)
        if want is None and text:
            with pytest.warns(UserWarning, match="LLMCOMP_ATTN_CHUNK"):
                assert da._chunk_override() is None
        else:
            assert da._chunk_override() == want
    kv = torch.zeros(1, 2, 4, 128)
    assert not da.supports(torch.zeros(1, 8, 128), kv, kv, 4)  # CPU tensors: the torch path


@pytest.mark.cuda
@pytest.mark.parametrize("merge", [None, True, False], ids=["rule", "fused", "separate"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("rope, case", [(False, c) for c in CASES] + [(True, c) for c in ROPE_CASES],
                         ids=[str(c) for c in CASES] + [f"rope-{c}" for c in ROPE_CASES])
def test_kernel_matches_reference_on_cuda(rope, case, dtype, merge, monkeypatch):
    """Both kernels' forms (``decode_attention``; ``decode_attention_rope``: rotary embedding and cache write too)."""
    monkeypatch.setattr(da, "FUSED_MERGE", merge)
    (_check_rope if rope else _check)(case, dtype, "cuda", 1e-2)


@pytest.mark.cuda
@pytest.mark.parametrize("merge", [True, False], ids=["fused", "separate"])
@pytest.mark.parametrize("early", [False, True], ids=["wait_first", "trigger_first"])
def test_dependent_launch_gives_the_same_bits(merge, early, monkeypatch):
    """LLMCOMP_ATTN_PDL: both kernels launched as programmatic dependents (sm_90+) — eager and replayed in a CUDA
    graph, the output bit-equal to the ordinary launch's (the same kernels, only the launch attribute differs), with
    the next kernel let launch before the wait (LLMCOMP_ATTN_EARLY, the default) or after it."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("programmatic dependent launch needs sm_90+")
    monkeypatch.setattr(da, "FUSED_MERGE", merge)
    monkeypatch.setattr(da, "ATTN_EARLY", early)
    q, k, v, mask = _inputs(1, 32, 8, 576, 128, 520, "bool", torch.bfloat16, "cuda")
    plain = da.decode_attention(q, k, v, mask, 128 ** -0.5)
    monkeypatch.setattr(da, "ATTN_PDL", True)
    assert da.dependent_launch(q.device)
    assert torch.equal(da.decode_attention(q, k, v, mask, 128 ** -0.5), plain)
    _replay_equals(q, k, v, mask, plain)


@pytest.mark.cuda
def test_fused_merge_replays_in_a_graph():
    """The merge in the partial kernel resets its counters itself: a CUDA graph of the op replayed many times gives
    the eager result every time, equal to the separate combine kernel's within rounding, counters zero after."""
    q, k, v, mask = _inputs(2, 32, 8, 576, 128, 520, "bool", torch.bfloat16, "cuda")
    before = da.FUSED_MERGE
    try:
        da.FUSED_MERGE = False
        separate = da.decode_attention(q, k, v, mask, 128 ** -0.5)
        da.FUSED_MERGE = True
        eager = da.decode_attention(q, k, v, mask, 128 ** -0.5)
        _replay_equals(q, k, v, mask, eager)
    finally:
        da.FUSED_MERGE = before
    assert (eager.float() - separate.float()).abs().max() <= 1e-2 * separate.float().abs().max()
    assert int(da._COUNTERS[q.device].abs().sum()) == 0


@pytest.mark.cuda
def test_a_call_captured_before_any_counters_merges_separately(monkeypatch):
    """Counters made during capture would be zeroed only by a replay: a first fused call inside capture merges with
    the separate kernel instead (same result), and makes no counters."""
    q, k, v, mask = _inputs(2, 32, 8, 576, 128, 520, "bool", torch.bfloat16, "cuda")
    monkeypatch.setattr(da, "FUSED_MERGE", False)
    eager = da.decode_attention(q, k, v, mask, 128 ** -0.5)  # (compiles the kernels outside capture)
    monkeypatch.setattr(da, "FUSED_MERGE", True)
    monkeypatch.setattr(da, "_COUNTERS", {})
    _replay_equals(q, k, v, mask, eager, warm=False)
    assert not da._COUNTERS


def _replay_equals(q, k, v, mask, eager, warm=True):
    graph, stream = torch.cuda.CUDAGraph(), torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        if warm:
            da.decode_attention(q, k, v, mask, 128 ** -0.5)
        with torch.cuda.graph(graph, stream=stream):
            out = da.decode_attention(q, k, v, mask, 128 ** -0.5)
    torch.cuda.current_stream().wait_stream(stream)
    for _ in range(20):
        out.zero_()
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, eager)


@pytest.mark.cuda
def test_all_masked_rows_give_zeros_and_the_op_traces():
    q, k, v, mask = _inputs(2, 8, 2, 128, 64, 10, "bool", torch.bfloat16, "cuda")
    mask[0] = False
    got = torch.compile(da.decode_attention, fullgraph=True)(q, k, v, mask, 0.125)
    assert torch.equal(got[0], torch.zeros_like(got[0]))
    want = da.reference(q, k, v, mask, 0.125)
    assert (got[1].float() - want[1].float()).abs().max() <= 1e-2 * want[1].float().abs().max()


@pytest.mark.cuda
def test_packed_decode_with_the_kernel_equals_transformers_sdpa(monkeypatch):
    """A 2-layer 8B-shaped model decodes the same tokens through the kernel as through transformers' SDPA path."""
    from llmcomp.eval import decode_attention as packed
    from llmcomp.eval import decode_bench as db
    from tests.conftest import static_decode

    calls = []
    real = da.decode_attention

    def spy(*args):
        calls.append(args[0].shape)
        return real(*args)

    model = db.synthetic_model("llama3-8b", layers=2)
    ids = torch.randint(0, 128256, (2, 24), generator=torch.Generator().manual_seed(0)).cuda()
    _, ref, ref_tokens = static_decode(model, ids, steps=4, max_len=40)
    monkeypatch.setattr(da, "decode_attention", spy)
    monkeypatch.setenv("LLMCOMP_DECODE_ATTENTION", "triton")
    with packed.packed_gqa(model) as on:
        assert on
        _, got, tokens = static_decode(model, ids, steps=4, max_len=40)
    assert len(calls) == 4 * 2 and calls[0] == (2, 32, 128)
    assert all(torch.equal(a, b) for a, b in zip(tokens, ref_tokens))
    assert all((a.float() - b.float()).abs().max() <= 2e-2 * b.float().abs().max() for a, b in zip(got, ref))

"""KV-cache policies (llmcomp.prune.kv): exactness when lossless, formats, compression, artifacts, bad input."""
import json

import pytest
import torch
from typer.testing import CliRunner

from conftest import tiny_llama
from llmcomp import api
from llmcomp.cli.app import app
from llmcomp.core.artifact import read_manifest
from llmcomp.errors import UserError
from llmcomp.prune.kv import (A2SFConfig, CSKVConfig, DuoConfig, H2OConfig, KIVIConfig, MustafarConfig,
                              StreamingConfig, install, installed_policy, uninstall)
from llmcomp.prune.kv import bitmap
from llmcomp.prune.kv.attention import eager_attention
from llmcomp.prune.kv.evict import EvictionLayer
from llmcomp.prune.kv.kivi import dequantize_rows, quantize_rows
from llmcomp.core.hfcompat import cache_kwarg as cache_kw, output_cache

CHUNKS = (24, 8, 1, 1, 6, 12)  # prefill, a teacher-forced chunk over the held cache, decode steps, more chunks


class CharTokenizer:
    """Characters → ids < 128: enough for the calibration and passkey code paths on tiny models."""

    pad_token_id = eos_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) % 128 for c in text]}

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(int(i)) for i in ids)


def run_chunks(model, ids, chunks=CHUNKS, mask=None):
    """Logits of ``ids`` fed through the model's cache in chunks; returns (logits, cache)."""
    out, cache, s = [], None, 0
    for c in chunks:
        kw = {} if mask is None else {"attention_mask": mask[:, :s + c]}
        o = model(input_ids=ids[:, s:s + c], **{cache_kw(model): cache}, use_cache=True, **kw)
        cache, s = output_cache(o), s + c
        out.append(o.logits)
    return torch.cat(out, 1), cache


def tiny(arch="llama"):
    if arch == "llama":
        return tiny_llama()
    from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    kw = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              vocab_size=128, max_position_embeddings=256)
    if arch == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**kw)).eval()
    if arch in ("qwen2_moe", "mixtral"):  # (convert moefy writes these)
        from test_experts import tiny_moe

        return tiny_moe(arch)
    return MistralForCausalLM(MistralConfig(**kw, sliding_window=None)).eval()


def with_bases(model, cfg):
    cfg.calibrate(model, None)
    return cfg


# Lossless settings of every policy. Scored eviction computes eager attention (it needs the probabilities),
# so it reproduces the eager dense model; the others make transformers' own SDPA call.
LOSSLESS = {
    "mustafar": (lambda m: MustafarConfig(0, 0, window=4), "sdpa"),
    "kivi": (lambda m: KIVIConfig(bits=2, group=8, residual=128), "sdpa"),
    "streaming": (lambda m: StreamingConfig(ratio=0), "sdpa"),
    "h2o": (lambda m: H2OConfig(ratio=0), "eager"),
    "a2sf": (lambda m: A2SFConfig(ratio=0, forget=0.5), "eager"),
    "duo": (lambda m: DuoConfig(streaming=0, heads=("11", "11")), "sdpa"),
    "cskv": (lambda m: with_bases(m, CSKVConfig(k_ratio=0, v_ratio=0, window=4, activation_aware=False)), "sdpa"),
}


@pytest.mark.parametrize("name", LOSSLESS)
def test_ratio_zero_reproduces_dense_logits_exactly(name):
    model = tiny()
    make, impl = LOSSLESS[name]
    model.set_attn_implementation(impl)
    ids = torch.randint(0, 128, (2, sum(CHUNKS)), generator=torch.Generator().manual_seed(1))
    ref, dense = run_chunks(model, ids)
    install(model, make(model))
    got, cache = run_chunks(model, ids)
    assert type(cache).__name__ == "KVCache" and cache.get_seq_length() == ids.shape[1]
    assert torch.equal(got, ref)
    uninstall(model)
    assert model.config._attn_implementation == impl
    assert torch.equal(run_chunks(model, ids)[0], ref)


@pytest.mark.parametrize("arch", ["qwen2", "mistral", "qwen2_moe", "mixtral"])
def test_other_supported_attention_classes(arch):
    model = tiny(arch)
    ids = torch.randint(0, 128, (1, sum(CHUNKS)), generator=torch.Generator().manual_seed(2))
    ref, _ = run_chunks(model, ids)
    install(model, MustafarConfig(0, 0, window=4))
    assert torch.equal(run_chunks(model, ids)[0], ref)


@pytest.mark.parametrize("arch", ["qwen2_moe", "mixtral"])
def test_a_moefied_model_takes_a_kv_policy(arch, tmp_path):
    """convert moefy writes a Qwen2-MoE or Mixtral model, whose attention is Qwen2's / Llama's: prune kv refused it
    (KV policies do not support Qwen2MoeAttention). The artifact reloads with its policy and generates as dense."""
    tiny(arch).save_pretrained(tmp_path / "moe")
    out = api.prune_kv(StreamingConfig(ratio=0), tmp_path / "kv", str(tmp_path / "moe"))
    model, dense = api.load(out), api.load(tmp_path / "moe")
    ids = torch.randint(2, 128, (1, 12), generator=torch.Generator().manual_seed(4))
    kw = dict(max_new_tokens=6, do_sample=False, return_dict_in_generate=True)
    got, ref = model.generate(ids, **kw), dense.generate(ids, **kw)
    assert type(output_cache(got)).__name__ == "KVCache" and torch.equal(got.sequences, ref.sequences)


def test_an_attention_class_of_the_name_but_an_older_forward_is_refused():
    """transformers 4.56's Qwen2MoeAttention, of a supported name, computes its softmax by hand (no ``scaling``, no
    attention interface): a policy would never run there, and linearize's student reads ``scaling``."""
    from llmcomp.linearize.distill import LinearizeConfig
    from llmcomp.linearize.student import LinearAttention, check_supported as linearize_check
    from llmcomp.prune.kv.cache import check_supported

    model = tiny("qwen2_moe")
    del model.model.layers[1].self_attn.scaling
    with pytest.raises(UserError, match=r"KV policies do not support Qwen2MoeAttention \(model\.layers\.1\."):
        check_supported(model)
    with pytest.raises(UserError, match=r"linearize does not support the attention class Qwen2MoeAttention"):
        linearize_check(model)
    with pytest.raises(UserError, match=r"linearize does not support the attention class Qwen2MoeAttention"):
        LinearAttention(model.model.layers[1].self_attn, LinearizeConfig().spec())  # (the student's own check)


def test_generate_applies_the_policy_and_is_exact_when_lossless():
    model = tiny()
    ids = torch.randint(1, 128, (2, 20), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[0, :6] = 0  # left padding stays masked inside the policy cache
    kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    ref = model.generate(ids, **kw)
    install(model, MustafarConfig(0, 0, window=2))
    assert torch.equal(model.generate(ids, **kw), ref)
    out = model.generate(ids, return_dict_in_generate=True, **kw)
    assert type(output_cache(out)).__name__ == "KVCache"
    install(model, H2OConfig(budget=8))
    cache = model.generate(ids, return_dict_in_generate=True, **kw)
    cache = output_cache(cache)
    assert cache.layers[0].k.shape[-2] == 8 and cache.get_seq_length() == 25  # the last token is not fed back
    # use_cache=False stays dense (the attention falls back to SDPA)
    uninstall(model)
    dense = model(input_ids=ids, use_cache=False).logits
    install(model, H2OConfig(budget=4))
    assert torch.equal(model(input_ids=ids, use_cache=False).logits, dense)


LOSSY = {
    "mustafar": MustafarConfig(0.5, 0.7, window=4),
    "kivi": KIVIConfig(bits=2, group=8, residual=8),
    "streaming": StreamingConfig(budget=16, sinks=2),
    "h2o": H2OConfig(ratio=0.5),
    "a2sf": A2SFConfig(ratio=0.5),
    "duo": DuoConfig(streaming=0.5, sinks=2, window=8, heads=("10", "01")),
    "cskv": CSKVConfig(k_ratio=0.5, v_ratio=0.75, window=4, activation_aware=False),
}


@pytest.mark.parametrize("name", LOSSY)
def test_policies_hold_fewer_bytes_and_change_little(name):
    model = tiny()
    ids = torch.randint(0, 128, (2, sum(CHUNKS)), generator=torch.Generator().manual_seed(4))
    ref, dense = run_chunks(model, ids)
    cfg = LOSSY[name]
    if name == "cskv":
        cfg.calibrate(model, None)
    install(model, cfg)
    got, cache = run_chunks(model, ids)
    dense_bytes = sum(t.numel() * t.element_size() for layer in dense.layers for t in (layer.keys, layer.values))
    assert cache.dense_nbytes() == dense_bytes
    assert 0 < cache.nbytes() < 0.8 * dense_bytes
    assert torch.isfinite(got).all() and not torch.equal(got, ref)
    assert (got - ref).abs().max() < 2.0


def test_byte_accounting_counts_every_held_tensor():
    model = tiny()
    ids = torch.randint(0, 128, (1, 40))
    install(model, MustafarConfig(0.5, 0.5, window=4))
    _, cache = run_chunks(model, ids, chunks=(40,))
    layer = cache.layers[0]
    d, hkv = 16, 2
    # 36 pruned tokens: bitmap (d/8 bytes) + int32 offset + 8 fp32 values per row; 4 dense tokens
    assert layer.nbytes() == 2 * (36 * hkv * (d // 8 + 4 + 8 * 4) + 4 * hkv * d * 4)
    install(model, KIVIConfig(bits=2, group=8, residual=8))
    _, cache = run_chunks(model, ids, chunks=(40,))
    layer = cache.layers[0]
    keys = 40 // 8 * hkv * d * (8 * 2 // 8 + 2 + 2)  # per channel and group of 8 tokens: codes + fp16 scale + min
    values = 32 * hkv * (d // 8) * (8 * 2 // 8 + 2 + 2) + 8 * hkv * d * 4  # per token and 8 channels; residual
    assert layer.kr.shape[-2] == 0 and layer.nbytes() == keys + values


def test_bitmap_round_trip_and_concat():
    g = torch.Generator().manual_seed(0)
    for shape in [(2, 3, 5, 16), (1, 1, 7, 64), (3, 2, 1, 8)]:
        x = torch.randn(shape, generator=g)
        keep = torch.rand(shape, generator=g) < 0.4
        keep[..., 0, :] = False  # an empty row
        keep[..., -1, :] = True  # a full row
        r = bitmap.compress(x, keep)
        assert torch.equal(r.to_dense(), x * keep) and torch.equal(r.mask(), keep)
        assert r.nbytes() == keep.numel() // 8 + 4 * keep[..., 0].numel() + 4 * int(keep.sum())
        y = torch.randn(*shape[:-2], 4, shape[-1], generator=g).half()
        ky = torch.rand(y.shape, generator=g) < 0.7
        both = bitmap.concat(bitmap.compress(x.half(), keep), bitmap.compress(y, ky))
        assert torch.equal(both.to_dense(), torch.cat([x.half() * keep, y * ky], -2))
        # offsets give random access to each row's entries
        m = both.mask()
        idx = both.offsets.long()[..., None] + m.long().cumsum(-1) - 1
        assert torch.equal(torch.where(m, both.values[idx.clamp(0, both.values.numel() - 1)], 0).half(),
                           both.to_dense())


def test_magnitude_keep_is_per_token_top_k():
    x = torch.randn(2, 3, 10, 16)
    for s, k in [(0.0, 16), (0.5, 8), (0.7, 5), (0.99, 1)]:
        keep = bitmap.magnitude_keep(x, s)
        assert (keep.sum(-1) == k).all()
        smallest_kept = torch.where(keep, x.abs(), torch.inf).amin(-1)
        largest_dropped = torch.where(keep, -torch.inf, x.abs()).amax(-1)
        assert (smallest_kept >= largest_dropped).all()


@pytest.mark.parametrize("q_len", [1, 3])
def test_sparse_attention_reference_equals_dense_over_masked_cache(q_len):
    g = torch.Generator().manual_seed(5)
    b, h, hkv, t, w, d = 2, 6, 2, 37, 4, 16
    q = torch.randn(b, h, q_len, d, generator=g)
    k, v = torch.randn(b, hkv, t, d, generator=g), torch.randn(b, hkv, t, d, generator=g)
    kd, vd = torch.randn(b, hkv, w + q_len, d, generator=g), torch.randn(b, hkv, w + q_len, d, generator=g)
    ks = bitmap.compress(k, bitmap.magnitude_keep(k, 0.6))
    vs = bitmap.compress(v, bitmap.magnitude_keep(v, 0.3))
    sparse_mask = torch.rand(b, 1, q_len, t, generator=g) < 0.8
    dense_mask = torch.ones(q_len, w + q_len, dtype=torch.bool).tril(w)[None, None]
    got = bitmap.sparse_attention(q, ks, vs, kd, vd, sparse_mask, dense_mask, 0.25)
    mask = torch.cat([sparse_mask, dense_mask.expand(b, 1, q_len, w + q_len)], -1)
    ref, _ = eager_attention(q, torch.cat([ks.to_dense(), kd], -2), torch.cat([vs.to_dense(), vd], -2), mask, 0.25)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_eviction_keeps_sinks_recent_and_heavy_hitters():
    k = torch.randn(1, 1, 10, 8)
    stream = EvictionLayer(0, None, ratio=0, budget=5, sinks=2)
    stream.lazy_initialization(k, k)
    stream.append(k, k, None)
    assert stream.pos.flatten().tolist() == [0, 1, 7, 8, 9]
    probs = torch.linspace(0.01, 0.011, 10).expand(1, 2, 10, 10).clone()  # two query heads share the KV head
    probs[..., 3] = 1.0  # token 3 is a heavy hitter
    probs[..., 5] = 0.0
    probs[:, :, :2, 5] = 3.0  # token 5 got attention from the two oldest queries only
    h2o = EvictionLayer(0, None, ratio=0, budget=4, recent=0.5, forget=1.0)
    h2o.lazy_initialization(k, k)
    h2o.append(k, k, probs)
    assert h2o.pos.flatten().tolist() == [3, 5, 8, 9]
    a2sf = EvictionLayer(0, None, ratio=0, budget=4, recent=0.5, forget=0.5)  # old queries forgotten
    a2sf.lazy_initialization(k, k)
    a2sf.append(k, k, probs)
    assert a2sf.pos.flatten().tolist() == [3, 7, 8, 9]


def test_ratio_budget_grows_with_the_sequence():
    model = tiny()
    install(model, StreamingConfig(ratio=0.75, sinks=1))
    _, cache = run_chunks(model, torch.randint(0, 128, (1, 40)), chunks=(40,))
    assert cache.layers[1].k.shape[-2] == 10


def test_kivi_quantization():
    x = torch.randn(4, 6, 32) * torch.linspace(0.1, 10, 32)
    for bits in (2, 4):
        packed, scale, lo = quantize_rows(x, bits)
        assert packed.dtype == torch.uint8 and packed.shape[-1] == 32 * bits // 8
        err = (dequantize_rows(packed, scale, lo, bits, 32, torch.float32) - x).abs()
        assert (err <= scale.float()[..., None] / 2 + 1e-3 * x.abs().amax()).all()
    const = torch.full((2, 8), 3.0)
    assert torch.equal(dequantize_rows(*quantize_rows(const, 2), 2, 8, torch.float32), const)


def test_duo_streaming_heads_hold_sinks_and_window():
    model = tiny()
    install(model, DuoConfig(streaming=0.5, sinks=2, window=8, heads=("10", "01")))
    _, cache = run_chunks(model, torch.randint(0, 128, (1, 52)))
    layer = cache.layers[0]
    assert layer.kr.shape == (1, 1, 52, 16) and layer.ks.shape == (1, 1, 10, 16)
    assert layer.spos.tolist() == [0, 1] + list(range(44, 52))


def test_duo_calibration_selects_heads():
    model = tiny()
    cfg = DuoConfig(streaming=0.5, sinks=2, window=8, calib_steps=2, calib_seq_len=240, tail=8)
    calibrated, report = cfg.calibrate(model, CharTokenizer())
    assert len(calibrated.heads) == 2 and sum(h.count("1") for h in calibrated.heads) == 2
    gates = torch.tensor(report["gates"])
    assert gates.shape == (2, 2) and (gates >= 0).all() and (gates <= 1).all() and (gates < 1).any()
    assert model.config._attn_implementation == "sdpa" and all(p.requires_grad for p in model.parameters())


@pytest.mark.cuda
def test_duo_calibration_on_the_gpu_from_a_cpu_model():
    """prune_kv opens the model on the CPU and asks for calibration on the default device (cuda)."""
    model = tiny()
    cfg = DuoConfig(streaming=0.5, sinks=2, window=8, calib_steps=2, calib_seq_len=240, tail=8)
    calibrated, report = cfg.calibrate(model, CharTokenizer(), device="cuda")
    assert len(calibrated.heads) == 2 and torch.tensor(report["gates"]).shape == (2, 2)


def test_cskv_bases():
    model = tiny()
    cfg = CSKVConfig(k_ratio=0.5, v_ratio=0.25, window=4, calib_samples=2, calib_seq_len=64)
    _, report = cfg.calibrate(model, CharTokenizer())
    assert report == {"width": 32, "k_rank": 16, "v_rank": 24}
    basis = model.model.layers[1].self_attn.kv_basis
    for u in (basis.k_basis, basis.v_basis):
        torch.testing.assert_close(u.T @ u, torch.eye(u.shape[1]), atol=1e-5, rtol=0)
    # a full-width orthonormal basis is lossless: the un-rotate / project / re-rotate path is exact
    full = CSKVConfig(k_ratio=0.01, v_ratio=0.01, window=2, activation_aware=False)
    model2 = tiny()
    full.build_skeleton(model2, device="cpu")
    q, _ = torch.linalg.qr(torch.randn(32, 32, dtype=torch.float64))
    for m in model2.model.layers:
        m.self_attn.kv_basis.register_buffer("k_basis", q.float())
        m.self_attn.kv_basis.register_buffer("v_basis", q.float())
    ids = torch.randint(0, 128, (1, sum(CHUNKS)))
    ref, _ = run_chunks(model2, ids)
    install(model2, full)
    torch.testing.assert_close(run_chunks(model2, ids)[0], ref, atol=1e-4, rtol=1e-4)


def test_stored_duo_split_of_another_shape_refused_at_load(tiny_model_dir, tmp_path):
    """A duo stage whose head split does not fit the model (an artifact read unverified, or from before the
    manifest's seal) is one error at load, not an IndexError at the first generate."""
    from llmcomp.core import artifact

    out = api.prune_kv(DuoConfig(streaming=0.5, sinks=2, window=8, heads=("10", "01")), tmp_path / "kv",
                       str(tiny_model_dir))
    m = json.loads((out / "llmcomp.json").read_text())
    m["stages"][-1]["config"]["heads"] = ["1"]
    m[artifact.SEAL] = artifact._seal(m)
    (out / "llmcomp.json").write_text(json.dumps(m))
    with pytest.raises(UserError, match="duo heads give 1 layers"):
        api.load(str(out))


@pytest.mark.parametrize("cfg", [
    MustafarConfig(0.5, 0.5, window=4),
    CSKVConfig(k_ratio=0.5, v_ratio=0.5, window=4, activation_aware=False),
    DuoConfig(streaming=0.5, sinks=2, window=8, heads=("10", "01")),
], ids=["mustafar", "cskv", "duo"])
def test_saved_artifact_reapplies_its_policy(tiny_model_dir, tmp_path, cfg):
    out = api.prune_kv(cfg, tmp_path / "kv", str(tiny_model_dir))
    stage = read_manifest(out)["stages"][-1]
    assert stage["kind"] == "kv" and stage["method"] == f"kv-{cfg.method}"
    model = api.load(str(out))
    assert installed_policy(model) == cfg
    ids = torch.randint(0, 128, (1, sum(CHUNKS)), generator=torch.Generator().manual_seed(6))
    got, cache = run_chunks(model, ids)
    assert type(cache).__name__ == "KVCache"
    fresh = api.load(str(tiny_model_dir))
    ref, _ = run_chunks(fresh, ids)
    if cfg.method == "cskv":  # the same bases, computed again; BLAS may round differently on loaded buffers
        install(fresh, with_bases(fresh, cfg))
        torch.testing.assert_close(run_chunks(fresh, ids)[0], got, rtol=1e-5, atol=1e-6)
    else:
        install(fresh, cfg)
        assert torch.equal(run_chunks(fresh, ids)[0], got)
    assert not torch.equal(got, ref)
    with pytest.raises(UserError, match="already has a KV policy"):
        api.prune_kv(MustafarConfig(), tmp_path / "again", str(out))


@pytest.mark.parametrize("make", [
    lambda: MustafarConfig(k_sparsity=1.0), lambda: MustafarConfig(v_sparsity=-0.1),
    lambda: StreamingConfig(ratio=1), lambda: H2OConfig(ratio=1.5), lambda: A2SFConfig(ratio=-0.2),
    lambda: DuoConfig(streaming=1.0), lambda: CSKVConfig(k_ratio=1.0), lambda: CSKVConfig(v_ratio=2),
], ids=["mustafar-k", "mustafar-v", "streaming", "h2o", "a2sf", "duo", "cskv-k", "cskv-v"])
def test_ratios_outside_unit_interval(make):
    with pytest.raises(UserError, match=r"\[0, 1\)"):
        make()


def test_bad_policy_input(tiny_model_dir, tmp_path):
    with pytest.raises(UserError, match="not smaller than the context"):
        api.prune_kv(MustafarConfig(window=4096), tmp_path / "a", str(tiny_model_dir))
    with pytest.raises(UserError, match="budget of 300 tokens"):
        api.prune_kv(H2OConfig(budget=300), tmp_path / "b", str(tiny_model_dir))
    with pytest.raises(UserError, match="no tokenizer"):
        api.prune_kv(DuoConfig(), tmp_path / "c", str(tiny_model_dir))
    with pytest.raises(UserError, match="no tokenizer"):
        api.prune_kv(CSKVConfig(), tmp_path / "d", str(tiny_model_dir))
    with pytest.raises(UserError, match="residual"):
        KIVIConfig(group=32, residual=48)
    with pytest.raises(UserError, match="forget"):
        A2SFConfig(forget=0)
    assert not (tmp_path / "a").exists()


def test_unsupported_attention_is_named(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    path = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=64)).save_pretrained(path)
    with pytest.raises(UserError, match="GPT2Attention"):
        api.prune_kv(StreamingConfig(), tmp_path / "out", str(path))


def test_cli_prune_kv(tiny_model_dir, tmp_path):
    runner = CliRunner()
    r = runner.invoke(app, ["prune", "kv", str(tiny_model_dir), "--method", "kivi", "--bits", "4", "--group", "8",
                            "--window", "16", "-o", str(tmp_path / "kivi")])
    assert r.exit_code == 0, r.output
    cfg = read_manifest(tmp_path / "kivi")["stages"][-1]["config"]
    assert (cfg["bits"], cfg["group"], cfg["residual"]) == (4, 8, 16)
    for args, message in [(["--method", "kivi", "--sinks", "2"], "--sinks does not apply"),
                          (["--method", "mustafar", "--ratio", "1.5"], "[0, 1)"),
                          (["--method", "nope"], "Unknown KV method"),
                          (["--method", "h2o", "--budget", "0"], "at least 1"),
                          (["--method", "streaming", "--budget", "-3"], "at least 1"),
                          # (--ratio was dropped for --budget, and recorded in the manifest)
                          (["--method", "streaming", "--budget", "10", "--ratio", "0.5"], "give one")]:
        r = runner.invoke(app, ["prune", "kv", str(tiny_model_dir), *args, "-o", str(tmp_path / "x")])
        lines = [line for line in r.output.splitlines() if line.startswith("error:")]
        assert r.exit_code == 2 and len(lines) == 1 and message in r.output and "Traceback" not in r.output, r.output


def test_long_context_eval(monkeypatch):
    from llmcomp.eval import longctx

    model, tok = tiny(), CharTokenizer()
    dense = longctx.long_context_eval(model, tok, context=128, n_windows=2, chunk=8, passkey_lengths=(240,),
                                      passkey_n=2)
    install(model, MustafarConfig(0, 0, window=4))
    same = longctx.long_context_eval(model, tok, context=128, n_windows=2, chunk=8, passkey_lengths=(240,),
                                     passkey_n=2)
    assert same["ppl"] == dense["ppl"] and same["kv_dense_bytes"] == dense["kv_bytes"]
    install(model, StreamingConfig(ratio=0.5))
    half = longctx.long_context_eval(model, tok, context=128, n_windows=2, chunk=8, passkey_lengths=(), passkey_n=0)
    assert half["kv_bytes"] < 0.6 * dense["kv_bytes"] and half["ppl"] != dense["ppl"]
    assert set(dense["passkey"]) == {"240"} and json.dumps(dense)


@pytest.mark.cuda
def test_triton_mustafar_kernel_matches_reference():
    from llmcomp.prune.kv.mustafar_triton import sparse_decode_attention

    g = torch.Generator(device="cuda").manual_seed(0)
    for b, h, hkv, t, w, d, dtype in [(2, 8, 2, 300, 5, 64, torch.float16), (1, 32, 8, 1000, 33, 128, torch.bfloat16),
                                      (3, 4, 4, 17, 1, 64, torch.float32)]:
        q = torch.randn(b, h, 1, d, generator=g, device="cuda").to(dtype)
        k, v = (torch.randn(b, hkv, t, d, generator=g, device="cuda").to(dtype) for _ in range(2))
        kd, vd = (torch.randn(b, hkv, w, d, generator=g, device="cuda").to(dtype) for _ in range(2))
        ks, vs = bitmap.compress(k, bitmap.magnitude_keep(k, 0.7)), bitmap.compress(v, bitmap.magnitude_keep(v, 0.5))
        for sparse_mask in (None, torch.rand(b, 1, 1, t, generator=g, device="cuda") < 0.9):
            ref = bitmap.sparse_attention(q.float(), ks, vs, kd, vd, sparse_mask, None, d ** -0.5)
            got = sparse_decode_attention(q, ks, vs, kd, vd, sparse_mask, None, d ** -0.5)
            torch.testing.assert_close(got.float(), ref, atol=2e-2 if dtype != torch.float32 else 1e-4, rtol=1e-2)


def test_cli_eval_long_bad_input(tiny_model_dir):
    runner = CliRunner()
    for args, message in [(["--context", "100000"], "longer than the model's"),
                          (["--passkey-lengths", "1k"], "comma-separated integers")]:
        r = runner.invoke(app, ["eval", str(tiny_model_dir), "--long", *args])
        assert r.exit_code == 2 and message in r.output and "Traceback" not in r.output, r.output


@pytest.mark.slow
def test_bundled_model_kv_artifact(tmp_path):
    from llmcomp.core.passkey import answer_correct, passkey_samples

    path = api.prune_kv(MustafarConfig(0.5, 0.5), tmp_path / "mustafar")
    model, tok = api.load(str(path), return_tokenizer=True)
    sample = passkey_samples(tok, 512, 1, seed=3)[0]
    ids = sample.prompt[None]
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=7, do_sample=False,
                         pad_token_id=tok.eos_token_id, return_dict_in_generate=True)
    assert answer_correct(tok.decode(out.sequences[0, 512:]), sample.answer)
    cache = output_cache(out)
    assert type(cache).__name__ == "KVCache" and cache.nbytes() < 0.65 * cache.dense_nbytes()
    row = api.evaluate_long(str(path), context=512, n_windows=1, passkey_lengths=(512,), passkey_samples=2)
    assert row["policy"] == "mustafar K 0.5 V 0.5 window 32" and row["kv_bytes"] < 0.65 * row["kv_dense_bytes"]


def _lossy_cskv(model):
    cfg = CSKVConfig(k_ratio=0.5, v_ratio=0.5, window=2, activation_aware=False)
    cfg.calibrate(model, None)
    return cfg


@pytest.mark.parametrize("make", [
    lambda m: StreamingConfig(budget=12, sinks=4),
    lambda m: StreamingConfig(ratio=0.5, sinks=4),  # each row keeps half of its own tokens, not of the padding's
    lambda m: H2OConfig(ratio=0.5),
    lambda m: DuoConfig(streaming=0.5, sinks=4, window=8, heads=("10", "01")),
    _lossy_cskv,
], ids=["streaming", "streaming-ratio", "h2o-ratio", "duo", "cskv"])
@pytest.mark.parametrize("pad,chunk", [(6, None), (8, 4)], ids=["prefill", "prefill-in-chunks"])
def test_a_left_padded_row_decodes_as_its_prompt_alone(make, pad, chunk):
    """Position-dependent policies took cache indices for positions: in a left-padded batch the sinks were the
    padding (StreamingLLM, DuoAttention) and CSKV un-rotated keys at the wrong angle — also when the prefill
    came in chunks no longer than the padding."""
    model = tiny()
    model.generation_config.eos_token_id = None
    install(model, make(model))
    ids = torch.randint(1, 128, (2, 20), generator=torch.Generator().manual_seed(3))
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, return_dict_in_generate=True, output_scores=True)
    if chunk:
        kw["prefill_chunk_size"] = chunk
    alone = model.generate(ids[1:, pad:], attention_mask=torch.ones(1, 20 - pad, dtype=torch.long), **kw)
    padded, mask = ids.clone(), torch.ones_like(ids)
    padded[1, :pad], mask[1, :pad] = 0, 0
    batch = model.generate(padded, attention_mask=mask, **kw)
    assert batch.sequences[1, 20:].tolist() == alone.sequences[0, 20 - pad:].tolist()
    for a, b in zip(alone.scores, batch.scores):
        torch.testing.assert_close(b[1], a[0], atol=2e-5, rtol=0)


def test_streaming_keeps_every_sink_and_the_newest_token():
    """Sink priorities were float32 1e9 + position (all equal: an arbitrary subset of the sinks survived), a ratio
    could keep fewer tokens than the sinks, and a budget of no more than the sinks left no recent window."""
    with pytest.raises(UserError, match="must exceed its sinks"):
        StreamingConfig(budget=4, sinks=4).validate_for(tiny().config)  # (prune kv checks it before any work)
    layer = EvictionLayer(0, None, ratio=0.5, budget=0, sinks=4)
    k = torch.randn(1, 1, 6, 8)
    layer.append(k, k, None)
    layer.seen = 6
    for _ in range(4):
        layer.append(k[..., :1, :], k[..., :1, :], None)
        layer.seen += 1
        held = layer.pos[0, 0].tolist()
        assert held[:4] == [0, 1, 2, 3] and held[-1] == layer.seen - 1, held


def test_cskv_rotates_back_at_the_positions_the_model_used():
    """A plain forward with a left-padding mask but no position ids rotates keys at cache indices: CSKV must
    un-rotate them there, not at generate's positions. The keys before rotation are exactly rank 16 here, so a
    rank-16 basis gives them back exactly only when un-rotated at the right angle."""
    model = tiny()
    with torch.no_grad():
        for layer in model.model.layers:
            w = layer.self_attn.k_proj.weight
            u, sv, vh = torch.linalg.svd(w, full_matrices=False)
            sv[16:] = 0
            w.copy_(u @ torch.diag(sv) @ vh)
    cfg = CSKVConfig(k_ratio=0.5, v_ratio=0.0, window=2, activation_aware=False)
    cfg.calibrate(model, None)
    ids = torch.randint(1, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    with torch.no_grad():
        dense = output_cache(model(ids, attention_mask=mask, use_cache=True)).layers[0].keys
        install(model, cfg)
        k, _, _ = output_cache(model(ids, attention_mask=mask, use_cache=True)).layers[0].past()
    torch.testing.assert_close(k[:, :, 5:], dense[:, :, 5:], atol=1e-4, rtol=1e-4)


def test_mustafar_takes_triton_only_for_head_dims_it_handles():
    """``auto`` picked the Triton decode kernel for any fp16 step on a GPU, and a head dim of 96 raised a
    ValueError at the first decode token; an explicit ``triton`` is refused for such models up front."""
    from llmcomp.prune.kv.mustafar import triton_head_dim

    assert [d for d in (8, 16, 64, 80, 96, 128, 256, 512) if triton_head_dim(d)] == [16, 64, 128, 256]
    cfg = tiny().config
    cfg.head_dim = 24
    with pytest.raises(UserError, match="power-of-two head dimension from 16 to 256, not 24"):
        MustafarConfig(kernel="triton").validate_for(cfg)
    MustafarConfig(kernel="auto").validate_for(cfg)


def test_weights_only_cskv_on_a_quantized_model():
    """The weight-only bases read k_proj.weight, which a quantized projection does not have (a traceback)."""
    from llmcomp.formats import Uniform
    from llmcomp.quant import RTNConfig, quantize_model

    model = tiny()
    quantize_model(model, RTNConfig(format=Uniform(bits=8, group_size=32)))
    _, report = CSKVConfig(k_ratio=0.5, v_ratio=0.5, window=2, activation_aware=False).calibrate(model, None)
    assert report["k_rank"] > 0


def test_duo_without_calibration_or_heads_is_refused():
    """No calibration steps and no --heads: every gate 1, the first heads in layer order became retrieval heads."""
    with pytest.raises(UserError, match="would split duo.s heads arbitrarily"):
        DuoConfig(streaming=0.5, calib_steps=0)
    DuoConfig(streaming=0.5, calib_steps=0, heads=("10", "01"))
    DuoConfig(streaming=0.0, calib_steps=0)


@pytest.mark.cuda
@pytest.mark.parametrize("head_dim", [64, 96])
def test_mustafar_auto_decodes_a_padded_fp16_batch_like_the_reference(head_dim):
    """On the GPU ``auto`` takes the Triton kernel where it can (64) and the reference where it cannot (96: a
    ValueError at the first decode step before): a padded fp16 batch decodes as with the reference kernel."""
    from transformers import LlamaConfig, LlamaForCausalLM

    ids = torch.randint(1, 128, (2, 40), generator=torch.Generator().manual_seed(3)).cuda()
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    out = {}
    for kernel in ("dense", "auto"):
        torch.manual_seed(0)
        cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2,
                          num_key_value_heads=2, head_dim=head_dim, vocab_size=128, max_position_embeddings=256)
        model = LlamaForCausalLM(cfg).eval().to("cuda", torch.float16)
        model.generation_config.eos_token_id = None
        install(model, MustafarConfig(0.5, 0.5, window=4, kernel=kernel))
        out[kernel] = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0,
                                     return_dict_in_generate=True, output_scores=True)
    for a, b in zip(out["dense"].scores, out["auto"].scores):
        torch.testing.assert_close(b.float(), a.float(), atol=3e-2, rtol=0)


def test_core_alone_loads_a_stage_artifact(tiny_model_dir, tmp_path):
    """`import llmcomp` loads its names lazily: a process that imports only the core loader still finds the KV stage's
    hook and the formats (core.registry.load_all on a name it does not know)."""
    import subprocess
    import sys

    out = api.prune_kv(MustafarConfig(0.5, 0.5, window=4), tmp_path / "kv", str(tiny_model_dir))
    code = ("import sys; from llmcomp.core.artifact import load_artifact; "
            f"m, _, _ = load_artifact({str(out)!r}); print(type(m._llmcomp_kv).__name__)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == "KVRuntime"


def test_duo_calibration_mask_is_what_a_decode_step_sees():
    """The gates are trained on the streaming mask; a streaming head at a decode step sees its sinks, the held window
    and its own token. The mask gave one recent token less (``i - j < window``)."""
    from transformers.modeling_utils import AttentionInterface

    from llmcomp.prune.kv.duo import CALIB_IMPL, _gated_attention
    from llmcomp.prune.kv.cache import attention_modules

    ids = torch.randint(0, 128, (1, 30), generator=torch.Generator().manual_seed(3))
    model = tiny()
    install(model, DuoConfig(streaming=0.5, sinks=2, window=6, heads=("10", "01")))
    got, _ = run_chunks(model, ids, chunks=(1,) * 30)  # decode steps only: each token through the held cache
    ref_model = tiny()
    AttentionInterface.register(CALIB_IMPL, _gated_attention)
    for m, gate in zip(attention_modules(ref_model), ([1.0, 0.0], [0.0, 1.0])):  # 0: the streaming mask alone
        m._duo_gate, m._duo_window = torch.tensor(gate), (2, 6)
    ref_model.set_attn_implementation(CALIB_IMPL)
    with torch.no_grad():
        ref = ref_model(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


def test_cskv_weight_bases_take_the_projection_bias():
    """k = W x + b: the weights-only bases came from W alone, so the bias's part outside W's span was lost."""
    from llmcomp.prune.kv.cache import attention_modules as mods_of
    from llmcomp.prune.kv.cskv import top_basis

    model = tiny("qwen2")
    attn = mods_of(model)[0]
    with torch.no_grad():
        attn.k_proj.bias.copy_(torch.randn(attn.k_proj.bias.shape, generator=torch.Generator().manual_seed(1)) * 2)
    CSKVConfig(k_ratio=0.5, v_ratio=0.5, window=2, activation_aware=False).calibrate(model, None)
    basis = attn.kv_basis.k_basis.detach()
    keys = attn.k_proj(torch.randn(512, 64, generator=torch.Generator().manual_seed(2))).detach()

    def err(u):
        return ((keys - keys @ u @ u.T).norm() / keys.norm()).item()

    assert err(basis) < 0.9 * err(top_basis(attn.k_proj.weight.detach(), basis.shape[1], False))


def test_eval_long_checks_every_models_policy_before_the_first_evaluation(tmp_path, monkeypatch):
    """eval --long over several models found a policy that does not fit the evaluation's context only after the
    earlier models' evaluations, and told the user to choose a smaller residual (fixed in the artifact; the flag is
    --window) instead of a longer evaluation."""
    from conftest import save_char_model

    src = save_char_model(tmp_path / "char", layers=1)
    out = api.prune_kv(KIVIConfig(bits=4, group=8, residual=128), tmp_path / "kv", str(src))
    r = CliRunner().invoke(app, ["eval", str(src), str(out), "--long", "--windows", "1", "--context", "64",
                                 "--passkey-samples", "0"])
    text = " ".join(r.output.split())
    assert r.exit_code == 2 and "Long-context" not in text, r.output
    assert ("the policy's residual window of 128 tokens is not smaller than the evaluation's context (64 tokens); "
            "evaluate at more than 128 tokens") in text
    import shutil

    short = tmp_path / "short"  # (a model of a shorter context than asked: found after the first one's evaluation)
    shutil.copytree(src, short)
    cfg = json.loads((short / "config.json").read_text())
    (short / "config.json").write_text(json.dumps({**cfg, "max_position_embeddings": 64}))
    ran = []
    monkeypatch.setattr(api, "evaluate_long", lambda *a, **k: ran.append(a))
    r = CliRunner().invoke(app, ["eval", str(src), str(short), "--long", "--windows", "1", "--context", "128",
                                 "--passkey-samples", "0"])
    assert r.exit_code == 2 and "longer than the model's" in " ".join(r.output.split()) and not ran, r.output


def test_eval_long_says_when_the_text_holds_fewer_windows(tmp_path, monkeypatch):
    """eval --long --windows N over a text of fewer windows of --context tokens evaluated those it held, and only the
    caption's count told (perplexity eval notes it)."""
    from conftest import save_char_model

    from llmcomp.core.data import corpus

    src = save_char_model(tmp_path / "char", layers=1)
    monkeypatch.setenv("LLMCOMP_TEXT", "pydoc")  # (fewer windows to run than the Austen text's)
    corpus.cache_clear()
    try:
        r = CliRunner().invoke(app, ["eval", str(src), "--long", "--windows", "1000000", "--context", "256",
                                     "--passkey-samples", "0", "--device", "cpu"])
    finally:
        corpus.cache_clear()
    text = " ".join(r.output.split())
    assert r.exit_code == 0 and "windows of 256 tokens; evaluating those" in text, r.output
    assert "(--windows 1000000)" in text and text.count("evaluating those") == 1


def test_cli_eval_says_perplexity_leaves_the_kv_policy_out(tmp_path):
    """Perplexity runs without a cache: a KV artifact's row is the dense model's, and nothing said so."""
    from conftest import save_char_model

    src = save_char_model(tmp_path / "char", layers=1)
    out = api.prune_kv(StreamingConfig(budget=40), tmp_path / "kv", str(src))
    runner = CliRunner()
    r = runner.invoke(app, ["eval", str(src), str(out), "--windows", "1", "--seq-len", "32"])
    assert r.exit_code == 0, r.output
    text = " ".join(r.output.split())
    assert f"so the KV-cache policy of {out} is not applied" in text and text.count("KV-cache policy") == 1
    r = runner.invoke(app, ["eval", str(out), "--reference", "base", "--windows", "1", "--seq-len", "32"])
    text = " ".join(r.output.split())  # (KL / top-1 are the dense model's too; the greedy prefix used the cache)
    assert r.exit_code == 0 and "perplexity, KL and top-1 score each window without a cache" in text, r.output
    assert "the greedy prefix, generated with the cache, applies it" in text
    baseline = tmp_path / "b.json"  # (check's gate measured it so too, without the note: CI never saw the policy)
    r = runner.invoke(app, ["check", str(out), "--baseline", str(baseline), "--update", "--windows", "1",
                            "--seq-len", "32"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["check", str(out), "--baseline", str(baseline)])
    assert r.exit_code == 0 and "is not applied" in " ".join(r.output.split()), r.output
    r = runner.invoke(app, ["inspect", str(out)])  # (nothing quantized: one line, not an empty table)
    text = " ".join(r.output.split())
    assert r.exit_code == 0 and "│ quantized modules │ none │" in text, r.output
    assert "format ┃ modules" not in text


def test_quantizing_the_projections_of_cskv_bases_says_they_are_kept(tiny_model_dir, tmp_path):
    """prune kv --method cskv, then quantize: the bases fitted to the float k_proj / v_proj stay as they were (the
    policy and the bases load as before), silently before; a basis of full width (no basis) is not mentioned."""
    from llmcomp.core.progress import Progress
    from llmcomp.formats import Uniform
    from llmcomp.quant import RTNConfig

    class Notes(Progress):
        def __init__(self):
            self.lines = []

        def note(self, message):
            self.lines.append(message)

    kv = api.prune_kv(CSKVConfig(k_ratio=0.0, v_ratio=0.5, window=2, activation_aware=False), tmp_path / "kv",
                      str(tiny_model_dir))
    notes = Notes()
    q = api.quantize(RTNConfig(format=Uniform(bits=8, group_size=32)), tmp_path / "q", str(kv), progress=notes)
    said = [n for n in notes.lines if "CSKV bases" in n]
    assert len(said) == 1 and "kept for the 2 quantized here" in said[0], notes.lines  # (v_proj of 2 layers)
    net = api.load(str(q))
    assert net.model.layers[0].self_attn.kv_basis.v_basis is not None
    notes = Notes()
    api.quantize(RTNConfig(format=Uniform(bits=8, group_size=32), ignore=("lm_head", "self_attn")), tmp_path / "m",
                 str(kv), progress=notes)
    assert not any("CSKV bases" in n for n in notes.lines)


def test_stage_labels_tell_kv_policies_and_pruning_ratios_apart(tiny_model_dir, tmp_path):
    """eval --compare's stages column read 'kv-kivi' for KIVI at 2 and 4 bits, 'experts-frequency' at every ratio."""
    labels = [api.stage_label(read_manifest(api.prune_kv(KIVIConfig(bits=b, group=8, residual=8), tmp_path / f"k{b}",
                                                         str(tiny_model_dir)))["stages"][-1]) for b in (2, 4)]
    assert labels == ["kv-kivi 2-bit g8 residual 8", "kv-kivi 4-bit g8 residual 8"]
    experts = {"method": "experts-frequency", "kind": "moe", "config": {"ratio": 0.25, "layer_ratios": {}}}
    assert api.stage_label(experts) == "experts-frequency ratio 0.25"
    assert api.stage_label({**experts, "config": {"ratio": 0.25, "layer_ratios": {"model.layers.0.mlp": 0.5}}}) == (
        "experts-frequency ratio 0.25 per-layer ratios")
    dynamic = {"method": "experts-dynamic-skip", "kind": "moe", "config": {"rate": 0.15}}
    assert api.stage_label(dynamic) == "experts-dynamic-skip rate 0.15"
    assert api.stage_label({"method": "unfuse-experts", "kind": "moe", "config": {}}) == "unfuse-experts"

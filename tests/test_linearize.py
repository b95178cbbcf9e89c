"""linearize: student attention in a real transformers model (teacher reproduction, generation through
the Cache with a constant-size state), distillation (transfer, hybrid choice, fine-tune, resume), the
artifact round trip, the CLI and its bad input."""
import dataclasses
import math

import pytest
import torch
from typer.testing import CliRunner

from llmcomp import api
from llmcomp.cli.app import app
from llmcomp.core.hfcompat import cache_kwarg
from llmcomp.errors import UserError
from llmcomp.eval.longctx import kv_nbytes
from llmcomp.linearize.distill import LinearizeConfig, choose_softmax_layers, training_windows
from llmcomp.linearize.student import (METHODS, LinearAttention, LinearCacheLayer, install, students_of,
                                       teacher_mode)
from tests.conftest import tiny_llama

IDS = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(0))


@pytest.fixture(autouse=True)
def one_thread_short_text(monkeypatch):
    """Tiny models run fastest on one thread (no oversubscription on a shared 2-core machine), and the
    tiny tokenizer needs only a slice of the calibration text."""
    from llmcomp.core import data

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    full = data.corpus()
    short = data.Corpus(full.name, full.calib[:40_000], full.eval[:20_000])
    monkeypatch.setattr(data, "corpus", lambda source=None: short)
    monkeypatch.setattr(api, "corpus", lambda source=None: short)
    yield
    torch.set_num_threads(threads)


def linearized(method, window, skip=(), seed=0):
    model = tiny_llama(seed=seed)
    spec = dataclasses.replace(METHODS[method], window=window)
    install(model, {i: LinearAttention(l.self_attn, spec) for i, l in enumerate(model.model.layers) if i not in skip})
    return model


@torch.no_grad()
def test_window_covering_the_context_and_teacher_mode_reproduce_the_teacher():
    teacher = tiny_llama()(IDS).logits
    model = linearized("hedgehog", window=IDS.shape[1])
    assert torch.allclose(model(IDS).logits, teacher, atol=1e-5)
    model = linearized("liger", window=4)
    assert not torch.allclose(model(IDS).logits, teacher, atol=1e-2)
    with teacher_mode(model):
        assert torch.equal(model(IDS).logits, teacher)


@pytest.mark.parametrize("method,window", [("hedgehog", 4), ("liger", 4), ("gla", 0), ("liger", 0), ("mamba", 0),
                                           ("mamba", 4)])
@torch.no_grad()
def test_prefill_and_decode_through_the_cache_match_the_full_forward(method, window):
    from transformers import DynamicCache

    model = linearized(method, window, skip=(1,))  # layer 1 stays softmax: a hybrid cache
    full = model(IDS).logits
    cache = DynamicCache(config=model.config)
    kw = {cache_kwarg(model): cache, "use_cache": True}
    outs = [model(IDS[:, :9], **kw).logits]
    sizes = []
    for t in range(9, IDS.shape[1]):
        outs.append(model(IDS[:, t:t + 1], **kw).logits)
        sizes.append(cache.layers[0].nbytes())
    held, dense = kv_nbytes(cache, model)  # what `llmcomp eval --long` reports: the linear state plus the softmax
    softmax_kv = sum(t.numel() * t.element_size() for t in (cache.layers[1].keys, cache.layers[1].values))  # KV
    assert held == sizes[-1] + softmax_kv
    assert dense == 2 * softmax_kv  # (layer 0 as the softmax layer it replaced: the dense figure equalled held)
    half = model.to(torch.bfloat16)  # (the linear state stays float32: the dense figure is the model's dtype)
    cache = DynamicCache(config=half.config)
    half(IDS, **{cache_kwarg(half): cache, "use_cache": True})
    softmax_kv = sum(t.numel() * t.element_size() for t in (cache.layers[1].keys, cache.layers[1].values))
    assert cache.layers[1].keys.dtype == torch.bfloat16 and kv_nbytes(cache, half)[1] == 2 * softmax_kv
    assert isinstance(cache.layers[0], LinearCacheLayer) and cache.get_seq_length() == IDS.shape[1]
    assert torch.allclose(torch.cat(outs, 1), full, atol=1e-5)
    assert len(set(sizes)) == 1  # the linear layer's state does not grow with the context
    gen = model.generate(IDS[:, :8], attention_mask=torch.ones_like(IDS[:, :8]), max_new_tokens=6,
                         do_sample=False, pad_token_id=0)
    assert gen.shape == (2, 14)
    assert torch.equal(model(gen).logits[:, 7:-1].argmax(-1), gen[:, 8:])


@torch.no_grad()
def test_a_static_cache_is_refused():
    """A hybrid's softmax layers decoded over a static cache's unwritten slots: the logits drifted by ~0.02-0.2
    (transformers skips the causal mask at one query token once a cache layer is not compileable)."""
    model = linearized("hedgehog", 4, skip=(1,))
    with pytest.raises(UserError, match="static cache"):
        model.generate(IDS[:, :8], attention_mask=torch.ones_like(IDS[:, :8]), max_new_tokens=3, do_sample=False,
                       pad_token_id=0, cache_implementation="static")


@torch.no_grad()
def test_a_padded_batch_is_refused():
    """Left padding went into the linear state and the window: a padded row decoded other tokens than its prompt
    alone, without a sign."""
    model = linearized("liger", 4)
    mask = torch.ones_like(IDS)
    assert torch.isfinite(model(IDS, attention_mask=mask).logits).all()
    mask[1, :3] = 0
    with pytest.raises(UserError, match="equal-length sequences"):
        model(IDS, attention_mask=mask)
    with pytest.raises(UserError, match="equal-length sequences"):
        model(IDS, mask)  # positionally too
    with pytest.raises(UserError, match="equal-length sequences"):
        model.generate(IDS, attention_mask=mask, max_new_tokens=2, do_sample=False, pad_token_id=0)


def test_mamba_seeding_reuses_the_attention_weights_as_c_b_x_out():
    """Q→C, K→B, V→x, O→out: the same modules; with dt → 0 (no decay) and no window the layer is plain
    unnormalised linear attention with C·B = q·k/√D, scaled by its learned output weight."""
    teacher = tiny_llama()
    attn = teacher.model.layers[0].self_attn
    s = LinearAttention(attn, dataclasses.replace(METHODS["mamba"], window=0))
    assert all(getattr(s, n) is getattr(attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
    dt = torch.nn.functional.softplus(s.dt_proj.bias)
    assert (dt > 9e-4).all() and (dt < 0.11).all() and (s.dt_proj.weight == 0).all()
    assert ((s.A_log.exp() >= 1) & (s.A_log.exp() <= 16)).all()
    with torch.no_grad():
        s.dt_proj.bias.fill_(-40.0)  # softplus ≈ 0: no decay
        x = torch.randn(1, 6, 64)
        pe = teacher.model.rotary_emb(x, torch.arange(6)[None])
        q = attn.q_proj(x).view(1, 6, 4, 16).transpose(1, 2)
        k = attn.k_proj(x).view(1, 6, 2, 16).transpose(1, 2).repeat_interleave(2, 1)
        v = attn.v_proj(x).view(1, 6, 2, 16).transpose(1, 2).repeat_interleave(2, 1)
        scores = (q @ k.transpose(-1, -2) / 4.0).tril()
        ref = attn.o_proj((0.5 * scores @ v).transpose(1, 2).reshape(1, 6, 64))
        assert torch.allclose(s(x, position_embeddings=pe)[0], ref, atol=1e-5)


def test_hybrid_keeps_the_layers_with_the_largest_transfer_error():
    errors = {0: 0.1, 1: 0.5, 2: 0.3, 3: 0.05}
    assert choose_softmax_layers(errors, 4, LinearizeConfig(keep_softmax=0.5)) == [1, 2]
    assert choose_softmax_layers(errors, 4, LinearizeConfig(keep_softmax=0.0)) == []
    # half up, and a fraction above 0 keeps at least one layer (round() kept none of 2 at 0.25, of 10 at 0.05)
    assert choose_softmax_layers(errors, 2, LinearizeConfig(keep_softmax=0.25)) == [1]
    assert len(choose_softmax_layers(dict.fromkeys(range(10), 0.0), 10, LinearizeConfig(keep_softmax=0.05))) == 1
    assert len(choose_softmax_layers(dict.fromkeys(range(10), 0.0), 10, LinearizeConfig(keep_softmax=0.25))) == 3
    assert choose_softmax_layers(errors, 4, LinearizeConfig(keep_softmax=1.0)) == [0, 1, 2, 3]
    assert choose_softmax_layers(errors, 4, LinearizeConfig(keep_layers=(3, 0))) == [0, 3]
    with pytest.raises(UserError, match="out of range"):
        choose_softmax_layers(errors, 4, LinearizeConfig(keep_layers=(4,)))


def test_a_batch_lowered_for_the_transfer_says_so_and_the_stage_records_it(tmp_path):
    """--batch-size 2 over 3 calibration windows ran the transfer's capture in batches of 1 (equal batches: the
    largest divisor of --calib-samples up to it) without a word, and the manifest held only the 2."""
    notes, progress = _notes()
    config = LinearizeConfig(method="gla", window=2, **SMALL)
    out = api.linearize(config, tmp_path / "lin", str(_model_dir(tmp_path)), calib_samples=3, calib_seq_len=32,
                        device="cpu", progress=progress)
    assert ("--batch-size 2 runs as 1 in the attention transfer: batches are equal-sized, and 1 is the largest "
            "divisor of --calib-samples 3 up to it." in notes)
    stage = api.inspect(out)["stages"][-1]
    assert stage["metrics"]["transfer_batch_size"] == 1 and stage["config"]["batch_size"] == 2
    assert stage["metrics"]["finetune"]["tokens"] == 2 * 2 * 32  # (the fine-tune's steps keep 2 windows)


def test_transfer_memory_check_counts_the_captured_attention_inputs_and_outputs(monkeypatch):
    """The transfer holds each layer's inputs and, for every window, its attention's inputs and outputs: three
    copies of the hidden states (four, with the outputs of the capture pass). The driver's check counted two, so a
    run it passed was then ended by the OOM killer."""
    from llmcomp.core import memory
    from llmcomp.linearize.distill import transfer

    ids = torch.randint(0, 128, (4, 8), generator=torch.Generator().manual_seed(0))
    per = 2 * 8 * 64 * 4  # (a batch of 2 windows × 8 tokens × 64 float32 values)
    config = LinearizeConfig(method="gla", window=2, transfer_steps=1, batch_size=2, seq_len=8)
    monkeypatch.setattr(memory, "available_cpu_bytes", lambda: 3 * per * 2 - per - 1)  # (two copies fit)
    with pytest.raises(UserError, match=r"4 windows × 8 tokens × 64 float32 values, held 3 times"):
        transfer(tiny_llama(), ids, config, "cpu")
    monkeypatch.setattr(memory, "available_cpu_bytes", lambda: 3 * per * 2 - per)
    students, errors = transfer(tiny_llama(), ids, config, "cpu")
    assert sorted(errors) == [0, 1]


def _saved_by_a_fine_tune_step(model, config) -> int:
    """Bytes autograd keeps in one stage-2 forward (student logits and KL) of ``batch_size × seq_len`` tokens, each
    storage once and the model's own tensors left out: what ``finetune_memory``'s activations and logits bound."""
    from llmcomp.linearize.distill import _kl, _trainable
    from llmcomp.linearize.lora import add_lora

    students = students_of(model)
    add_lora(students, config.lora_rank, config.lora_alpha)
    for s in students:
        for p in _trainable(s).values():
            p.requires_grad_(True)
    held = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in held:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    ids = torch.randint(0, 128, (config.batch_size, config.seq_len), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), teacher_mode(model):
        target = model(input_ids=ids, use_cache=False).logits
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _kl(target, model(input_ids=ids, use_cache=False).logits).backward()
    return sum(seen.values())


@pytest.mark.parametrize("method,window,skip", [("hedgehog", 8, ()), ("liger", 8, ()), ("gla", 0, ()),
                                                ("mamba", 8, ()), ("liger", 8, (1,))])
def test_fine_tune_memory_estimate_bounds_what_a_step_keeps(method, window, skip):
    """The estimate's activations and logits are at least what autograd keeps in a real step (and not wildly more),
    for every method and a hybrid: it is measured by a probe of one layer, scaled, so a change in the students
    shows here."""
    from llmcomp.linearize.distill import finetune_memory

    config = LinearizeConfig(method=method, window=window, keep_layers=skip or None, seq_len=48, batch_size=3)
    base = tiny_llama()
    parts = finetune_memory(base, config)
    assert parts["weights"] == sum(p.numel() * 4 for p in base.parameters())
    model = linearized(method, window, skip)
    kept = _saved_by_a_fine_tune_step(model, config)
    assert kept <= parts["activations"] + parts["logits"] <= 2 * kept, (kept, parts)
    lora = sum(8 * (p.in_features + p.out_features) for p in (getattr(s, n) for s in students_of(model)
                                                               for n in ("q_proj", "k_proj", "v_proj", "o_proj")))
    assert parts["trainable"] >= 4 * 4 * lora  # (value, gradient, AdamW's two moments)


def test_a_fine_tune_that_would_not_fit_is_refused_before_any_work(tmp_path, monkeypatch):
    """Stage 2 had no memory check: a batch × seq-len past the free memory ran the whole attention transfer first,
    then ran out of memory (on the CPU, the OOM killer ended it without a word)."""
    from llmcomp.core import memory
    from llmcomp.linearize import distill

    src = _model_dir(tmp_path)
    config = LinearizeConfig(method="gla", window=2, **SMALL)
    parts = distill.finetune_memory(tiny_llama(vocab=300), config)
    need = int((parts["trainable"] + parts["activations"] + parts["logits"]) * distill.CPU_SLACK)
    monkeypatch.setattr(memory, "available_cpu_bytes", lambda: need - 1)
    monkeypatch.setattr(distill, "transfer", lambda *a, **k: pytest.fail("transferred"))
    msg = _error(invoke("linearize", src, "-o", tmp_path / "lin", "--method", "gla", "--window", 2, "--tokens", 128,
                        "--seq-len", 32, "--batch-size", 2, "--calib-samples", 2, "--device", "cpu"))
    assert (f"The fine-tune (2 windows × 32 tokens a step: trainable {memory.format_bytes(parts['trainable'])}, "
            f"activations {memory.format_bytes(parts['activations'])}, logits {memory.format_bytes(parts['logits'])}; "
            f"× 1.5 for the CPU allocator) would take {memory.format_bytes(need)} more of CPU memory") in msg
    assert msg.endswith("available; lower --batch-size or --seq-len.") and "--device cpu." not in msg
    assert not list(tmp_path.glob("*lin*"))
    monkeypatch.undo()
    monkeypatch.setattr(memory, "available_cpu_bytes", lambda: need)
    assert api.linearize(config, tmp_path / "lin", str(src), calib_samples=2, calib_seq_len=32, device="cpu")
    distill.check_finetune_fits(tiny_llama(), dataclasses.replace(config, tokens=0), "cpu")  # (no fine-tune)


def test_a_fine_tune_past_the_gpu_counts_the_weights_and_offers_the_cpu(monkeypatch):
    """On a GPU the fine-tune moves the whole model there: its weights count, and --device cpu is a way out."""
    from llmcomp.linearize import distill

    config = LinearizeConfig(method="hedgehog", window=4, seq_len=32, batch_size=2)
    need = sum(distill.finetune_memory(tiny_llama(), config).values())
    free = [need - 1]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free[0], 10 * need))
    for name in ("memory_reserved", "memory_allocated"):
        monkeypatch.setattr(torch.cuda, name, lambda device=None: 0)
    with pytest.raises(UserError, match=r"more of cuda memory, .* available; lower --batch-size or --seq-len, or "
                                        r"linearize with --device cpu\.$"):
        distill.check_finetune_fits(tiny_llama(), config, "cuda")
    free[0] = need
    distill.check_finetune_fits(tiny_llama(), config, "cuda")


def test_token_budget_beyond_the_text_cycles_with_a_note():
    notes = []
    stream = torch.arange(1000)
    windows, steps = training_windows(stream, LinearizeConfig(tokens=4096, seq_len=64, batch_size=4), notes.append)
    assert steps == 16 and windows.shape == (15, 64) and "cycling" in notes[0]
    assert sorted(windows[:, 0].tolist()) == list(range(0, 15 * 64, 64))  # every window once per pass
    notes.clear()
    training_windows(stream, LinearizeConfig(tokens=512, seq_len=64, batch_size=4), notes.append)
    assert notes == []


def test_a_budget_rounded_to_whole_steps_says_so_and_the_label_reads_what_ran(tmp_path):
    """--tokens 1000 ran 960 (whole steps of --batch-size × --seq-len) without a word, and eval --compare's label
    read 'fine-tune 1k tokens'; the stage's metrics held the 960."""
    notes, progress = _notes()
    config = LinearizeConfig(method="gla", window=2, **{**SMALL, "tokens": 200})
    out = api.linearize(config, tmp_path / "lin", str(_model_dir(tmp_path)), calib_samples=2, calib_seq_len=32,
                        device="cpu", progress=progress)
    assert ("--tokens 200 runs as 192: the fine-tune takes whole steps of --batch-size 2 × --seq-len 32 = 64 tokens."
            in notes)
    stage = api.inspect(out)["stages"][-1]
    assert stage["metrics"]["finetune"]["tokens"] == 192 and stage["config"]["tokens"] == 200
    assert api.stage_label(stage) == "linearize-gla window 2, fine-tune 192 tokens"
    from llmcomp.linearize.distill import note_budget

    notes.clear()
    for tokens in (0, 128):  # (no fine-tune, and a budget of whole steps: nothing to say)
        note_budget(dataclasses.replace(config, tokens=tokens), notes.append)
    note_budget(dataclasses.replace(config, tokens=10), notes.append)  # (one step at least)
    assert notes == ["--tokens 10 runs as 64: the fine-tune takes whole steps of --batch-size 2 × --seq-len 32 = 64 "
                     "tokens."]


@pytest.mark.parametrize("bad,match", [(dict(keep_softmax=1.5), "keep-softmax must be a fraction in"),
                                       (dict(keep_softmax=-0.1), "keep-softmax"),
                                       (dict(method="rwkv"), "Unknown linearize method"),
                                       (dict(window=-1), "--window must be"),
                                       (dict(keep_layers=(-1,)), "--keep-layers"),
                                       (dict(keep_layers=(0,), keep_softmax=0.5), "drop --keep-softmax"),
                                       (dict(feature_dim=-1), "feature dimension must be ≥ 0"),
                                       (dict(lora_alpha=0.0), "LoRA alpha must be positive")])
def test_config_validation(bad, match):
    with pytest.raises(UserError, match=match):
        LinearizeConfig(**bad)


def _model_dir(tmp_path, name="src", model=None):
    from test_experts import _save_with_tokenizer

    return _save_with_tokenizer(model if model is not None else tiny_llama(vocab=300), tmp_path / name)


SMALL = dict(transfer_steps=3, tokens=2 * 2 * 32, seq_len=32, batch_size=2, checkpoint_every=1)


def _logits_at_write(monkeypatch):
    """Capture the in-memory model's logits when the artifact is written."""
    seen = {}
    real = api.write_artifact

    def spy(output, net, *args, **kwargs):
        with torch.no_grad():
            seen["logits"] = net(IDS).logits
        return real(output, net, *args, **kwargs)

    monkeypatch.setattr(api, "write_artifact", spy)
    return seen


def test_artifact_round_trip_same_logits_and_generates(tmp_path, monkeypatch):
    src = _model_dir(tmp_path)
    seen = _logits_at_write(monkeypatch)
    config = LinearizeConfig(method="hedgehog", window=4, keep_layers=(1,), **SMALL)
    out = api.linearize(config, tmp_path / "lin", str(src), calib_samples=2, calib_seq_len=32, device="cpu")
    stage = api.inspect(out)["stages"][-1]
    assert stage["kind"] == "linearize" and stage["method"] == "linearize-hedgehog"
    assert stage["layout"] == ["linear", "softmax"] and stage["config"]["window"] == 4
    assert stage["metrics"]["finetune"]["steps"] == 2 and set(stage["metrics"]["transfer_rel_mse"]) == {"0", "1"}
    assert api.stage_label(stage) == "linearize-hedgehog window 4, 1 softmax layer, fine-tune 128 tokens"
    model, tok = api.load(out, return_tokenizer=True)
    assert [type(l.self_attn).__name__ for l in model.model.layers] == ["LinearAttention", "LlamaAttention"]
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, seen["logits"])
    gen = model.generate(IDS[:1, :5], attention_mask=torch.ones_like(IDS[:1, :5]), max_new_tokens=4, do_sample=False,
                         pad_token_id=0)
    assert gen.shape == (1, 9)
    assert not (tmp_path / ".lin.resume").exists()
    import json  # a damaged stage is one error line, not a KeyError / IndexError

    from llmcomp.core import artifact

    manifest = json.loads((out / "llmcomp.json").read_text())
    for damage, message in ((lambda s: s.update(layout=["linear"] * 3), "layout must name"),
                            (lambda s: s.pop("student"), "KeyError: 'student'")):
        broken = json.loads(json.dumps(manifest))
        damage(broken["stages"][-1])
        broken[artifact.SEAL] = artifact._seal(broken)  # (re-sealed: the stage checks behind the seal)
        (out / "llmcomp.json").write_text(json.dumps(broken))
        with pytest.raises(UserError, match=f"is corrupt: its linearize stage does not fit the model.*{message}"):
            api.load(out)


def test_a_liger_artifact_quantizes_loads_and_runs(tmp_path):
    """Liger's fixed window/linear halves go on the input's device: a quantized q_proj has no weight to ask."""
    from llmcomp.quant.rtn import RTNConfig

    src = _model_dir(tmp_path)
    lin = api.linearize(LinearizeConfig(method="liger", window=4, **SMALL), tmp_path / "lin", str(src),
                        calib_samples=2, calib_seq_len=32, device="cpu")
    q = api.quantize(RTNConfig(), tmp_path / "q", str(lin), device="cpu")
    # (RTN reads no text, and wrote none over the linearize stage's: inspect said '- (no stage read calibration
    # text)', report.md 'text: -'; fixed in core.artifact.stages_text)
    assert api.inspect(q)["text_source"] == api.corpus().name
    model = api.load(q)
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "QuantLinear"
    with torch.no_grad():
        assert torch.isfinite(model(IDS).logits).all()
    row = api.evaluate_long(str(q), context=64, n_windows=1, passkey_samples=0, passkey_lengths=(), device="cpu")
    # (it said dense, and its dense bytes were the linear state's; then the method only, whatever its window)
    assert row["policy"] == "linearize-liger window 4, fine-tune 128 tokens"
    assert row["kv_bytes"] < row["kv_dense_bytes"]


@pytest.mark.parametrize("layout,config,label", [
    (["linear"] * 3, dict(method="mamba", window=0, tokens=0), "linearize-mamba no window, transfer only"),
    (["softmax", "linear", "softmax"], dict(method="hedgehog", window=64, feature_dim=32, tokens=5_000_000),
     "linearize-hedgehog window 64, 32 features, 2 softmax layers, fine-tune 5M tokens"),
    (["linear", "softmax"], dict(method="gla", window=16, tokens=500_000),
     "linearize-gla window 16, 1 softmax layer, fine-tune 500k tokens"),
    ("?", "?", "linearize-gla window ?"),  # (a hand-edited, unsealed manifest)
    # (not round: whole, as 4 digits read 999 999 as "1000k" and 1 234 567 as 1 234 999)
    (["linear"], dict(method="gla", window=16, tokens=999_999), "linearize-gla window 16, fine-tune 999999 tokens"),
    (["linear"], dict(method="gla", window=16, tokens=1_234_567), "linearize-gla window 16, fine-tune 1234567 tokens"),
])
def test_stage_labels_name_the_window_the_softmax_layers_and_the_budget(layout, config, label):
    """eval --compare's stages column read 'linearize-gla' for every window, hybrid and fine-tune budget."""
    method = config["method"] if isinstance(config, dict) else "gla"
    stage = {"method": f"linearize-{method}", "kind": "linearize", "layout": layout, "config": config}
    assert api.stage_label(stage) == label


@pytest.mark.parametrize("keep,said", [(dict(keep_softmax=1.0), "--keep-softmax 1.0 keeps every one"),
                                       (dict(keep_layers=(1, 0, 1)), "--keep-layers names every one")])
def test_keeping_every_layer_softmax_is_refused_before_any_work(tmp_path, monkeypatch, keep, said):
    """It ran the attention transfer of every layer, trained nothing and wrote the original model under a linearize
    stage (its fine-tune flags recorded, unused), exit 0."""
    from llmcomp.linearize import distill

    src = _model_dir(tmp_path)
    monkeypatch.setattr(distill, "transfer", lambda *a, **k: pytest.fail("transferred"))
    with pytest.raises(UserError, match=f"{said} of the model's 2 layers as softmax: nothing would be linearized"):
        api.linearize(LinearizeConfig(method="liger", **keep, **SMALL), tmp_path / "lin", str(src),
                      calib_samples=2, calib_seq_len=32, device="cpu")
    assert not (tmp_path / "lin").exists()


def test_an_interrupt_before_any_saved_work_leaves_no_resume_folder(tmp_path, monkeypatch):
    """Ctrl-C during the attention transfer left .lin.resume/ holding only its fingerprint, hidden, with no note."""
    from llmcomp.linearize import distill

    src = _model_dir(tmp_path)

    def stop(*a, **k):
        assert (tmp_path / ".lin.resume").is_dir()
        raise KeyboardInterrupt

    monkeypatch.setattr(distill, "transfer", stop)
    with pytest.raises(KeyboardInterrupt):
        api.linearize(LinearizeConfig(method="gla", window=2, **SMALL), tmp_path / "lin", str(src), calib_samples=2,
                      calib_seq_len=32, device="cpu")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".lin")) == []


def _killed_at(tag: str, config, tmp_path, monkeypatch, then=None, **then_kw):
    """An uninterrupted run's state dict (of the rerun's config ``then`` and calibration ``then_kw``, if given), then
    the job ``config`` on ``lin`` interrupted at kill point ``tag``."""
    from llmcomp.core import resume

    src = _model_dir(tmp_path)
    kw = dict(calib_samples=2, calib_seq_len=32, device="cpu")
    whole = api.load(api.linearize(then or config, tmp_path / "whole", str(src), **{**kw, **then_kw})).state_dict()

    def kill(at):
        if at == tag:
            raise KeyboardInterrupt

    with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):  # (the rerun may pass ``tag`` again)
        patch.setattr(resume, "_kill_point", kill)
        api.linearize(config, tmp_path / "lin", str(src), **kw)
    return lambda cfg, **more: api.linearize(cfg, tmp_path / "lin", str(src), **{**kw, **more}), whole


def _notes() -> tuple[list, api.Progress]:
    """(the notes, a progress that records them there)."""
    notes = []

    class Notes(api.Progress):
        def note(self, message):
            notes.append(message)

    return notes, Notes()


def _same_as(out, whole, whole_dir) -> None:
    """The artifact ``out`` holds the uninterrupted run's weights, byte for byte, and its transfer errors."""
    resumed = api.load(out).state_dict()
    assert resumed.keys() == whole.keys() and all(torch.equal(resumed[k], whole[k]) for k in whole)
    assert api.inspect(out)["stages"][-1]["metrics"]["transfer_rel_mse"] == \
        api.inspect(whole_dir)["stages"][-1]["metrics"]["transfer_rel_mse"]


def test_killed_transfer_resumes_from_its_finished_layers(tmp_path, monkeypatch):
    """The transfer was saved once, after its last layer: a kill at layer 29 of 30 lost every layer's work."""
    config = LinearizeConfig(method="gla", window=2, **SMALL)
    rerun, whole = _killed_at("linearize-transfer-0", config, tmp_path, monkeypatch)
    assert sorted(p.name for p in (tmp_path / ".lin.resume").glob("*.safetensors")) == ["transfer-0000.safetensors"]
    notes, progress = _notes()
    out = rerun(config, progress=progress)
    assert "Resuming: the attention transfer of 1 of 2 layers is done" in notes
    _same_as(out, whole, tmp_path / "whole")


def test_killed_fine_tune_resumes_from_its_checkpoint(tmp_path, monkeypatch):
    config = LinearizeConfig(method="gla", window=2, **{**SMALL, "tokens": 4 * 2 * 32})
    rerun, whole = _killed_at("linearize-step-2", config, tmp_path, monkeypatch)
    assert not (tmp_path / "lin").exists() and (tmp_path / ".lin.resume" / "finetune.safetensors").exists()
    from llmcomp.linearize import distill  # (every layer's transfer is saved: read back without a calibration pass)

    monkeypatch.setattr(distill, "transfer", lambda *a, **k: pytest.fail("ran the transfer's pass again"))
    # (another --checkpoint-every is the same job: it discarded the saved work as another job's)
    out = rerun(dataclasses.replace(config, checkpoint_every=3))
    assert api.inspect(out)["stages"][-1]["metrics"]["finetune"]["resumed_at_step"] == 2
    resumed = api.load(out).state_dict()
    assert resumed.keys() == whole.keys()
    assert all(torch.equal(resumed[k], whole[k]) for k in whole)


LONGER = LinearizeConfig(method="gla", window=2, **{**SMALL, "tokens": 4 * 2 * 32})


@pytest.mark.parametrize("tag,change,said", [
    ("linearize-step-2", dict(tokens=3 * 2 * 32, lr=5e-4, lora_rank=4, lora_alpha=8.0, seq_len=16, keep_layers=(0,)),
     "Reusing the attention transfer of 2 of 2 layers from the interrupted job; its fine-tune settings differ, so "
     "the fine-tune starts over"),
    ("linearize-transfer-0", dict(keep_softmax=0.5, tokens=2 * 2 * 32),
     "Resuming: the attention transfer of 1 of 2 layers is done")], ids=["after-transfer", "during-transfer"])
def test_a_rerun_that_changes_only_the_fine_tune_keeps_the_finished_transfer(tmp_path, monkeypatch, tag, change, said):
    """Another --tokens, --lr, --lora-rank, --keep-softmax or --keep-layers discarded the whole job as another's and
    ran the transfer of every layer again (22 finished layers thrown away): the transfer reads none of them. The
    fine-tune's checkpoint, made under the old settings, is dropped; the result is the new job's uninterrupted one."""
    from llmcomp.core import resume
    from llmcomp.linearize import distill

    then = dataclasses.replace(LONGER, **change)
    rerun, whole = _killed_at(tag, LONGER, tmp_path, monkeypatch, then)
    if tag.startswith("linearize-step"):  # (every layer's transfer is saved: read back without a calibration pass)
        monkeypatch.setattr(distill, "transfer", lambda *a, **k: pytest.fail("ran the transfer's pass again"))
    notes, progress = _notes()
    rewound = []  # (the dropped fine-tune's seconds left out of the wall time: resume's own test times it)
    real = resume.Checkpoint.rewind_time
    monkeypatch.setattr(resume.Checkpoint, "rewind_time", lambda cp, name: (rewound.append(name), real(cp, name)))
    out = rerun(then, progress=progress)
    assert said in notes and not [n for n in notes if n.startswith("Discarding")]
    assert rewound == ([distill.TRANSFER_TIME] if tag.startswith("linearize-step") else [])
    assert api.inspect(out)["stages"][-1]["metrics"]["finetune"]["resumed_at_step"] == 0
    _same_as(out, whole, tmp_path / "whole")


@pytest.mark.parametrize("change,calib", [(dict(transfer_lr=5e-3), {}), (dict(transfer_steps=2), {}),
                                          (dict(batch_size=1), {}), (dict(seed=1), {}), ({}, dict(calib_samples=1))],
                         ids=["transfer_lr", "transfer_steps", "batch_size", "seed", "calib_samples"])
def test_a_rerun_that_changes_what_the_transfer_reads_starts_over(tmp_path, monkeypatch, change, calib):
    """The finished transfer (and the fine-tune's checkpoint) of another transfer setting is discarded."""
    then = dataclasses.replace(LONGER, **change)
    rerun, whole = _killed_at("linearize-step-2", LONGER, tmp_path, monkeypatch, then, **calib)
    notes, progress = _notes()
    out = rerun(then, progress=progress, **calib)
    assert [n for n in notes if n.startswith("Discarding") and n.endswith("(from a different job)")]
    assert not [n for n in notes if "attention transfer of" in n]
    assert api.inspect(out)["stages"][-1]["metrics"]["finetune"]["resumed_at_step"] == 0
    _same_as(out, whole, tmp_path / "whole")


def test_the_transfer_reads_none_of_the_settings_its_key_leaves_out():
    """``AFTER_TRANSFER`` is what lets a rerun keep the transfer: the students and errors are the same bytes
    whatever those settings are (each of them is changed here), and every other setting is in the key."""
    from llmcomp.linearize import distill

    base = LinearizeConfig(method="hedgehog", window=2, transfer_steps=2, tokens=64, seq_len=16, batch_size=1)
    later = dict(tokens=128, seq_len=8, lr=5e-4, lora_rank=2, lora_alpha=4.0, checkpoint_every=7)
    others = [dataclasses.replace(base, **keep, **later) for keep in (dict(keep_layers=(1,)), dict(keep_softmax=0.5))]
    changed = {f.name for c in others for f in dataclasses.fields(c) if getattr(c, f.name) != getattr(base, f.name)}
    assert changed == set(distill.AFTER_TRANSFER + distill.SAVE_ONLY)
    assert all(distill.transfer_settings(c) == distill.transfer_settings(base) for c in others)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    students, errors = distill.transfer(tiny_llama(), ids, base, "cpu")
    for c in others:
        again, errors_again = distill.transfer(tiny_llama(), ids, c, "cpu")
        assert errors_again == errors and again.keys() == students.keys()
        assert all(torch.equal(x, y) for i in students
                   for x, y in zip(students[i].state_dict().values(), again[i].state_dict().values()))


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_cli_writes_an_artifact(tmp_path):
    src = _model_dir(tmp_path)
    r = invoke("linearize", src, "-o", tmp_path / "out", "--method", "liger", "--window", 4, "--keep-softmax", 0.5,
               "--tokens", "128", "--seq-len", 32, "--batch-size", 2, "--calib-samples", 2, "--device", "cpu")
    assert r.exit_code == 0, r.output
    text = " ".join(r.output.split())
    assert "1 linear / 1 softmax layers" in text and "KL" in text
    # (one mean over both layers, the kept one the worse: the linear layer's error read higher than it was)
    stage = api.inspect(tmp_path / "out")["stages"][-1]
    err = {kind: 100 * stage["metrics"]["transfer_rel_mse"][str(i)] for i, kind in enumerate(stage["layout"])}
    assert (f"mean transfer error {err['linear']:.1f} % over the linear layers, {err['softmax']:.1f} % over the "
            "softmax ones kept") in text, text
    r = invoke("inspect", tmp_path / "out")  # (it showed the config only: not which layers --keep-softmax kept)
    assert r.exit_code == 0, r.output
    kept = stage["layout"].index("softmax")
    assert f"attention │ 1 linear (liger, window 4), 1 softmax (layer {kept}) │" in " ".join(r.output.split())


def _error(r) -> str:
    assert r.exit_code == 2, r.output
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert len([line for line in lines if line.startswith("error:")]) == 1 and "Traceback" not in r.output
    return " ".join(r.output.split())


def test_cli_bad_input(tmp_path):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    src = _model_dir(tmp_path)
    out = tmp_path / "out"
    assert "keep-softmax must be a fraction in [0, 1]" in _error(invoke("linearize", src, "-o", out, "--keep-softmax", 1.5))
    assert "not a token count" in _error(invoke("linearize", src, "-o", out, "--tokens", "lots"))
    assert "out of range" in _error(invoke("linearize", src, "-o", out, "--keep-layers", "0,7", "--calib-samples", 1,
                                           "--seq-len", 16, "--device", "cpu"))
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".resume")]  # (no job left to resume)
    # flags taken and ignored before (recorded in the manifest, unused)
    for flags, message in [(["--tokens", "0", "--lr", "5"], "--lr set the fine-tune, and --tokens 0 runs none"),
                           (["--method", "liger", "--transfer-steps", "1000"], "liger has none"),
                           (["--keep-layers", ","], "--keep-layers ',' has an empty item"),
                           (["--keep-layers", "0,0"], "--keep-layers '0,0' lists 0 twice"),
                           (["--batch-size", "0"], "--batch-size must be ≥ 1, got 0"),
                           (["--keep-layers", "0", "--keep-softmax", "0.5"], "drop --keep-softmax")]:
        assert message in _error(invoke("linearize", src, "-o", out, *flags))
    cfg = Qwen3Config(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, vocab_size=300, head_dim=16)
    qwen3 = _model_dir(tmp_path, "qwen3", Qwen3ForCausalLM(cfg))
    msg = _error(invoke("linearize", qwen3, "-o", out, "--calib-samples", 1, "--seq-len", 16, "--device", "cpu"))
    assert "does not support the attention class Qwen3Attention" in msg
    assert not out.exists()


@pytest.mark.parametrize("stage,flags", [("transfer", "--calib-samples or --batch-size"),
                                         ("fine-tune", "--batch-size or --seq-len")])
def test_a_gpu_out_of_memory_is_one_line_naming_linearize_flags(tmp_path, monkeypatch, stage, flags):
    """A CUDA out-of-memory in the fine-tune was a traceback; the transfer's, from the calibration driver, told the
    user to lower --calib-batch, which linearize does not have."""
    from llmcomp.linearize import distill

    def oom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory.")

    monkeypatch.setattr(distill, "_student" if stage == "transfer" else "_kl", oom)
    r = invoke("linearize", _model_dir(tmp_path), "-o", tmp_path / "out", "--window", 4, "--tokens", 128,
               "--seq-len", 32, "--batch-size", 2, "--calib-samples", 2, "--transfer-steps", 1, "--device", "cpu")
    msg = _error(r)
    assert "does not fit in the memory of cpu" in msg and f"lower {flags}, or linearize with --device cpu" in msg
    assert "--calib-batch" not in msg


@pytest.mark.slow
def test_bundled_model_liger_hybrid_loads_generates_and_scores(tmp_path, bundled_dir):
    """The real model end to end on a tiny budget: 29 linear layers + layer 0 softmax, an artifact that
    loads, generates and has a finite held-out perplexity."""
    import math

    config = LinearizeConfig(method="liger", window=16, keep_layers=(0,), transfer_steps=0, tokens=256, seq_len=64,
                             batch_size=2)
    out = api.linearize(config, tmp_path / "lin", str(bundled_dir), calib_samples=1, calib_seq_len=64, device="cpu")
    model, tok = api.load(out, return_tokenizer=True)
    assert len(students_of(model)) == 29
    ids = tok("It is a truth universally acknowledged", return_tensors="pt")
    gen = model.generate(**ids, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert gen.shape[1] == ids["input_ids"].shape[1] + 6
    assert math.isfinite(api.evaluate(out, n_windows=1, seq_len=128, device="cpu")["ppl"])


def test_a_model_with_a_kv_policy_is_refused_before_any_work():
    """linearize took a KV-policy artifact and wrote one that ``llmcomp.load`` then refused."""
    from llmcomp.linearize import distill
    from tests.conftest import tiny_llama

    with pytest.raises(UserError, match="KV-cache policy"):
        distill.check_model(tiny_llama(), [{"method": "kv-streaming", "kind": "kv"}])


def test_a_diverged_fine_tune_writes_nothing(tmp_path):
    """--lr inf (or 1e30) wrote an artifact of NaN weights ("KL 0.000 → nan") with exit status 0."""
    src = _model_dir(tmp_path)
    with pytest.raises(UserError, match="positive and finite"):
        LinearizeConfig(method="hedgehog", lr=math.inf)
    config = LinearizeConfig(method="hedgehog", window=0, lr=1e30, **SMALL)
    with pytest.raises(UserError, match="diverged|NaN or inf"):
        api.linearize(config, tmp_path / "lin", str(src), calib_samples=2, calib_seq_len=32, device="cpu")
    assert not (tmp_path / "lin").exists()


def test_an_artifact_never_holds_nan(tiny_model, tmp_path):
    """The writer's own guard, whatever made the model: a NaN tensor, or one past float16 once cast. NVFP4's
    float8 block scales, which torch.isfinite does not take on a CPU, are checked too (that refused every NVFP4
    artifact)."""
    from llmcomp.core.artifact import write_artifact
    from llmcomp.core.numeric import all_finite

    scales = torch.tensor([1.0, 448.0, -2.0]).to(torch.float8_e4m3fn)
    assert all_finite(scales) and not all_finite(torch.cat([scales, torch.tensor([math.nan]).to(scales.dtype)]))
    assert all_finite(torch.empty(0)) and not all_finite(torch.tensor([1.0, -math.inf]))

    with torch.no_grad():
        tiny_model.model.norm.weight[0] = 1e6
    with pytest.raises(UserError, match="model.norm.weight holds NaN or inf values once stored as float16"):
        write_artifact(tmp_path / "a", tiny_model, None, base_model={}, stages=[], dtype=torch.float16)
    with torch.no_grad():
        tiny_model.model.norm.weight[0] = math.nan
    with pytest.raises(UserError, match="model.norm.weight holds NaN"):
        write_artifact(tmp_path / "a", tiny_model, None, base_model={}, stages=[])
    assert not (tmp_path / "a").exists()


def test_settings_that_train_nothing_are_refused_before_any_work(tmp_path):
    """A window covering the calibration windows (the layers never used linear attention), a LoRA rank past the
    projections and --tokens 0.5 (no fine-tune) were taken silently."""
    from llmcomp.cli.linearize import parse_tokens

    src = _model_dir(tmp_path)
    for config, kw, match in ((LinearizeConfig(method="hedgehog", window=32, **{**SMALL, "seq_len": 64}),
                               dict(calib_seq_len=32), "not smaller than the training windows \\(32 tokens\\)"),
                              (LinearizeConfig(method="hedgehog", window=4, lora_rank=100000, **SMALL),
                               dict(calib_seq_len=32), "--lora-rank 100000 is larger")):
        with pytest.raises(UserError, match=match):
            api.linearize(config, tmp_path / "lin", str(src), calib_samples=2, device="cpu", **kw)
    assert not (tmp_path / "lin").exists() and not list(tmp_path.glob(".lin*"))
    with pytest.raises(UserError, match="whole number of tokens"):
        parse_tokens("0.5")
    assert parse_tokens("1.5k") == 1500 and parse_tokens("4.1M") == 4_100_000  # (float: 4099999.99…)


def test_fine_tune_text_past_the_vocabulary_is_refused_before_any_work(tmp_path, monkeypatch):
    """Only the calibration windows were checked: a rare id in the fine-tune's stream failed after stage 1 with an
    IndexError traceback and left the resume folder behind."""
    from llmcomp.core import data

    src = _model_dir(tmp_path)
    real = data.tokenize
    monkeypatch.setattr(data, "tokenize", lambda *a, **k: torch.cat([real(*a, **k), torch.tensor([10 ** 6])]))
    with pytest.raises(UserError, match="token id 1000000, past the model's"):
        api.linearize(LinearizeConfig(method="hedgehog", window=4, **SMALL), tmp_path / "lin", str(src),
                      calib_samples=2, calib_seq_len=32, device="cpu")
    assert not list(tmp_path.glob(".lin*"))


@pytest.mark.parametrize("family", ["qwen2_moe", "mixtral"])
def test_a_moefied_model_linearizes(tmp_path, family):
    """convert moefy writes a Qwen2-MoE or Mixtral model, whose attention is Qwen2's / Llama's: linearize refused it
    (and so did llmcomp.load of such an artifact). Its decode through the cache matches the full forward."""
    from transformers import DynamicCache

    from test_experts import tiny_moe

    src = _model_dir(tmp_path, model=tiny_moe(family))
    out = api.linearize(LinearizeConfig(method="gla", window=4, keep_layers=(1,), **SMALL), tmp_path / "lin",
                        str(src), calib_samples=2, calib_seq_len=32, device="cpu")
    label = api.stage_label(api.inspect(out)["stages"][-1])
    assert label == "linearize-gla window 4, 1 softmax layer, fine-tune 128 tokens"
    model = api.load(out)
    assert type(model.model.layers[0].self_attn).__name__ == "LinearAttention"
    with torch.no_grad():
        full = model(IDS).logits
        kw = {cache_kwarg(model): DynamicCache(config=model.config), "use_cache": True}
        steps = [model(IDS[:, :9], **kw).logits] + [model(IDS[:, t:t + 1], **kw).logits for t in range(9, 24)]
    assert torch.allclose(torch.cat(steps, 1), full, atol=1e-5)

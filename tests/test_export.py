"""llmcomp export (compressed-tensors, GPTQ) and import of those checkpoints.

Round trips compare logits of ``llmcomp.load(artifact)`` with the export loaded by transformers
(compressed-tensors) or re-imported by llmcomp (GPTQ, compressed-tensors), and GPTQ tensors with a
reader written from the layout alone."""
from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import llmcomp
from llmcomp import api
from llmcomp.cli.app import app
from llmcomp.core.artifact import read_manifest, write_artifact
from llmcomp.core.qlinear import QuantLinear
from llmcomp.errors import UserError
from llmcomp.formats import Uniform
from llmcomp.formats.fp4 import FP4, MXFP4, NVFP4
from llmcomp.interop import gptq_layout
from llmcomp.interop.words import codes_to_words, words_to_codes
from llmcomp.quant import RTNConfig
from llmcomp.quant.fp4 import FP4Config

runner = CliRunner()
IDS = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(0))


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits.float()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from tests.conftest import tiny_llama

    path = tmp_path_factory.mktemp("m") / "tiny"
    tiny_llama(hidden=64, inter=128).save_pretrained(path)  # every dimension a multiple of 32
    return path


@pytest.fixture(scope="module")
def arts(model_dir, tmp_path_factory):
    """Artifacts by name, made once per module."""
    root = tmp_path_factory.mktemp("arts")
    configs = {"w4g32": RTNConfig(format=Uniform(4, 32)), "w4g32sym": RTNConfig(format=Uniform(4, 32, True)),
               "w8": RTNConfig(format=Uniform(8, 0, True)), "w3g32": RTNConfig(format=Uniform(3, 32)),
               "w2g16": RTNConfig(format=Uniform(2, 16)), "nvfp4": FP4Config(format=NVFP4()),
               "mxfp4": FP4Config(format=MXFP4())}
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = api.quantize(configs[name], root / name, str(model_dir))
        return cache[name]

    return get


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def one_error(result) -> str:
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    return lines[0]


# -- packing ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
@pytest.mark.parametrize("n", [32, 96, 40, 576])
def test_words_round_trip(bits, n):
    codes = torch.randint(0, 1 << bits, (5, n), dtype=torch.uint8)
    words = codes_to_words(codes, bits, math.ceil(n * bits / 32))
    assert words.dtype == torch.int32
    assert torch.equal(words_to_codes(words, bits, n), codes)


def test_words_match_compressed_tensors_packing():
    ct = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    for bits in (2, 3, 4, 8):
        codes = torch.randint(0, 1 << bits, (3, 100), dtype=torch.uint8)
        theirs = ct.pack_to_int32((codes.long() - (1 << bits - 1)).to(torch.int8), bits)
        assert torch.equal(codes_to_words(codes, bits, theirs.shape[1]), theirs)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group,sym", [(32, False), (32, True), (0, False), (48, False)],
                         ids=["g32-asym", "g32-sym", "per-channel", "g48-ragged"])
@pytest.mark.parametrize("v1", [True, False], ids=["v1", "v2"])
def test_gptq_layout_exact(bits, group, sym, v1):
    fmt = Uniform(bits, group, sym)
    out_f, in_f = 64, 160
    w = torch.randn(out_f, in_f)
    # scale/zero per group by the format's own min/max rule, codes on that grid
    ng = fmt.n_groups(in_f)
    scale, zero = torch.empty(out_f, ng), torch.empty(out_f, ng)
    g = fmt.group(in_f)
    for j in range(ng):
        scale[:, j], zero[:, j] = fmt.qparams(w[:, j * g:(j + 1) * g])
    zero = zero.clamp(min=1) if v1 else zero  # v1 cannot store z = 0
    codes = fmt.encode(w, fmt.expand(scale, in_f), fmt.expand(zero, in_f)).to(torch.uint8)
    packed = fmt.pack({"codes": codes, "scale": scale, "zero": zero})
    ours = fmt.dequantize(packed, in_f)
    t = gptq_layout.pack_layer(codes, scale.half(), zero.long(), bits, group, v1)
    assert t["qweight"].shape == (in_f * bits // 32, out_f) and t["qzeros"].shape == (ng, out_f * bits // 32)
    assert torch.equal(gptq_layout.dequantize_gptq(t, bits, v1), ours)  # independent reader
    qcfg = {"bits": bits, "group_size": group or -1, "checkpoint_format": "gptq" if v1 else "gptq_v2"}
    fmt2, packed2 = gptq_layout.import_layer("x", t, qcfg, in_f)
    assert torch.equal(fmt2.dequantize(packed2, in_f), ours)


# -- compressed-tensors export ------------------------------------------------------------------------
def _hf(path, dequantize: bool):
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    kw = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if dequantize else {}
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kw)


@pytest.mark.parametrize("name,dequantize,tol", [
    ("w4g32sym", False, 0.0),  # transformers' default (compressed) load path
    ("w8", False, 0.0),
    ("w4g32", True, 0.0),  # asymmetric: see test_ct_asym_default_path for why dequantize=True
    ("w3g32", True, 0.0),
    ("mxfp4", True, 0.0),
    ("nvfp4", True, 5e-3),  # compressed-tensors decompresses NVFP4 in bfloat16
])
def test_compressed_tensors_loads_in_transformers(arts, tmp_path, name, dequantize, tol):
    pytest.importorskip("compressed_tensors")
    art = arts(name)
    out = tmp_path / "ct"
    result = invoke("export", art, "--to", "compressed-tensors", "-o", out)
    assert result.exit_code == 0, result.output
    diff = (logits(llmcomp.load(art)) - logits(_hf(out, dequantize))).abs().max().item()
    print(f"compressed-tensors {name}: max |Δlogit| = {diff:.3g}")
    assert diff <= tol
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["ignore"] == ["lm_head"]
    assert "llmcomp.json" not in {p.name for p in out.iterdir()}


def test_ct_a_quantized_head_of_a_tied_model_loads_in_transformers(tmp_path):
    """The tie flag was copied: transformers then tied lm_head.weight, which a compressed head does not have."""
    pytest.importorskip("compressed_tensors")
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, max_position_embeddings=256, tie_word_embeddings=True)
    LlamaForCausalLM(cfg).eval().save_pretrained(tmp_path / "m")
    art = api.quantize(RTNConfig(format=Uniform(4, 32, True), ignore=()), tmp_path / "q", str(tmp_path / "m"))
    out = tmp_path / "ct"
    assert invoke("export", art, "--to", "compressed-tensors", "-o", out).exit_code == 0
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    assert (logits(llmcomp.load(art)) - logits(_hf(out, False))).abs().max().item() == 0


def test_ct_nvfp4_tensors_exact(arts, tmp_path):
    """NVFP4: the packed bytes and block scales are llmcomp's, the global scale its reciprocal."""
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors.nvfp4.helpers import unpack_fp4_from_uint8

    art = arts("nvfp4")
    api.export(art, "compressed-tensors", tmp_path / "ct")
    st = load_file(str(tmp_path / "ct" / "model.safetensors"))
    layer = llmcomp.load(art).model.layers[1].mlp.down_proj
    name = "model.layers.1.mlp.down_proj"
    vals = unpack_fp4_from_uint8(st[f"{name}.weight_packed"], layer.out_features, layer.in_features,
                                 dtype=torch.float32)
    codes = layer.fmt.unpack(layer.packed_tensors(), layer.in_features)["codes"]
    assert torch.equal(vals, NVFP4().element.decode(codes))
    assert torch.equal(st[f"{name}.weight_scale"].view(torch.uint8), layer.weight_scale.view(torch.uint8))
    assert torch.allclose(st[f"{name}.weight_global_scale"] * layer.weight_global_scale, torch.ones(1), rtol=1e-6)


def test_ct_asym_default_path(arts, tmp_path):
    """Documents a compressed-tensors 0.20 limitation: transformers' default (compressed) load path builds
    asymmetric ``weight_zero_point`` unpacked on the meta device, so any asymmetric pack-quantized
    checkpoint (ours or llm-compressor's) needs ``CompressedTensorsConfig(dequantize=True)``."""
    pytest.importorskip("compressed_tensors")
    art = arts("w4g32")
    api.export(art, "compressed-tensors", tmp_path / "ct")
    try:
        _hf(tmp_path / "ct", dequantize=False)
    except RuntimeError as exc:
        assert "weight_zero_point" in str(exc) or "mismatch" in str(exc)
    else:  # a fixed compressed-tensors: then it must be exact too
        assert (logits(llmcomp.load(art)) - logits(_hf(tmp_path / "ct", False))).abs().max().item() == 0


def test_ct_mixed_formats_and_import(model_dir, tmp_path):
    """Two formats (down_proj at 8 bits per-channel) → two config groups; the import reads both back exactly.
    Symmetric, because transformers' dequantize=True path applies one scheme to every dense layer, and its
    default path does not take asymmetric layers (test_ct_asym_default_path)."""
    pytest.importorskip("compressed_tensors")
    from llmcomp.quant import quantize_model

    model, tok, base, _ = api.open_model(str(model_dir))
    quantize_model(model, RTNConfig(format=Uniform(4, 32, True), ignore=("lm_head", "mlp.down_proj")))
    quantize_model(model, RTNConfig(format=Uniform(8, 0, True), targets=("mlp.down_proj",)))
    art = write_artifact(tmp_path / "mixed", model, tok, base_model=base, stages=[])
    out = tmp_path / "ct"
    assert api.export(art, "compressed-tensors", out)["format"] == "pack-quantized"
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert len(qc["config_groups"]) == 2
    ref = logits(llmcomp.load(art))
    assert (ref - logits(_hf(out, False))).abs().max().item() == 0
    back = llmcomp.load(out)  # import: uniform layers again
    assert isinstance(back.model.layers[0].mlp.down_proj, QuantLinear)
    assert back.model.layers[0].mlp.down_proj.fmt == Uniform(8, 0, True)
    assert torch.equal(logits(back), ref)


def test_inspect_names_a_checkpoint_and_refuses_an_artifact_without_its_manifest(arts, tmp_path):
    """inspect (the command that verifies artifacts) showed a plain "model directory", exit 0, for an artifact whose
    llmcomp.json was deleted, and did not say a GPTQ export was one."""
    import shutil

    out = tmp_path / "gptq"
    assert invoke("export", arts("w4g32"), "--to", "gptq", "-o", out).exit_code == 0
    assert llmcomp.inspect(str(out))["checkpoint"] == "gptq"
    shutil.copytree(arts("w4g32"), tmp_path / "orphan")
    (tmp_path / "orphan" / "llmcomp.json").unlink()
    line = one_error(invoke("inspect", tmp_path / "orphan"))
    assert "holds quantized tensors (e.g. model.layers." in line and "but no llmcomp.json" in line


# -- GPTQ export and import -----------------------------------------------------------------------------
@pytest.mark.parametrize("name,checkpoint_format", [("w4g32", "gptq"), ("w4g32sym", "gptq"), ("w8", "gptq"),
                                                    ("w3g32", "gptq"), ("w2g16", "gptq_v2")])
def test_gptq_round_trip(arts, tmp_path, name, checkpoint_format):
    art = arts(name)
    out = tmp_path / "gptq"
    result = invoke("export", art, "--to", "gptq", "-o", out)
    assert result.exit_code == 0, result.output
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    fmt = llmcomp.load(art).model.layers[0].self_attn.q_proj.fmt
    assert qc["quant_method"] == "gptq" and qc["bits"] == fmt.bits and qc["sym"] == fmt.symmetric
    assert qc["checkpoint_format"] == checkpoint_format and qc["desc_act"] is False
    # every layer: the layout read independently equals llmcomp's dequantize
    st = load_file(str(out / "model.safetensors"))
    ref_model = llmcomp.load(art)
    for n, m in ref_model.named_modules():
        if isinstance(m, QuantLinear):
            t = {k: st[f"{n}.{k}"] for k in ("qweight", "qzeros", "scales", "g_idx")}
            assert torch.equal(gptq_layout.dequantize_gptq(t, fmt.bits, checkpoint_format == "gptq"), m.dequantize()), n
    # import (llmcomp.load / eval / quantize accept the directory): logits identical
    diff = (logits(ref_model) - logits(llmcomp.load(out))).abs().max().item()
    print(f"gptq {name}: max |Δlogit| after import = {diff}")
    assert diff == 0


def test_gptq_import_feeds_quantize(arts, tmp_path):
    """A GPTQ checkpoint as MODEL of quantize: stages start with the import, the layers stay exact."""
    out = tmp_path / "gptq"
    art = arts("w4g32")
    api.export(art, "gptq", out)
    net, _, _, stages = api.open_model(str(out))
    assert api.stage_label(stages[0]) == "import-gptq int4 g32 asym"
    assert stages[0]["metrics"]["bits_per_weight"] == 5.0  # int4 + fp16 scale and zero per 32
    with pytest.raises(UserError, match="this is a gptq checkpoint already: other tools load it as it is"):
        api.export(out, "compressed-tensors", tmp_path / "ct")  # (it said to quantize the model first)
    again = api.quantize(RTNConfig(format=Uniform(8, 0), ignore=()), tmp_path / "again", str(out))  # + lm_head
    m = read_manifest(again)
    assert [s["method"] for s in m["stages"]] == ["import-gptq", "rtn"]
    assert "lm_head" in m["modules"] and "quantization_config" not in json.loads((again / "config.json").read_text())
    reloaded = llmcomp.load(again)
    src = llmcomp.load(art)
    assert torch.equal(reloaded.model.layers[1].mlp.up_proj.dequantize(), src.model.layers[1].mlp.up_proj.dequantize())


def test_an_imported_quantized_head_is_in_the_label(model_dir, tmp_path):
    """A compressed-tensors export of "rtn int4 g32 asym, with lm_head" came back as "import-compressed-tensors int4
    g32 asym", the head unsaid (GPTQ holds no head). A head-less import still reads without it."""
    pytest.importorskip("compressed_tensors")
    for ignore, tail in (((), ", with lm_head"), (("lm_head",), "")):
        art = api.quantize(RTNConfig(format=Uniform(4, 32), ignore=ignore), tmp_path / f"art{tail}", str(model_dir))
        assert api.stage_label(read_manifest(art)["stages"][0]) == "rtn int4 g32 asym" + tail
        api.export(art, "compressed-tensors", tmp_path / f"ct{tail}")
        stage = api.open_model(str(tmp_path / f"ct{tail}"))[3][0]
        assert api.stage_label(stage) == "import-compressed-tensors int4 g32 asym" + tail


def test_an_import_stage_time_is_counted_once(arts, tmp_path):
    """eval's quant s and the report's total summed the import stage's time (the reading of the checkpoint by the
    command that made the next stage) and that next stage's, which includes it: 3.09 + 8.17 s for an 8.17 s run."""
    out = tmp_path / "gptq"
    api.export(arts("w4g32"), "gptq", out)
    stages = read_manifest(api.quantize(RTNConfig(format=Uniform(8, 0), ignore=()), tmp_path / "q", str(out)))["stages"]
    assert [s["method"] for s in stages] == ["import-gptq", "rtn"]
    assert stages[1]["wall_time_s"] >= stages[0]["wall_time_s"]  # (the import ran inside the quantize command)
    assert api.stages_seconds([{**stages[0], "wall_time_s": 3.09}, {**stages[1], "wall_time_s": 8.17}]) == 8.17


@pytest.mark.parametrize("to", ["gptq", "compressed-tensors"])
def test_an_artifact_made_from_an_export_records_the_original_base_model(arts, model_dir, tmp_path, to):
    """Its manifest named the export folder (an int4 checkpoint) as its base model: eval --reference base compared
    with it, bench decode timed it as the original. Another tool's checkpoint is its own base, as before."""
    if to == "compressed-tensors":
        pytest.importorskip("compressed_tensors")
    art, out = arts("w4g32sym"), tmp_path / "exported"
    api.export(art, to, out)
    head = RTNConfig(format=Uniform(8, 0), ignore=())  # (the lm_head, the one float linear left)
    again = api.quantize(head, tmp_path / "again", str(out))
    assert read_manifest(again)["base_model"] == read_manifest(art)["base_model"]
    assert api.base_model_path(again) == str(model_dir.resolve())
    (out / "llmcomp_base.json").unlink()  # (as another tool writes it)
    other = read_manifest(api.quantize(head, tmp_path / "other", str(out)))["base_model"]
    assert other["path"] == str(out.resolve())


def _exported_with_base(arts, tmp_path, edit) -> tuple:
    """A GPTQ export whose ``llmcomp_base.json`` record ``edit`` changed (as a published export arrives), and the
    base model its import records."""
    out = tmp_path / "exported"
    api.export(arts("w4g32sym"), "gptq", out)
    record = json.loads((out / "llmcomp_base.json").read_text())
    edit(record["base_model"])
    (out / "llmcomp_base.json").write_text(json.dumps(record))
    return out, api.open_model(str(out))[2]


def test_an_exported_base_not_on_this_machine_loses_its_path(arts, model_dir, tmp_path):
    """An export travels: its record's path, taken unchecked, named a folder of another machine (or nothing) as the
    base model. Name and sha256 stay; eval --reference base asks for a model instead."""
    original = read_manifest(arts("w4g32sym"))["base_model"]
    out, base = _exported_with_base(arts, tmp_path, lambda b: b.update(path=str(tmp_path / "elsewhere" / "tiny")))
    assert base == {"name": original["name"], "sha256": original["sha256"]}
    again = api.quantize(RTNConfig(format=Uniform(8, 0), ignore=()), tmp_path / "again", str(out))
    assert "path" not in read_manifest(again)["base_model"]
    line = one_error(invoke("eval", again, "--reference", "base"))
    assert "is not on this machine; pass --reference PATH." in line
    assert _exported_with_base(arts, tmp_path / "b", lambda b: b.pop("path"))[1] == base  # (absent: the same)
    assert _exported_with_base(arts, tmp_path / "n", lambda b: b.update(path=None))[1] == base  # (null: the same)
    assert _exported_with_base(arts, tmp_path / "c", lambda b: None)[1] == original  # (there and unchanged: kept)


def test_an_exported_base_path_holding_other_weights_is_dropped(arts, model_dir, tmp_path):
    """A record whose path holds another model (a crafted download: anything on the user's disk) was compared with
    as the original; a record not of a base model's shape was taken as one."""
    from tests.conftest import tiny_llama

    original = read_manifest(arts("w4g32sym"))["base_model"]
    other = tmp_path / "other"
    tiny_llama(hidden=64, inter=128, seed=1).save_pretrained(other)  # (the same shape, other weights)
    for i, path in enumerate([other, tmp_path, tmp_path / "other" / "config.json", "tiny"]):
        base = _exported_with_base(arts, tmp_path / str(i), lambda b: b.update(path=str(path)))[1]
        assert base == {"name": original["name"], "sha256": original["sha256"]}, path
    for i, bad in enumerate([{"sha256": None}, {"name": 3}, {"path": ["x"]}]):
        out, base = _exported_with_base(arts, tmp_path / f"bad{i}", lambda b: b.update(bad))
        assert base["path"] == str(out.resolve()), bad  # (read as another tool's checkpoint: its own base)


def test_gptq_legacy_quantize_config(arts, tmp_path):
    """Older AutoGPTQ checkpoints: settings in quantize_config.json, an inv_freq buffer among the tensors."""
    from safetensors.torch import save_file

    out = tmp_path / "gptq"
    api.export(arts("w4g32sym"), "gptq", out)
    cfg = json.loads((out / "config.json").read_text())
    (out / "quantize_config.json").write_text(json.dumps(cfg.pop("quantization_config")))
    (out / "config.json").write_text(json.dumps(cfg))
    st = load_file(str(out / "model.safetensors"))
    st["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    save_file(st, str(out / "model.safetensors"))
    assert torch.equal(logits(llmcomp.load(out)), logits(llmcomp.load(arts("w4g32sym"))))
    # its weights named by model_file_base_name (they were "missing": only model.safetensors was looked for)
    qc = json.loads((out / "quantize_config.json").read_text())
    (out / "quantize_config.json").write_text(json.dumps({**qc, "model_file_base_name": "gptq_model-4bit-32g"}))
    (out / "model.safetensors").rename(out / "gptq_model-4bit-32g.safetensors")
    assert torch.equal(logits(llmcomp.load(out)), logits(llmcomp.load(arts("w4g32sym"))))


def test_gptq_ragged_groups_export(tmp_path):
    """GPTQ's g_idx expresses llmcomp's ragged last group (in=96, g=64 → groups of 64 and 32)."""
    from tests.conftest import tiny_llama

    tiny_llama(hidden=64, inter=96).save_pretrained(tmp_path / "m")
    art = api.quantize(RTNConfig(format=Uniform(4, 64)), tmp_path / "a", str(tmp_path / "m"))
    summary = api.export(art, "gptq", tmp_path / "g")
    assert summary["ragged_layers"] == 2  # the two down_proj layers
    assert torch.equal(logits(llmcomp.load(art)), logits(llmcomp.load(tmp_path / "g")))


def test_gptq_act_order_import_refused(arts, tmp_path):
    out = tmp_path / "gptq"
    api.export(arts("w4g32"), "gptq", out)
    st = load_file(str(out / "model.safetensors"))
    st["model.layers.0.mlp.up_proj.g_idx"] = st["model.layers.0.mlp.up_proj.g_idx"].flip(0).contiguous()
    from safetensors.torch import save_file

    save_file(st, str(out / "model.safetensors"))
    with pytest.raises(UserError, match="act-order"):
        llmcomp.load(out)


def test_gptq_import_without_g_idx_and_of_the_wrong_shapes(arts, tmp_path):
    """A GPTQ checkpoint without g_idx (groups in order) imports; one whose qzeros or an unquantized tensor do not
    fit the model is one UserError at load (a KeyError, a failure at the first forward, accelerate's ValueError)."""
    from safetensors.torch import save_file

    out = tmp_path / "gptq"
    api.export(arts("w4g32"), "gptq", out)
    st = load_file(str(out / "model.safetensors"))
    ref = logits(llmcomp.load(out))
    name = "model.layers.0.mlp.up_proj"
    for case, edit, match in (
            ("no-g_idx", lambda d: d.pop(f"{name}.g_idx"), None),
            ("qzeros", lambda d: d.update({f"{name}.qzeros": d[f"{name}.qzeros"][:-1].contiguous()}),
             "does not fit the model's"),
            ("norm", lambda d: d.update({"model.norm.weight": d["model.norm.weight"][:-1].contiguous()}),
             "model.norm.weight has shape")):
        d = dict(st)
        edit(d)
        save_file(d, str(out / "model.safetensors"))
        if match is None:
            assert torch.equal(logits(llmcomp.load(out)), ref), case
        else:
            with pytest.raises(UserError, match=match):
                llmcomp.load(out)


def test_ct_act_order_import_refused(arts, tmp_path):
    """A permuted weight_g_idx was ignored: the layer imported with the wrong groups, silently."""
    pytest.importorskip("compressed_tensors")
    out = tmp_path / "ct"
    api.export(arts("w4g32"), "compressed-tensors", out)
    st = load_file(str(out / "model.safetensors"))
    n = st["model.layers.0.mlp.up_proj.weight_packed"].shape[1] * 8
    st["model.layers.0.mlp.up_proj.weight_g_idx"] = (torch.arange(n) % (n // 32)).to(torch.int32)
    from safetensors.torch import save_file

    save_file(st, str(out / "model.safetensors"))
    with pytest.raises(UserError, match="act-order"):
        llmcomp.load(out)


def test_an_imported_checkpoint_takes_the_dtype_asked(arts, tmp_path):
    """accelerate cast every tensor back to the float32 skeleton: ``dtype`` had no effect on imports."""
    out = tmp_path / "gptq"
    api.export(arts("w4g32"), "gptq", out)
    for dtype in (torch.bfloat16, torch.float16):
        model = llmcomp.load(out, dtype=dtype)
        assert {p.dtype for p in model.parameters()} == {dtype}


# -- refusals: one error line, exit 2, nothing written ------------------------------------------------
def _decoupleq_like(model_dir, tmp_path):
    """An artifact whose zero points are real-valued, as decoupleQ writes them."""
    from llmcomp.quant import quantize_model

    model, tok, base, _ = api.open_model(str(model_dir))
    quantize_model(model, RTNConfig(format=Uniform(4, 32)))
    layer = model.model.layers[0].self_attn.q_proj
    layer.weight_zero.add_(0.25)
    return write_artifact(tmp_path / "dq", model, tok, base_model=base, stages=[])


def _kv_stage(arts, tmp_path):
    src = arts("w4g32")
    model, tok, manifest = llmcomp.load(src), None, read_manifest(src)
    stages = manifest["stages"] + [{"method": "kv-snapkv", "kind": "kv", "config": {}, "metrics": {}}]
    return write_artifact(tmp_path / "kv", model, tok, base_model=manifest["base_model"], stages=stages)


def _moe_skip_then_quantize(tmp_path):
    """prune dynamic, then quantize, which unfuses the experts: two stages other tools would not rebuild."""
    from llmcomp.prune.mcmoe import DynamicSkipConfig
    from tests.test_experts import _save_with_tokenizer, tiny_moe

    src = _save_with_tokenizer(tiny_moe("mixtral"), tmp_path / "moe")
    dyn = api.skip_experts(DynamicSkipConfig(rate=0.3), tmp_path / "dyn", str(src), calib_samples=2,
                           calib_seq_len=32, device="cpu")
    return api.quantize(RTNConfig(format=Uniform(4, 16)), tmp_path / "q", str(dyn))


def _fp4_group(model_dir, tmp_path):
    return api.quantize(FP4Config(format=FP4(group_size=32)), tmp_path / "fp4", str(model_dir))


def _ragged(model_dir, tmp_path):
    from tests.conftest import tiny_llama

    tiny_llama(hidden=64, inter=96).save_pretrained(tmp_path / "m96")
    return api.quantize(RTNConfig(format=Uniform(4, 64)), tmp_path / "r", str(tmp_path / "m96"))


def _partial(model_dir, tmp_path):
    return api.quantize(RTNConfig(format=Uniform(4, 32), ignore=("lm_head", "mlp.down_proj")), tmp_path / "p",
                        str(model_dir))


def _five_bits(model_dir, tmp_path):
    return api.quantize(RTNConfig(format=Uniform(5, 32)), tmp_path / "b5", str(model_dir))


REFUSALS = [
    ("not-artifact", lambda a, m, t: m, "compressed-tensors", "not an llmcomp artifact"),
    ("missing", lambda a, m, t: t / "nope", "gptq", "does not exist"),
    ("decoupleq-zeros-ct", lambda a, m, t: _decoupleq_like(m, t), "compressed-tensors", "real-valued zero points"),
    ("decoupleq-zeros-gptq", lambda a, m, t: _decoupleq_like(m, t), "gptq", "real-valued zero points"),
    ("kv-policy", lambda a, m, t: _kv_stage(a, t), "compressed-tensors", "KV-cache policy"),
    # (it said "MoE layout (unfused or pruned experts) (stage 'experts-dynamic-skip')": the kind's words, its first)
    ("moe-stages", lambda a, m, t: _moe_skip_then_quantize(t), "gptq",
     "has a dynamic expert-skip threshold (stage 'experts-dynamic-skip') and unfused MoE experts (stage "
     "'unfuse-experts'), which have no GPTQ equivalent; export an artifact without them."),
    ("fp4-group-ct", lambda a, m, t: _fp4_group(m, t), "compressed-tensors", "no compressed-tensors equivalent"),
    ("nvfp4-gptq", lambda a, m, t: a("nvfp4"), "gptq", "no GPTQ equivalent"),
    ("ragged-ct", lambda a, m, t: _ragged(m, t), "compressed-tensors",
     "ragged last group has no equivalent there. Re-quantize with a group size that divides every layer. Export to "
     "gptq instead."),
    ("partial-gptq", lambda a, m, t: _partial(m, t), "gptq",
     "every linear layer of the decoder; quantize that layer too. Export to compressed-tensors instead."),
    ("5-bit-gptq", lambda a, m, t: _five_bits(m, t), "gptq", "2, 3, 4 or 8 bits; "),
    ("unknown-target", lambda a, m, t: a("w4g32"), "onnx", "Unknown export target"),
]


@pytest.mark.parametrize("make,to,needle", [r[1:] for r in REFUSALS], ids=[r[0] for r in REFUSALS])
def test_export_refusals(arts, model_dir, tmp_path, make, to, needle):
    if to == "compressed-tensors":
        pytest.importorskip("compressed_tensors")
    src = make(arts, model_dir, tmp_path)
    out = tmp_path / "out"
    line = one_error(invoke("export", src, "--to", to, "-o", out))
    assert needle in line, line
    assert not out.exists()


def test_a_refusal_points_at_the_other_target_only_where_it_takes_the_artifact(tmp_path):
    """A ragged bit allocation: gptq said "Export to compressed-tensors instead", which said "or export to gptq"."""
    pytest.importorskip("compressed_tensors")
    from tests.conftest import tiny_llama

    tiny_llama(hidden=64, inter=96).save_pretrained(tmp_path / "m96")
    mixed = api.quantize(RTNConfig(format=Uniform(4, 64), formats={"model.layers.0.mlp.down_proj": Uniform(8, 64)}),
                         tmp_path / "mixed", str(tmp_path / "m96"))
    for to, needle in (("gptq", "mixes 2 formats"), ("compressed-tensors", "ragged last group")):
        line = one_error(invoke("export", mixed, "--to", to, "-o", tmp_path / "out"))
        assert needle in line and "instead" not in line, line
    from llmcomp.quant import quantize_model

    model, tok, base, _ = api.open_model(str(tmp_path / "m96"))  # 5 bits (no GPTQ) with real-valued zeros (no CT)
    quantize_model(model, RTNConfig(format=Uniform(5, 32)))
    model.model.layers[0].self_attn.q_proj.weight_zero.add_(0.25)
    dq = write_artifact(tmp_path / "dq5", model, tok, base_model=base, stages=[])
    line = one_error(invoke("export", dq, "--to", "gptq", "-o", tmp_path / "out"))
    assert "2, 3, 4 or 8 bits" in line and "instead" not in line, line


def test_export_existing_output(arts, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    assert "already exists" in one_error(invoke("export", arts("w4g32"), "--to", "gptq", "-o", out))
    assert invoke("export", arts("w4g32"), "--to", "gptq", "-o", out, "--overwrite").exit_code == 0


@pytest.mark.parametrize("to", ["gptq", "compressed-tensors"])
def test_export_never_replaces_its_source(arts, tmp_path, to):
    """-o naming the artifact itself (or a folder above it) is refused even with --overwrite: the export would
    delete the artifact it reads."""
    import shutil

    src = tmp_path / "a"
    shutil.copytree(arts("w4g32"), src)
    for out in (src, tmp_path):
        assert "would replace the input" in one_error(invoke("export", src, "--to", to, "-o", out, "--overwrite"))
    assert (src / "llmcomp.json").exists()


def test_export_without_package(arts, tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "compressed_tensors", None)  # import fails
    line = one_error(invoke("export", arts("w4g32"), "--to", "compressed-tensors", "-o", tmp_path / "o"))
    assert "extra 'export'" in line and "pip install compressed-tensors" in line


def test_ct_float_import_refused(arts, tmp_path):
    """Importing compressed-tensors float (NVFP4) layers is not done: a clear error, not a wrong model."""
    pytest.importorskip("compressed_tensors")
    api.export(arts("nvfp4"), "compressed-tensors", tmp_path / "ct")
    with pytest.raises(UserError, match="int pack-quantized layers only"):
        api.open_model(str(tmp_path / "ct"))


# -- the bundled model --------------------------------------------------------------------------------
@pytest.mark.slow
def test_bundled_round_trips(bundled_dir, tmp_path):
    """SmolLM2-135M, RTN int4 g64 asym (576 and 1536 are multiples of 64): both exports, 32 tokens."""
    torch.set_num_threads(2)
    art = api.quantize(RTNConfig(format=Uniform(4, 64)), tmp_path / "a", str(bundled_dir))
    ids = torch.arange(1000, 1032).reshape(1, 32)
    with torch.no_grad():
        ref = llmcomp.load(art)(ids).logits
    api.export(art, "gptq", tmp_path / "g")
    with torch.no_grad():
        d_gptq = (ref - llmcomp.load(tmp_path / "g")(ids).logits).abs().max().item()
    print(f"bundled gptq import: max |Δlogit| = {d_gptq}")
    assert d_gptq == 0
    if pytest.importorskip("compressed_tensors"):
        api.export(art, "compressed-tensors", tmp_path / "c")
        with torch.no_grad():
            d_ct = (ref - _hf(tmp_path / "c", True)(ids).logits).abs().max().item()
        print(f"bundled compressed-tensors via transformers: max |Δlogit| = {d_ct}")
        assert d_ct == 0


@pytest.mark.parametrize("target", ["gptq", "compressed-tensors"])
def test_export_keeps_the_stored_dtype(model_dir, tmp_path, target):
    """A --dtype bfloat16 artifact exported its embeddings and norms as float32 under a config.json that says
    bfloat16 (the artifact was loaded into a float32 skeleton)."""
    art = api.quantize(RTNConfig(format=Uniform(4, 32)), tmp_path / "a", str(model_dir), dtype="bfloat16")
    assert json.loads((art / "config.json").read_text())["dtype"] == "bfloat16"
    out = tmp_path / "x"
    assert invoke("export", art, "--to", target, "-o", out).exit_code == 0
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    st = load_file(str(out / "model.safetensors"))
    assert st["model.embed_tokens.weight"].dtype == st["model.norm.weight"].dtype == torch.bfloat16


def _edited(src, out, tensors=None, config=None):
    """A copy of checkpoint ``src`` at ``out`` with its tensors and quantization_config edited."""
    import shutil

    from safetensors.torch import save_file

    shutil.copytree(src, out)
    st = load_file(str(out / "model.safetensors"))
    (tensors or (lambda st: None))(st)
    save_file(st, str(out / "model.safetensors"))
    cfg = json.loads((out / "config.json").read_text())
    (config or (lambda qc: None))(cfg["quantization_config"])
    (out / "config.json").write_text(json.dumps(cfg))
    return out


def test_malformed_external_checkpoints_are_one_error_line(arts, tmp_path):
    """Each was a traceback from inside the layout code, or a wrong model: a compressed-tensors < 0.18 layout (one
    word per 32 // bits codes) read as a dense stream, GPTQModel's per-module overrides read with the global
    settings (a false act-order refusal), words of another width."""
    gq, ct = tmp_path / "gq", tmp_path / "ct"
    api.export(arts("w4g32"), "gptq", gq)
    api.export(arts("w3g32"), "compressed-tensors", ct)
    layer = "model.layers.0.mlp.up_proj"

    def padded(st):  # one more word a row, as the older layout's count
        for k in [k for k in st if k.endswith("weight_packed")]:
            st[k] = torch.cat([st[k], torch.zeros_like(st[k][:, :1])], 1)

    cases = [
        (_edited(gq, tmp_path / "a", tensors=lambda st: st.pop(f"{layer}.scales")), "lacks 'scales'"),
        (_edited(gq, tmp_path / "b", config=lambda qc: qc.update(bits=None)),
         "quantization_config.bits is None, not an integer"),
        (_edited(gq, tmp_path / "b2", config=lambda qc: qc.update(bits=4.7)),  # (read as 4)
         "quantization_config.bits is 4.7, not an integer"),
        (_edited(gq, tmp_path / "b3", config=lambda qc: qc.update(group_size=64)),  # (g_idx in groups of 32)
         "g_idx groups the inputs otherwise than quantization_config.group_size 64 says"),
        (_edited(gq, tmp_path / "c", config=lambda qc: qc.update(dynamic={"+:.*mlp.*": {"group_size": 64}})),
         "overrides bits or group size per module"),
        (_edited(gq, tmp_path / "d", config=lambda qc: qc.update(pack_dtype="int16")), "packs its codes in int16"),
        (_edited(ct, tmp_path / "e", tensors=padded), "before 0.18, one word per 10 codes"),
    ]
    for path, message in cases:
        assert message in one_error(invoke("eval", path, "--windows", 1, "--seq-len", 16)), path


def test_an_export_refusal_tells_pruned_expert_neurons_from_pruned_experts():
    """HEAPr removes neurons inside experts, not experts: its stage read 'pruned MoE experts'."""
    from llmcomp.interop.source import _stage_what

    assert _stage_what({"kind": "moe", "method": "experts-heapr"}) == "pruned MoE expert neurons"
    assert _stage_what({"kind": "moe", "method": "experts-frequency"}) == "pruned MoE experts"

import json
import os
import shutil
import time
from pathlib import Path

import pytest
import torch

import llmcomp
from llmcomp import api
from llmcomp.core import artifact as artifact_mod
from llmcomp.core.artifact import read_manifest
from llmcomp.core.qlinear import QuantLinear
from llmcomp.errors import UserError
from llmcomp.formats import Uniform
from llmcomp.quant import RTNConfig

W4 = RTNConfig(format=Uniform(bits=4, group_size=32))


@pytest.fixture
def art(tiny_model_dir, tmp_path):
    return api.quantize(W4, tmp_path / "art", str(tiny_model_dir))


def _state(model):
    return {k: v for k, v in model.state_dict().items()}


def test_write_read_identical_tensors(tiny_model_dir, tmp_path):
    model, _, base, _ = api.open_model(str(tiny_model_dir))
    from llmcomp.quant import quantize_model

    quantize_model(model, W4)
    out = artifact_mod.write_artifact(tmp_path / "a", model, None, base_model=base, stages=[])
    loaded = llmcomp.load(out)
    a, b = _state(model), _state(loaded)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    ids = torch.randint(0, 128, (2, 12))
    assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_a_quantized_head_of_a_tied_model_is_written_untied(tmp_path):
    """The artifact kept tie_word_embeddings: the loader then tied the embedding onto the QuantLinear head as a
    ``weight`` its forward never reads (state_dict() listed lm_head.weight beside its packed tensors)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, tie_word_embeddings=True)
    LlamaForCausalLM(cfg).eval().save_pretrained(tmp_path / "m")
    q = api.quantize(RTNConfig(format=Uniform(4, 32), ignore=()), tmp_path / "q", str(tmp_path / "m"))
    assert json.loads((q / "config.json").read_text())["tie_word_embeddings"] is False
    kept = api.quantize(RTNConfig(format=Uniform(4, 32)), tmp_path / "k", str(tmp_path / "m"))  # (lm_head bf16)
    assert json.loads((kept / "config.json").read_text())["tie_word_embeddings"] is True
    config = json.loads((q / "config.json").read_text())  # as written before: the loader does not tie it either
    (q / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    _edit_manifest(q, lambda m: m["files"].update({"config.json": artifact_mod.sha256_file(q / "config.json")}))
    for path in (q, kept):
        model = llmcomp.load(path)
        names = [k for k in model.state_dict() if k.startswith("lm_head")]
        assert names == (["lm_head.weight"] if path == kept else
                         ["lm_head.weight_packed", "lm_head.weight_scale", "lm_head.weight_zero"])


def test_quantizing_a_tied_head_says_the_file_grows(tmp_path):
    """A README line read "can be compressed further" for quantizing a tied lm_head: the artifact grew (167 → 184 MB
    on the bundled model), since the embedding stays float beside the head's quantized copy. Said now."""
    from transformers import LlamaConfig, LlamaForCausalLM

    class Notes(api.Progress):
        said: list = []

        def note(self, message):
            self.said.append(message)

    for tie in (True, False):
        torch.manual_seed(0)
        cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=128, tie_word_embeddings=tie)
        LlamaForCausalLM(cfg).eval().save_pretrained(tmp_path / f"m{tie}")
        Notes.said = []
        api.quantize(RTNConfig(format=Uniform(4, 32), ignore=()), tmp_path / f"q{tie}", str(tmp_path / f"m{tie}"),
                     progress=Notes())
        grows = [n for n in Notes.said if "lm_head shared the embedding" in n and "against keeping lm_head float" in n]
        assert len(grows) == (1 if tie else 0), Notes.said


def test_manifest_contents(art, tiny_model_dir):
    m = read_manifest(art)
    assert m["schema_version"] == 1 and m["llmcomp_version"] == llmcomp.__version__
    assert len(m["base_model"]["sha256"]) == 64
    assert [s["method"] for s in m["stages"]] == ["rtn"]
    assert m["stages"][0]["config"]["format"]["bits"] == 4
    assert len(m["modules"]) == 14
    assert {"model.safetensors", "config.json"} <= set(m["files"])
    assert not [p for p in art.parent.iterdir() if p.name.startswith(".art.")]  # no temp leftovers


def test_loaded_artifact_generates(art):
    model = llmcomp.load(art)
    assert isinstance(model.model.layers[0].mlp.down_proj, QuantLinear)
    out = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=5, do_sample=False)
    assert out.shape == (1, 8)


def test_stages_append(tiny_model_dir, tmp_path):
    first = api.quantize(RTNConfig(format=Uniform(bits=8, group_size=0), targets=("re:.*self_attn.*",)),
                         tmp_path / "s1", str(tiny_model_dir))
    second = api.quantize(RTNConfig(format=Uniform(bits=4, group_size=32), targets=("re:.*mlp.*",)),
                          tmp_path / "s2", str(first))
    m = read_manifest(second)
    assert [s["method"] for s in m["stages"]] == ["rtn", "rtn"]
    assert m["base_model"] == read_manifest(first)["base_model"]
    bits = {n: spec["bits"] for n, spec in m["modules"].items()}
    assert bits["model.layers.0.self_attn.q_proj"] == 8 and bits["model.layers.0.mlp.up_proj"] == 4


def test_sharded_artifact_round_trips(tiny_model_dir, tmp_path):
    out = api.quantize(W4, tmp_path / "sh", str(tiny_model_dir), shard_bytes=20_000)
    assert (out / "model.safetensors.index.json").exists()
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 2
    single = api.quantize(W4, tmp_path / "one", str(tiny_model_dir))
    ids = torch.randint(0, 128, (1, 10))
    assert torch.equal(llmcomp.load(out)(ids).logits, llmcomp.load(single)(ids).logits)


@pytest.mark.parametrize("entry", ["outside", "unlisted", "dot"])
def test_a_shard_index_reads_only_the_files_the_manifest_hashes(tiny_model_dir, tmp_path, entry):
    """The index's names were followed as given (rehashed, resealed): "../one/model.safetensors" loaded weights no
    hash covered, "." raised a raw OSError."""
    sharded = api.quantize(W4, tmp_path / "sh", str(tiny_model_dir), shard_bytes=20_000)
    api.quantize(W4, tmp_path / "one", str(tiny_model_dir))
    index_path = sharded / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    key = next(iter(index["weight_map"]))
    index["weight_map"][key] = {"outside": "../one/model.safetensors", "unlisted": "ghost.safetensors",
                                "dot": "."}[entry]
    index_path.write_text(json.dumps(index))
    _rehash(sharded, "model.safetensors.index.json")
    with pytest.raises(UserError, match="names ghost.safetensors, which the manifest does not list" if entry ==
                       "unlisted" else "is not a file name in the folder"):
        llmcomp.load(sharded)


def test_flipped_byte_detected(art):
    f = art / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01
    f.write_bytes(bytes(data))
    with pytest.raises(UserError, match="model.safetensors is corrupt"):
        llmcomp.load(art)


def test_truncated_file_detected(art):
    f = art / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(UserError, match="corrupt"):
        llmcomp.load(art)


def test_missing_manifest_falls_back_or_errors(art):
    os.remove(art / "llmcomp.json")
    with pytest.raises(UserError, match="is not an llmcomp artifact: it has no llmcomp.json"):
        read_manifest(art)
    with pytest.raises(UserError, match="is not an llmcomp artifact: it does not exist"):
        read_manifest(art / "nope")  # (it said that llmcomp.json was missing, of a path that is not there)
    with pytest.raises(UserError, match="is not an llmcomp artifact: it is a file"):
        read_manifest(art / "config.json")


def _edit_manifest(art, change, seal=True):
    """``change(manifest)`` applied to the artifact's llmcomp.json, re-sealed as the writer seals it (``seal``) —
    so that the checks behind the seal are reached."""
    p = art / "llmcomp.json"
    m = json.loads(p.read_text())
    change(m)
    if seal:
        m[artifact_mod.SEAL] = artifact_mod._seal(m)
    p.write_text(json.dumps(m))


def test_edited_manifest_refused_and_evaluations_do_not_break_the_seal(art):
    artifact_mod.record_evaluation(art, {"ppl": 1.0})
    assert read_manifest(art)["evaluations"] == [{"ppl": 1.0}]  # appended after the seal: still valid

    def group_40(m):  # same packed shapes, another reading of them
        for spec in m["modules"].values():
            spec["group_size"] = 40
    _edit_manifest(art, group_40, seal=False)
    with pytest.raises(UserError, match="was edited after the artifact was written"):
        llmcomp.load(art)


def test_inspect_says_when_a_manifest_has_no_seal(art):
    """Without its seal (an artifact from before the seal, or one whose seal was deleted) a manifest's edits load
    unseen; inspect says so."""
    from typer.testing import CliRunner

    from llmcomp.cli.app import app

    sealed = " ".join(CliRunner().invoke(app, ["inspect", str(art)]).output.split())
    _edit_manifest(art, lambda m: m.pop(artifact_mod.SEAL), seal=False)
    unsealed = " ".join(CliRunner().invoke(app, ["inspect", str(art)]).output.split())
    assert "edits to llmcomp.json cannot be detected" in unsealed and "cannot be detected" not in sealed


def test_unknown_schema_version(art):
    _edit_manifest(art, lambda m: m.update(schema_version=99))
    with pytest.raises(UserError, match="schema version 99"):
        llmcomp.load(art)


def test_corrupt_manifest_json(art):
    (art / "llmcomp.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        llmcomp.load(art)


def _rehash(art, name="model.safetensors"):
    """The manifest's digest of ``name`` made to match its (edited) bytes: damage the hash check cannot see."""
    _edit_manifest(art, lambda m: m["files"].update({name: artifact_mod.sha256_file(art / name)}))


@pytest.mark.parametrize("damage", ["truncated", "header"])
def test_damaged_weights_behind_a_matching_hash_are_a_user_error(art, damage):
    f = art / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\xff" * 64 + data[64:])
    _rehash(art)
    with pytest.raises(UserError, match="not a readable safetensors file"):
        llmcomp.load(art)
    from llmcomp.report import _stored_dtypes

    with pytest.raises(UserError, match="not a readable safetensors file"):
        _stored_dtypes(art, torch.nn.Module())


def test_tensor_of_the_wrong_shape_is_a_user_error(art):
    from safetensors.torch import load_file, save_file

    f = art / "model.safetensors"
    tensors = load_file(str(f))
    key = next(k for k in tensors if k.endswith("down_proj.weight_scale"))
    tensors[key] = tensors[key][:, :1].contiguous()
    save_file(tensors, str(f), metadata={"format": "pt"})
    _rehash(art)
    with pytest.raises(UserError, match=f"{key} in model.safetensors has shape"):
        llmcomp.load(art)


@pytest.mark.parametrize("which", ["norm", "packed"])
def test_tensor_of_the_wrong_dtype_is_a_user_error(art, which):
    """Only shapes were compared: int64 norm weights (rehashed, resealed) were cast and ran (ppl 158 against 28 on
    the bundled model); packed codes in another integer type were read as if their bits were the layout."""
    from safetensors.torch import load_file, save_file

    f = art / "model.safetensors"
    tensors = load_file(str(f))
    if which == "norm":
        key = "model.norm.weight"
        tensors[key] = tensors[key].to(torch.int64)
    else:
        key = next(k for k, t in tensors.items() if "down_proj" in k and not t.is_floating_point())
        tensors[key] = tensors[key].to(torch.int16 if tensors[key].dtype != torch.int16 else torch.int32)
    save_file(tensors, str(f), metadata={"format": "pt"})
    _rehash(art)
    with pytest.raises(UserError, match=f"{key} in model.safetensors is int"):
        llmcomp.load(art)


def test_weights_without_a_checksum_refused(art):
    (art / "._model.safetensors").write_bytes(b"AppleDouble")  # (hidden: never read, not refused)
    llmcomp.load(art)
    _edit_manifest(art, lambda m: m["files"].pop("model.safetensors"))
    with pytest.raises(UserError, match="no checksum for model.safetensors"):
        llmcomp.load(art)


@pytest.mark.parametrize("spec", [{"_type": "Bogus4"}, "uniform", None, {"_type": "RTNConfig"}])
def test_manifest_module_without_a_valid_format_refused(art, spec):
    _edit_manifest(art, lambda m: m["modules"].update({next(iter(m["modules"])): spec}))
    with pytest.raises(UserError, match="has no valid format"):
        read_manifest(art)


@pytest.mark.parametrize("name", ["model.nope", "model.norm"])
def test_manifest_module_that_is_not_a_linear_layer_refused(art, name):
    _edit_manifest(art, lambda m: m["modules"].update({name: next(iter(m["modules"].values()))}))
    with pytest.raises(UserError, match="is not a linear layer of the model"):
        llmcomp.load(art)


def test_manifest_that_is_not_an_object_refused(art):
    (art / "llmcomp.json").write_text("[1, 2, 3]")
    with pytest.raises(UserError, match="not a JSON object"):
        read_manifest(art)


def test_output_that_is_a_file_refused_even_with_overwrite(tiny_model_dir, tmp_path):
    f = tmp_path / "afile.txt"
    f.write_text("keep me")
    with pytest.raises(UserError, match="is a file"):
        api.quantize(W4, f, str(tiny_model_dir), overwrite=True)
    assert f.read_text() == "keep me"
    with pytest.raises(UserError, match="which is a file"):
        api.quantize(W4, f / "sub" / "out", str(tiny_model_dir))


def test_quantizing_a_quantized_artifact_says_so(art, tiny_model_dir, tmp_path):
    with pytest.raises(UserError, match="quantized already"):
        api.quantize(W4, tmp_path / "again", str(art))
    partial = api.quantize(RTNConfig(format=Uniform(bits=4, group_size=32), targets=("re:.*layers\\.0\\.mlp\\..*",)),
                           tmp_path / "partial", str(tiny_model_dir))
    with pytest.raises(UserError, match=r"'re:.*nonexistent' \(targets\) matches no module") as e:
        api.quantize(RTNConfig(format=Uniform(bits=4, group_size=32), targets=("re:.*nonexistent",)),
                     tmp_path / "again2", str(partial))
    assert "quantized already" not in str(e.value)
    with pytest.raises(UserError, match=r"The 3 linear layers targets \['re:.*'\] select are quantized already"):
        api.quantize(RTNConfig(format=Uniform(bits=4, group_size=32), targets=("re:.*layers\\.0\\.mlp\\..*",)),
                     tmp_path / "again3", str(partial))  # (it said "No linear layer is under targets")


def test_quantizing_a_partly_quantized_artifact_says_what_it_leaves(tiny_model_dir, tmp_path):
    """A second quantize over an artifact whose MLPs an earlier stage quantized quantized the attention alone and
    left the MLPs in their earlier format without a word; the original model gets no such note."""
    class Notes(api.Progress):
        def __init__(self):
            self.said = []

        def note(self, message):
            self.said.append(message)

    mlp = RTNConfig(format=Uniform(bits=4, group_size=32), targets=("mlp",))
    partial = api.quantize(mlp, tmp_path / "partial", str(tiny_model_dir), progress=(first := Notes()))
    assert not any("earlier stage quantized" in n for n in first.said), first.said
    again = Notes()
    api.quantize(RTNConfig(format=Uniform(bits=8, group_size=32)), tmp_path / "again", str(partial), progress=again)
    done = sum(isinstance(m, QuantLinear) for m in llmcomp.load(partial).modules())
    said = [n for n in again.said if f"{done} linear layers an earlier stage quantized are left as they are" in n]
    assert done and len(said) == 1 and "needs the original model" in said[0], again.said


def test_output_exists_refused_and_overwrite(art, tiny_model_dir):
    with pytest.raises(UserError, match="already exists"):
        api.quantize(W4, art, str(tiny_model_dir))
    api.quantize(RTNConfig(format=Uniform(bits=8, group_size=0)), art, str(tiny_model_dir), overwrite=True)
    assert read_manifest(art)["stages"][0]["config"]["format"]["bits"] == 8


def test_interrupted_write_leaves_nothing(tiny_model_dir, tmp_path, monkeypatch):
    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(artifact_mod, "sha256_file", boom)
    with pytest.raises(KeyboardInterrupt):
        api.quantize(W4, tmp_path / "x", str(tiny_model_dir))
    assert not (tmp_path / "x").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["tiny"]


def test_interrupted_overwrite_keeps_old(art, tiny_model_dir, monkeypatch):
    before = read_manifest(art)

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(artifact_mod, "sha256_file", boom)
    with pytest.raises(KeyboardInterrupt):
        api.quantize(RTNConfig(format=Uniform(bits=8, group_size=0)), art, str(tiny_model_dir), overwrite=True)
    monkeypatch.undo()
    assert read_manifest(art) == before


def test_nan_weights_rejected(tiny_model, tmp_path):
    tiny_model.model.layers[1].mlp.up_proj.weight.data[0, 0] = float("nan")
    tiny_model.save_pretrained(tmp_path / "nan")
    with pytest.raises(UserError, match="model.layers.1.mlp.up_proj has NaN"):
        api.quantize(W4, tmp_path / "out", str(tmp_path / "nan"))
    assert not (tmp_path / "out").exists()


def test_model_path_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        api.quantize(W4, tmp_path / "o", str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="not a model directory"):
        api.quantize(W4, tmp_path / "o", str(tmp_path / "empty"))


def test_a_folder_named_like_the_bundled_alias_is_never_swapped_for_it(art, tmp_path, monkeypatch):
    """An artifact written to ``-o smollm2-135m`` was evaluated (and recorded, and checked) as the bundled original:
    its path, normalized or resolved twice, read as the alias. A Path and ``./smollm2-135m`` are the folder; the bare
    alias beside such a folder is refused as ambiguous."""
    from llmcomp.core import model as model_mod

    monkeypatch.chdir(tmp_path)
    shutil.copytree(art, tmp_path / model_mod.DEFAULT_MODEL)
    folder = Path(model_mod.DEFAULT_MODEL)
    with pytest.raises(UserError, match="names both the bundled model and the folder"):
        model_mod.resolve(model_mod.DEFAULT_MODEL)
    assert model_mod.resolve(model_mod.resolve(f"./{model_mod.DEFAULT_MODEL}")) == folder
    assert model_mod.resolve(folder) == folder and model_mod.read_path(folder) == folder
    assert isinstance(llmcomp.load(folder).model.layers[0].self_attn.q_proj, QuantLinear)
    assert api._named(folder, folder)["path"] == str(folder.absolute())  # (what record_evaluations reads back)


def test_no_output_replaces_the_bundled_models_cached_copy(tiny_model_dir, tmp_path, monkeypatch):
    """``--overwrite`` replaced the bundled model's converted copy (written by llmcomp, so marked as replaceable)
    when it was the input (named by no path, or the alias) or the output of another model's run: every later run
    of the bundled model then read the artifact."""
    from llmcomp.core import model as model_mod
    from llmcomp.core import paths

    monkeypatch.setenv("LLMCOMP_CACHE", str(tmp_path / "cache"))
    bundled = paths.cache_dir() / "models" / model_mod.BUNDLED_NAME
    shutil.copytree(tiny_model_dir, bundled)
    (bundled / paths.OUTPUT_MARK).write_text("")
    assert paths.written_by_llmcomp(bundled)
    for model in (None, model_mod.DEFAULT_MODEL, str(tiny_model_dir)):
        with pytest.raises(UserError, match="would replace the input|would replace the bundled model's converted"):
            api.quantize(W4, bundled, model, overwrite=True)
    assert not (bundled / "llmcomp.json").exists() and not (bundled / "manifest.json").exists()
    beside = api.quantize(W4, bundled.parent / "mine", str(tiny_model_dir))  # (the cache's other folders are
    assert (beside / "llmcomp.json").exists()                                # the user's to write)


def test_config_context_counts_rope_scaling():
    from types import SimpleNamespace

    from llmcomp.api import config_context

    assert config_context(SimpleNamespace(max_position_embeddings=4096)) == 4096
    assert config_context(SimpleNamespace(max_position_embeddings=4096,
                                          rope_scaling={"rope_type": "yarn", "factor": 4.0})) == 16384
    assert config_context(SimpleNamespace(max_position_embeddings=4096, rope_scaling={"rope_type": "llama3"})) == 4096
    llama31 = {"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 8192}
    assert config_context(SimpleNamespace(max_position_embeddings=131072, rope_scaling=llama31)) == 131072
    assert config_context(SimpleNamespace()) == 0


def test_overwrite_replaces_only_llmcomp_outputs(art, tiny_model_dir, tmp_path):
    """--overwrite deleted whatever -o named: the input model, or a folder holding it and other files."""
    folder = tmp_path / "models"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not written by llmcomp"):
        api.quantize(W4, folder, str(tiny_model_dir), overwrite=True)
    assert (folder / "notes.txt").read_text() == "mine"
    for dest in (tiny_model_dir, tiny_model_dir.parent):  # the input, and the folder above it
        with pytest.raises(UserError, match="would replace the input"):
            api.quantize(W4, dest, str(tiny_model_dir), overwrite=True)
    assert (tiny_model_dir / "config.json").exists()
    assert (art / ".llmcomp-output").exists()  # what atomic_dir publishes is marked
    (art / ".llmcomp-output").unlink()  # an artifact from before the mark: its manifest says what it is
    api.quantize(W4, art, str(tiny_model_dir), overwrite=True)
    empty = tmp_path / "empty"
    empty.mkdir()
    api.quantize(W4, empty, str(tiny_model_dir), overwrite=True)
    assert read_manifest(empty)["stages"]


def test_broken_symlink_output_refused_before_any_work(tiny_model_dir, tmp_path):
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "gone")
    with pytest.raises(UserError, match="broken symbolic link"):
        api.quantize(W4, link, str(tiny_model_dir))


def test_failed_swap_puts_the_old_output_back(tmp_path, monkeypatch):
    """The last rename of an --overwrite failing (e.g. a busy mount point) left the old output in a hidden
    ``.old-`` folder."""
    from llmcomp.core import paths

    dest = tmp_path / "out"
    with paths.atomic_dir(dest) as tmp:
        (tmp / "a").write_text("old")
    real = os.rename
    calls = []

    def rename(src, dst):
        calls.append(dst)
        if len(calls) == 2:  # the new one onto dest
            raise OSError(16, "Device or resource busy")
        return real(src, dst)

    monkeypatch.setattr(paths.os, "rename", rename)
    with pytest.raises(OSError, match="busy"):
        with paths.atomic_dir(dest, overwrite=True) as tmp:
            (tmp / "a").write_text("new")
    assert (dest / "a").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_an_overwrite_killed_between_its_renames_is_put_back(tmp_path):
    """A SIGKILL between ``_replace``'s two renames left the output missing and its only copy in a hidden ``.old-``
    folder for good; the next command on that output puts it back (a live swap's folder, locked, is left alone)."""
    import fcntl
    import subprocess
    import sys

    from llmcomp.core import paths
    from llmcomp.errors import UserError

    dest = tmp_path / "out"
    with paths.atomic_dir(dest) as tmp:
        (tmp / "a").write_text("old")
    script = f"""
import os
from pathlib import Path
from llmcomp.core import paths
real, calls = os.rename, []
def rename(src, dst):
    calls.append(dst)
    if len(calls) == 2:  # the new one onto dest: killed here
        os._exit(9)
    return real(src, dst)
paths.os.rename = rename
with paths.atomic_dir(Path({str(dest)!r}), overwrite=True) as tmp:
    (tmp / "a").write_text("new")
"""
    tree = str(Path(llmcomp.__file__).parents[1])  # (the llmcomp under test, wherever pytest runs from)
    killed = subprocess.run([sys.executable, "-c", script], env={**os.environ, "PYTHONPATH": tree})
    assert killed.returncode == 9 and not dest.exists()
    assert [p.name.split("-")[0] for p in tmp_path.glob(".out.old-*")] == [".out.old"]
    with pytest.raises(UserError, match="already exists \\(put back: an --overwrite of it was killed mid-swap\\)"):
        paths.check_output(dest, overwrite=False)
    assert (dest / "a").read_text() == "old" and not list(tmp_path.glob(".out.old-*"))

    live = tmp_path / ".out.old-live0000"  # a swap in progress in another process: its lock held
    (live / "x").mkdir(parents=True)
    fd = os.open(live, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        paths.check_output(dest, overwrite=True)
        assert (live / "x").exists()
    finally:
        os.close(fd)
    paths.check_output(dest, overwrite=True)  # (its swap over, the new one in place: the old copy goes)
    assert not live.exists() and (dest / "a").read_text() == "old"
    other = tmp_path / ".out.old-v1.old-abcd1234"  # output "out.old-v1"'s killed swap: not out's to take
    (other / "x").mkdir(parents=True)
    shutil.rmtree(dest)
    paths.check_output(dest, overwrite=False)
    assert not dest.exists() and (other / "x").is_dir()
    shutil.rmtree(other)
    with paths.atomic_dir(dest) as tmp:
        (tmp / "a").write_text("old")
    hour_ago = time.time() - 3600
    for left in tmp_path.glob(".out.tmp-*"):  # (the killed job's own new output: swept once it is old)
        os.utime(left, (hour_ago, hour_ago))
    with paths.atomic_dir(dest, overwrite=True) as tmp:  # a whole swap leaves nothing behind
        (tmp / "a").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and (dest / "a").read_text() == "new"


def test_a_swap_recovery_racing_another_job_is_not_an_error(tmp_path, monkeypatch):
    """Another job publishing the output between the check and the put-back rename, or removing the ``.old-``
    folder as it was opened, raised a raw OSError out of check_output."""
    import errno

    from llmcomp.core import paths

    dest = tmp_path / "out"
    left = tmp_path / ".out.old-abcd0000"
    (left / "x").mkdir(parents=True)

    def published(src, dst):  # (dest appears just before the rename)
        raise OSError(errno.ENOTEMPTY, "Directory not empty")

    monkeypatch.setattr(paths.os, "rename", published)
    assert paths.recover_swaps(dest) is False and not left.exists()
    monkeypatch.undo()
    (left / "x").mkdir(parents=True)
    real = os.open

    def vanishing(path, *a, **k):  # (its swap finishes and removes it as it is opened)
        fd = real(path, *a, **k)
        if path == left:
            monkeypatch.undo()
            shutil.rmtree(left)
        return fd

    monkeypatch.setattr(paths.os, "open", vanishing)
    assert paths.recover_swaps(dest) is False and not dest.exists()


def test_a_killed_writes_temporary_directory_is_swept_and_a_live_one_kept(tmp_path):
    """A SIGKILLed write left its full-size hidden ``.out.tmp-*`` folder for good; the next write of the same
    output removes it — but not one another process holds (it is being written) nor any while an ``.old-`` folder
    (a swap's only copy) exists."""
    import fcntl

    from llmcomp.core import paths

    dest = tmp_path / "out"
    dead, live, young = (tmp_path / f".out.tmp-{n}" for n in ("dead0000", "live0000", "young000"))
    for d in (dead, live, young):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"x" * 100)
    hour_ago = time.time() - 3600
    for d in (dead, live):
        os.utime(d, (hour_ago, hour_ago))
    fd = os.open(live, os.O_RDONLY)  # another open file: as another process's lock
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        old = tmp_path / ".out.old-1234abcd"
        old.mkdir()
        with paths.atomic_dir(dest) as tmp:
            (tmp / "a").write_text("1")
        assert dead.exists() and live.exists()  # an .old- sibling: nothing swept
        old.rmdir()
        with paths.atomic_dir(dest, overwrite=True) as tmp:
            (tmp / "a").write_text("2")
        assert not dead.exists() and live.exists() and (dest / "a").read_text() == "2"
        assert young.exists()  # (unlocked, but as new as one another writer has made and not locked yet)
        seconds_ago = time.time() - 5
        os.utime(young, (seconds_ago, seconds_ago))
        with paths.job_lock(dest), paths.atomic_dir(dest, overwrite=True) as tmp:  # (as every llmcomp job writes)
            (tmp / "a").write_text("3")
        assert not young.exists() and live.exists()  # (no other job of dest can be between mkdtemp and lock)
    finally:
        os.close(fd)


def test_a_write_is_published_under_its_lock(tmp_path, monkeypatch):
    """The lock went before the rename: another writer's sweep could take the unlocked temporary directory and
    delete it as it was published (an emptied output, or this write failing after all its work)."""
    import fcntl

    from llmcomp.core import paths

    real, seen = os.rename, []

    def rename(src, dst):
        fd = os.open(src, os.O_RDONLY)  # another open file: as another process's sweep
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            seen.append(src)
        finally:
            os.close(fd)
        return real(src, dst)

    monkeypatch.setattr(paths.os, "rename", rename)
    with paths.atomic_dir(tmp_path / "out") as tmp:
        (tmp / "a").write_text("1")
    assert seen == [tmp] and (tmp_path / "out" / "a").read_text() == "1"


def test_load_honours_dtype(tiny_model_dir, tmp_path):
    """accelerate cast every loaded tensor back to the float32 skeleton: ``dtype`` had no effect."""
    out = api.quantize(W4, tmp_path / "a", str(tiny_model_dir), dtype="bfloat16")
    assert llmcomp.load(out).model.embed_tokens.weight.dtype == torch.float32
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"  # (it said float32)
    for dtype in (torch.bfloat16, torch.float16):
        model = llmcomp.load(out, dtype=dtype)
        assert {p.dtype for n, p in model.named_parameters()} == {dtype}, dtype
        assert model(torch.tensor([[1, 2, 3]])).logits.dtype == dtype


def _record_many(path, tag, n):
    from llmcomp.core.artifact import record_evaluation

    for i in range(n):
        record_evaluation(path, {"tag": tag, "i": i})


def test_records_from_threads_are_all_kept(art):
    import threading

    threads = [threading.Thread(target=_record_many, args=(art, tag, 15)) for tag in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(read_manifest(art)["evaluations"]) == 30


def test_a_report_from_before_the_mark_can_be_overwritten(tmp_path):
    from llmcomp.core.paths import check_output

    old = tmp_path / "r"
    old.mkdir()
    (old / "report.md").write_text("# r")
    (old / "bits.png").write_bytes(b"png")
    assert check_output(old, True) == old
    (old / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not written by llmcomp"):
        check_output(old, True)


def test_concurrent_records_are_all_kept(art):
    """Two processes recording evaluations shared one temp name and read-modify-wrote unlocked: records
    were lost and readers saw a half-written manifest."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_record_many, args=(art, tag, 25)) for tag in "ab"]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    evals = read_manifest(art)["evaluations"]
    assert sorted((e["tag"], e["i"]) for e in evals) == sorted((t, i) for t in "ab" for i in range(25))
    assert not [p.name for p in art.iterdir() if p.name.endswith(".tmp")]


def test_a_model_loaded_in_inference_mode_runs(art):
    """The dequantized-weight cache keyed on version counters, which inference-mode tensors lack."""
    with torch.inference_mode():
        model = llmcomp.load(art)
        assert model(torch.tensor([[1, 2, 3]])).logits.isfinite().all()
    with torch.no_grad():
        assert model(torch.tensor([[1, 2, 3]])).logits.isfinite().all()


@pytest.mark.parametrize("value", ["x", ["x"], {"ppl": 1}])
def test_malformed_evaluations_are_one_error(tmp_path, tiny_model_dir, value):
    """The seal leaves evaluations out, and nothing checked their shape: report and eval --record raised
    AttributeError on a string."""
    art = api.quantize(W4, tmp_path / "a", str(tiny_model_dir))
    _edit_manifest(art, lambda m: m.update(evaluations=value), seal=False)
    with pytest.raises(UserError, match="'evaluations' must be an array of result objects"):
        read_manifest(art)
    with pytest.raises(UserError, match="'evaluations' must be an array"):
        artifact_mod.record_evaluation(art, {"ppl": 1.0})


def test_reference_base_refuses_a_base_model_changed_since(art, tiny_model_dir):
    """``eval --reference base`` compares against the recorded base model only while its weights are the ones the
    artifact was made from (a changed base gave a wrong agreement with no word)."""
    from conftest import tiny_llama

    assert api.base_model_path(art) == str(tiny_model_dir.resolve())
    tiny_llama(seed=1).save_pretrained(tiny_model_dir)
    with pytest.raises(UserError, match="has changed since the artifact was made"):
        api.base_model_path(art)


def test_reference_base_reads_the_digest_earlier_versions_took(tiny_model_dir, tmp_path):
    """Earlier versions hashed every weight-like file (and then an index's files before model.safetensors): with a
    consolidated.safetensors beside the weights their artifacts' base was refused as changed."""
    from llmcomp.core import model as model_mod

    (tiny_model_dir / "consolidated.safetensors").write_bytes(b"a Mistral-style copy")
    every = sorted(tiny_model_dir.glob("*.safetensors"))
    assert len(every) == 2
    art = api.quantize(W4, tmp_path / "a", str(tiny_model_dir))
    assert read_manifest(art)["base_model"]["sha256"] != model_mod._digest(every)  # today's digest: one file
    _edit_manifest(art, lambda m: m["base_model"].update(sha256=model_mod._digest(every)))
    assert api.base_model_path(art) == str(tiny_model_dir.resolve())
    _edit_manifest(art, lambda m: m["base_model"].update(sha256=model_mod._digest(every[:1])))
    with pytest.raises(UserError, match="has changed since the artifact was made"):
        api.base_model_path(art)


def test_a_damaged_index_beside_model_safetensors_is_not_read(tiny_model_dir):
    """transformers reads model.safetensors and never the index beside it; the digest must not either."""
    from llmcomp.core import model as model_mod

    digest = model_mod.weights_sha256(tiny_model_dir)
    (tiny_model_dir / "model.safetensors.index.json").write_text('{"metadata": {}}')
    assert model_mod.weights_sha256(tiny_model_dir) == digest
    assert model_mod.same_weights(tiny_model_dir, digest)


def test_home_in_output_source_and_cache_paths(tmp_path, monkeypatch):
    """``~`` reaches the API as is (no shell): outputs, the input they must not replace, and LLMCOMP_CACHE take it as
    the home directory (it wrote ./~/out, and let ~/art replace the artifact at its absolute path)."""
    from llmcomp.core.paths import cache_dir, check_output

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    assert check_output("~/out", overwrite=False) == tmp_path / "out"
    (tmp_path / "art").mkdir()
    with pytest.raises(UserError, match="would replace the input"):
        check_output("~/art", overwrite=True, source=str(tmp_path / "art"))
    with pytest.raises(UserError, match="would replace the input"):
        check_output(tmp_path / "art", overwrite=True, source="~/art")
    monkeypatch.setenv("LLMCOMP_CACHE", "~/llmc")
    assert cache_dir() == tmp_path / "llmc" and not (tmp_path / "~").exists()


def test_bits_per_weight_counts_unquantized_linears_at_their_stored_dtype(tiny_model_dir, tmp_path):
    """--dtype bfloat16 halves the unquantized linears on disk, and the stage's and eval's bits per weight say so
    (both counted the float32 a load upcasts to)."""
    from llmcomp.eval.size import size_report

    cfg = RTNConfig(format=Uniform(bits=4, group_size=32), targets=("re:.*self_attn.*",))
    full = api.quantize(cfg, tmp_path / "f32", str(tiny_model_dir))
    half = api.quantize(cfg, tmp_path / "bf16", str(tiny_model_dir), dtype="bfloat16")
    b32, b16 = (read_manifest(p)["stages"][-1]["metrics"]["bits_per_weight"] for p in (full, half))
    qbits = n_q = n_mlp = 0
    for name, mod in llmcomp.load(full).named_modules():
        if isinstance(mod, QuantLinear):
            qbits += mod.fmt.bits_per_weight(mod.out_features, mod.in_features) * mod.in_features * mod.out_features
            n_q += mod.in_features * mod.out_features
        elif isinstance(mod, torch.nn.Linear) and "lm_head" not in name:
            n_mlp += mod.weight.numel()
    assert n_q and n_mlp
    assert b32 == pytest.approx((qbits + 32 * n_mlp) / (n_q + n_mlp), abs=1e-3)
    assert b16 == pytest.approx((qbits + 16 * n_mlp) / (n_q + n_mlp), abs=1e-3)
    assert size_report(llmcomp.load(half), half)["bits_per_weight"] == pytest.approx(b16, abs=1e-3)


def test_no_home_directory_is_one_error(monkeypatch):
    """With HOME unset and no passwd entry (a container's arbitrary uid) Path.home() raised a RuntimeError."""
    from pathlib import Path

    from llmcomp.core.paths import cache_dir

    def no_home():
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.delenv("LLMCOMP_CACHE", raising=False)
    monkeypatch.setattr(Path, "home", staticmethod(no_home))
    with pytest.raises(UserError, match="set LLMCOMP_CACHE"):
        cache_dir()


def test_an_artifact_replaced_during_its_evaluation_gets_no_record(tmp_path, tiny_model_dir):
    """eval --record while another job ran --overwrite: the int4 run's numbers went into the int8 artifact."""
    art = api.quantize(W4, tmp_path / "a", str(tiny_model_dir))
    loaded = read_manifest(art)[artifact_mod.SEAL]
    api.quantize(RTNConfig(format=Uniform(bits=8, group_size=0)), art, str(tiny_model_dir), overwrite=True)
    with pytest.raises(UserError, match="was replaced while it was evaluated"):
        artifact_mod.record_evaluation(art, {"ppl": 1.0}, seal=loaded)
    artifact_mod.record_evaluation(art, {"ppl": 2.0}, seal=read_manifest(art)[artifact_mod.SEAL])
    assert read_manifest(art)["evaluations"] == [{"ppl": 2.0}]


def test_writers_store_unquantized_tensors_as_the_source_does(tmp_path):
    """A bf16 model came out float32 (twice the size) without --dtype, against the help's "as in the model"."""
    import shutil

    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from tests.conftest import save_char_model

    src = save_char_model(tmp_path / "f32", layers=1)
    AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16).save_pretrained(tmp_path / "bf16")
    for f in src.iterdir():
        if f.name.startswith(("tokenizer", "special")):
            shutil.copy(f, tmp_path / "bf16")
    for source, want in ((src, torch.float32), (tmp_path / "bf16", torch.bfloat16)):
        out = api.quantize(W4, tmp_path / f"q-{source.name}", str(source))
        st = load_file(str(out / "model.safetensors"))
        assert st["model.norm.weight"].dtype == st["model.embed_tokens.weight"].dtype == want
        assert json.loads((out / "config.json").read_text())["dtype"] == str(want).removeprefix("torch.")


def test_generation_config_survives_load_a_second_stage_and_an_import(tiny_model_dir, tmp_path):
    """llmcomp.load built the model from config.json alone: the artifact's generation_config.json (eos ids,
    sampling defaults) was ignored, and the next stage wrote the defaults over it; so did an import."""
    from transformers import GenerationConfig

    pytest.importorskip("compressed_tensors")  # (the export's optional extra, in [dev]; the GPU machine lacks it)
    GenerationConfig(eos_token_id=[5, 7], do_sample=True, temperature=0.6, max_new_tokens=3).save_pretrained(
        tiny_model_dir)
    first = api.quantize(RTNConfig(format=Uniform(bits=8, group_size=0), targets=("re:.*self_attn.*",)),
                         tmp_path / "s1", str(tiny_model_dir))
    second = api.quantize(RTNConfig(format=Uniform(bits=4, group_size=32), targets=("re:.*mlp.*",)),
                          tmp_path / "s2", str(first))
    api.export(second, "compressed-tensors", tmp_path / "g")
    for path in (first, second, tmp_path / "g"):
        gen = llmcomp.load(path).generation_config
        assert (gen.eos_token_id, gen.do_sample, gen.temperature, gen.max_new_tokens) == ([5, 7], True, 0.6, 3), path


def test_a_later_stage_keeps_the_calibration_text_of_the_earlier_ones(tiny_model_dir, tmp_path):
    """RTN (no text) over an artifact whose stages calibrated wrote text_source None: inspect said '- (no stage read
    calibration text)' after moefy and prune dynamic had read the Austen text. Texts of several stages all show."""
    model, _, base, _ = api.open_model(str(tiny_model_dir))
    earlier = {"method": "experts-dynamic-skip", "config": {}, "wall_time_s": 1.0, "metrics": {},
               "calibration": {"text": "austen", "samples": 4, "seq_len": 64, "seed": 0}}
    first = artifact_mod.write_artifact(tmp_path / "a", model, None, base_model=base, stages=[earlier],
                                        text_source="austen")
    q = api.quantize(W4, tmp_path / "q", str(first))
    assert read_manifest(q)["text_source"] == "austen"
    later = {**earlier, "method": "kv-cskv", "calibration": {"text": "pydoc"}}
    both = artifact_mod.write_artifact(tmp_path / "b", model, None, base_model=base, stages=[earlier, later],
                                       text_source="pydoc")
    assert read_manifest(both)["text_source"] == "austen, pydoc"
    assert read_manifest(api.quantize(W4, tmp_path / "w", str(tiny_model_dir)))["text_source"] is None

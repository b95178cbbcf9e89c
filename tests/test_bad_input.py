"""Every user error the CLI can meet: exit code 2, exactly one ``error:`` line, no traceback, and nothing
written at the destination. Plus a fuzz of the artifact reader: random byte flips and truncations of a
real artifact must end in a clear error (``UserError``) or a correct load — never anything else."""
import json
import random

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from llmcomp.cli.app import app
from llmcomp.errors import UserError

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def error_line(result) -> str:
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2, result.output
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1, result.output
    assert "Traceback" not in result.output and result.exception is None or isinstance(result.exception, SystemExit)
    return errors[0]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from tests.conftest import tiny_llama

    path = tmp_path_factory.mktemp("m") / "tiny"
    tiny_llama().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def artifact(model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("a") / "q"
    r = invoke("quantize", model_dir, "-o", out, "--bits", 4, "--group-size", 32)
    assert r.exit_code == 0, r.output
    return out


def _copy_model(model_dir, tmp_path, name="m"):
    import shutil

    dst = tmp_path / name
    shutil.copytree(model_dir, dst)
    return dst


def test_artifact_without_its_manifest_is_refused(artifact, tmp_path):
    """An artifact whose llmcomp.json is gone is not loaded as a plain model with random weights in place of the
    quantized ones (transformers would, its warning silenced): one error line naming the missing weights and the
    likely cause."""
    import shutil

    broken = tmp_path / "no-manifest"
    shutil.copytree(artifact, broken)
    (broken / "llmcomp.json").unlink()
    line = error_line(invoke("eval", broken, "--windows", 1))
    assert "lacks" in line and "would be random" in line and "llmcomp.json is missing" in line


# (extra quantize flags, expected fragment of the error line)
QUANTIZE_FLAGS = [
    (["--bits", "9"], "bits must be an integer from 2 to 8"),
    (["--bits", "1.5"], "budget"),
    (["--method", "magic"], "Unknown quantization method"),
    (["--group-size", "12"], "group size must be a multiple of 8"),
    (["--group-size", "-8"], "group size"),
    (["--preset", "w5"], "Unknown preset"),
    (["--preset", "w4g128", "--method", "gptq"], "drop --method or drop --preset"),
    (["--preset", "w4g128", "--bits", "3", "--asym"], "drop --bits, --sym/--asym or drop --preset"),
    (["--preset", "w5", "--bits", "3"], "Unknown preset"),
    (["--target", "re:("], "Invalid layer pattern"),
    (["--target", "Conv2d"], "'Conv2d' (targets) matches no module"),
    (["--target", "lm_head"], "ignored by ['lm_head'] (lm_head is ignored by default: --ignore '' lifts that)"),
    (["--target", "re:proj"], "re: must match a whole path, such as 'model.layers.0.self_attn.q_proj'"),
    (["--target", "LlamaRMSNorm"], "No linear layer is under targets"),
    (["--dtype", "float8"], "Unknown dtype"),
    (["--outliers", "60%"], "--outliers"),
    (["--outliers", "lots"], "--outliers"),
    (["--outliers", "1%"], "GPTQ option"),
    (["--format", "nvfp4"], "--format applies"),
    (["--method", "fp4", "--format", "xfp9"], "Unknown FP4 format"),
    (["--method", "fp4", "--format", "mxfp4", "--search"], "fixes"),
    (["--method", "fp4", "--bits", "3"], "4-bit floats"),
    (["--search"], "--search"),
    (["--bits", "2.5", "--candidates", "2,x"], "--candidates"),
    (["--bits", "2.5", "--candidates", "1,4"], "candidates must be integers from 2 to 8"),
    (["--bits", "2.5", "--sensitivity", "hessian"], "Unknown allocation sensitivity"),
    (["--bits", "4", "--sensitivity", "output"], "fractional --bits budget"),
    (["--method", "gptq", "--damp", "-1"], "dampening"),
    (["--method", "decoupleq", "--rounds", "0"], "rounds"),
    (["--method", "gptq"], "needs a tokenizer"),
    (["--method", "mxfp4"], "Unknown quantization method"),
    (["--max-memory", "cuda:0=lots"], "is not a size"),
    (["--max-memory", "gpu=2GiB"], "is not cuda:N, N or cpu"),
    (["--max-memory", "2GiB"], "is not DEVICE=SIZE"),
    (["--max-memory", "0=1GiB,cuda:0=1GiB"], "twice"),
    (["--max-memory", "cpu=1KiB"], "keeps the whole model in CPU memory"),
    (["--offload-folder", "off"], "not supported for quantize"),
    (["--calib-batch", "0"], "--calib-batch"),
    (["--bits", "nan"], "--bits must be a number"),
    (["--bits", "inf"], "--bits must be a number"),
    (["--method", "gptq", "--calib-samples", "0"], "--calib-samples"),
    (["--method", "gptq", "--seq-len", "0"], "--seq-len"),
    (["--group-size", "8000000000"], "at most 65536"),
    (["--method", "vptq", "--bits", "2", "--vector-len", "0"], "--vector-len"),
    (["--method", "pvq", "--bits", "2", "--vector-len", "0"], "--vector-len"),
    (["--method", "gptq", "--device", "tpu"], "--device 'tpu'"),
    (["--method", "gptq", "--device", "cuda:7" if torch.cuda.is_available() else "cuda"], "--device cuda"),
]


@pytest.mark.parametrize("flags,message", QUANTIZE_FLAGS, ids=[" ".join(f) for f, _ in QUANTIZE_FLAGS])
def test_quantize_flags(model_dir, tmp_path, flags, message):
    out = tmp_path / "o"
    assert message in error_line(invoke("quantize", model_dir, "-o", out, *flags))
    assert not out.exists()


@pytest.mark.parametrize("args,message", [
    (["eval", "--batch-size", "0"], "--batch-size"),
    (["eval", "--device", "tpu"], "--device 'tpu'"),
    (["prune", "kv", "--method", "cskv", "--device", "npu"], "--device 'npu'"),
    (["prune", "kv", "--ratio", "1.5"], "--ratio must be in [0, 1), got 1.5"),
    (["prune", "kv", "--k-ratio", "-0.5"], "--k-ratio must be in [0, 1)"),
    (["prune", "kv", "--method", "cskv", "--ratio", "0.5", "--seq-len", "1"], "--seq-len must be an integer ≥ 2"),
    (["prune", "kv", "--method", "duo", "--ratio", "0.5", "--seq-len", "32"], "--seq-len must be an integer ≥ 64"),
    # calibration flags where nothing calibrates: taken and recorded in the manifest, unused
    (["prune", "kv", "--method", "cskv", "--weights-only", "--calib-samples", "7"],
     "--calib-samples does not apply: --method cskv calibrates on no text with --weights-only"),
    (["prune", "kv", "--method", "duo", "--ratio", "0", "--seq-len", "99"],
     "--seq-len does not apply: --method duo calibrates on no text when it removes nothing"),
    # the flags' names, not the fields' (the duo message named a --heads the command does not have)
    (["prune", "kv", "--method", "kivi", "--group", "7"], "--window (128) must be a multiple of the kivi group (7)"),
    (["prune", "kv", "--method", "duo", "--ratio", "0.5", "--calib-samples", "0"],
     "--calib-samples 0 with no heads given would split duo's heads arbitrarily"),
], ids=["eval-batch-size", "eval-device", "prune-kv-device", "kv-ratio", "kv-k-ratio", "cskv-seq-len",
        "duo-seq-len", "cskv-idle-calibration", "duo-idle-calibration", "kivi-window-flag", "duo-steps-flag"])
def test_other_commands_check_their_flags(model_dir, tmp_path, args, message):
    """Flags checked before any work, with the one error line (these raised tracebacks from inside torch)."""
    out = ["-o", tmp_path / "o"] if args[0] == "prune" else []
    assert message in error_line(invoke(*args, model_dir, *out))


def test_check_settings_are_checked(artifact, tmp_path):
    """check --update with a window of 0 tokens, and a baseline whose settings or tolerance are not numbers: one
    error line each, the baseline's before anything is measured."""
    base = tmp_path / "b.json"
    assert "seq_len" in error_line(invoke("check", artifact, "--baseline", base, "--update", "--seq-len", 0))
    good = {"llmcomp_check": 1, "settings": {"windows": 1, "seq_len": 64},
            "metrics": {"ppl": {"value": 10.0, "better": "lower", "tolerance_rel": 0.1}}}
    for change, word in [({"settings": {"windows": "x"}}, "windows"), ({"settings": []}, "settings"),
                         ({"metrics": {"ppl": {"value": 1.0, "better": "lower", "tolerance_rel": "abc"}}},
                          "tolerance_rel")]:
        base.write_text(json.dumps({**good, **change}))
        assert word in error_line(invoke("check", artifact, "--baseline", base))


@pytest.mark.parametrize("change", [{"files": None}, {"stages": [{"foo": 1}]}, {"modules": []},
                                    {"stages": [{"method": "rtn", "config": "x"}]}],
                         ids=["files-null", "stage-without-method", "modules-array", "stage-config-string"])
def test_manifest_of_the_wrong_shape(artifact, tmp_path, change):
    """A manifest whose entries have the wrong JSON types: one error line from inspect and eval (these were
    AttributeError / KeyError tracebacks)."""
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(artifact, bad)
    manifest = json.loads((bad / "llmcomp.json").read_text())
    (bad / "llmcomp.json").write_text(json.dumps({**manifest, **change}))
    for cmd in (["inspect", bad], ["eval", bad, "--windows", 1]):
        assert "is corrupt" in error_line(invoke(*cmd))


def test_read_only_commands_do_not_speak_of_a_destination(artifact, tmp_path):
    """An OS error in a command that writes nothing (inspect, eval) is one line without "nothing was written at the
    destination", which only commands with an output can say."""
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(artifact, bad)
    (bad / "llmcomp.json").unlink()
    (bad / "llmcomp.json").mkdir()
    line = error_line(invoke("inspect", bad))
    assert "nothing was written" not in line


def test_cache_that_is_a_file(tmp_path, monkeypatch):
    """LLMCOMP_CACHE naming a file: one error line that names the variable (it said only "File exists"), here where
    the bundled model is fetched into the cache."""
    bad = tmp_path / "cache-file"
    bad.write_text("not a directory")
    monkeypatch.setenv("LLMCOMP_CACHE", str(bad))
    line = error_line(invoke("quantize", "-o", tmp_path / "out"))
    assert not (tmp_path / "out").exists()
    assert "LLMCOMP_CACHE" in line and str(bad) in line, line


def test_missing_model(tmp_path):
    assert "does not exist" in error_line(invoke("quantize", tmp_path / "nope", "-o", tmp_path / "o"))
    assert not (tmp_path / "o").exists()


def test_non_utf8_path(tmp_path):
    bad = str(tmp_path) + "/caf\udce9"  # a lone surrogate: a path that cannot be UTF-8 encoded
    r = invoke("quantize", bad, "-o", tmp_path / "o")
    assert r.exit_code == 2 and "Traceback" not in r.output


def test_empty_dir_is_not_a_model(tmp_path):
    (tmp_path / "d").mkdir()
    assert "not a model directory" in error_line(invoke("quantize", tmp_path / "d", "-o", tmp_path / "o"))


def test_corrupt_config_json(model_dir, tmp_path):
    m = _copy_model(model_dir, tmp_path)
    (m / "config.json").write_text("{not json")
    error_line(invoke("quantize", m, "-o", tmp_path / "o"))
    assert not (tmp_path / "o").exists()


def test_unsupported_architecture(model_dir, tmp_path):
    m = _copy_model(model_dir, tmp_path)
    cfg = json.loads((m / "config.json").read_text())
    cfg["model_type"], cfg["architectures"] = "nosuchmodel", ["NoSuchModelForCausalLM"]
    (m / "config.json").write_text(json.dumps(cfg))
    error_line(invoke("quantize", m, "-o", tmp_path / "o"))
    assert not (tmp_path / "o").exists()


def test_truncated_weights(model_dir, tmp_path):
    m = _copy_model(model_dir, tmp_path)
    f = m / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    error_line(invoke("quantize", m, "-o", tmp_path / "o"))
    assert not (tmp_path / "o").exists()


def test_nan_weights(model_dir, tmp_path):
    m = _copy_model(model_dir, tmp_path)
    f = m / "model.safetensors"
    state = load_file(str(f))
    key = next(k for k in state if k.endswith("mlp.down_proj.weight"))
    state[key][0, 0] = float("nan")
    save_file(state, str(f), metadata={"format": "pt"})
    assert "NaN" in error_line(invoke("quantize", m, "-o", tmp_path / "o"))
    assert not (tmp_path / "o").exists()


def test_nan_weights_stop_a_calibrated_job_before_its_pass(tmp_path, monkeypatch):
    """A NaN in the last decoder layer was found when GPTQ's calibration reached it: every earlier layer calibrated
    for nothing, and the note offered to resume a job that can only fail again."""
    from llmcomp.quant import base
    from tests.conftest import save_char_model

    m = save_char_model(tmp_path / "m", layers=2)
    state = load_file(str(m / "model.safetensors"))
    state["model.layers.1.mlp.down_proj.weight"][0, 0] = float("nan")
    save_file(state, str(m / "model.safetensors"), metadata={"format": "pt"})
    monkeypatch.setattr(base, "calibrate_layerwise", lambda *a, **k: pytest.fail("calibrated first"))
    r = invoke("quantize", m, "--method", "gptq", "--group-size", 32, "--calib-samples", 2, "--seq-len", 16, "-o",
               tmp_path / "o")
    assert "model.layers.1.mlp.down_proj has NaN" in error_line(r) and "resume" not in r.output
    assert not (tmp_path / "o").exists() and not (tmp_path / ".o.resume").exists()


def test_output_exists(model_dir, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert "already exists" in error_line(invoke("quantize", model_dir, "-o", out))
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_output_under_a_file(model_dir, tmp_path):
    (tmp_path / "file").write_text("x")
    error_line(invoke("quantize", model_dir, "-o", tmp_path / "file" / "o"))


@pytest.mark.parametrize("raised", ["OSError", "SafetensorError"])
def test_disk_full_leaves_nothing(model_dir, tmp_path, monkeypatch, raised):
    """safetensors reports a full disk as its own SafetensorError, not an OSError: a traceback, exit 1."""
    from safetensors import SafetensorError

    def full(*a, **k):
        if raised == "OSError":
            raise OSError(28, "No space left on device")
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr("safetensors.torch.save_file", full)
    out = tmp_path / "o"
    assert "No space left" in error_line(invoke("quantize", model_dir, "-o", out))
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".o")]  # no temp dir left behind


def test_disk_full_in_a_resume_checkpoint_is_an_oserror(tmp_path, monkeypatch):
    """The resume checkpoints' writes were not wrapped like the artifact's: a full disk was a traceback."""
    import errno

    from safetensors import SafetensorError

    from llmcomp.core.resume import save_state

    def full(*a, **k):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr("safetensors.torch.save_file", full)
    with pytest.raises(OSError) as e:
        save_state({"w": torch.zeros(2)}, tmp_path / "layer-0000.safetensors", {"k": "v"})
    assert e.value.errno == errno.ENOSPC and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args,message", [
    (["-o", "~no-such-user-x/o"], "'~' names no home directory here"),  # (a RuntimeError from pathlib)
    (["--method", "gptq", "--format", "nvfp4", "--bits", "3"], "nvfp4 stores 4-bit floats"),  # (named --method fp4)
    (["--device", "cpu"], "--device does not apply here: --method rtn"),  # (taken and ignored)
], ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_quantize_flags_a_hunt_found(model_dir, tmp_path, args, message):
    out = [] if "-o" in args else ["-o", tmp_path / "o"]
    assert message in error_line(invoke("quantize", model_dir, *out, *args))


def test_a_budget_every_layer_meets_at_the_widest_candidate_is_refused():
    """--bits 8.5 ran a full calibration pass (120 s on the bundled model) to store every layer as int8."""
    from llmcomp.formats import Uniform
    from llmcomp.quant.allocate import check_budget

    formats = [Uniform(bits=b, group_size=128) for b in (2, 3, 4, 8)]
    with pytest.raises(UserError, match="reaches the widest candidate, int8 g128 asym"):
        check_budget(formats, 8.5, {"a": (64, 256)})
    check_budget(formats[:3], 4.1, {"a": (64, 256)})  # (below int4's 4.25 with its scales: some layers int3)


def test_eval_errors(artifact, tmp_path):
    assert "--windows" in error_line(invoke("eval", artifact, "--windows", 0))
    assert "does not exist" in error_line(invoke("eval", tmp_path / "nope"))
    assert "does not exist" in error_line(invoke("eval", artifact, "--reference", tmp_path / "nope"))


@pytest.mark.parametrize("args,said", [
    (["prune", "experts", "--layer-ratio", "0=1.5"], "--layer-ratio 0=1.5: a ratio must be a fraction"),
    (["prune", "kv", "--method", "kivi", "--bits", "5"], "--bits for kivi must be 2, 3, 4 or 8, got 5."),
], ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_a_setting_is_named_by_its_flag(model_dir, tmp_path, args, said):
    """They said "layer 0 ratio must be ..." and "kivi bits must be ...": no flag named."""
    assert said in error_line(invoke(*args, model_dir, "-o", tmp_path / "o"))


@pytest.mark.parametrize("args,flag", [
    (["prune", "kv", "--method", "mustafar", "--ratio", "nan"], "--ratio"),
    (["prune", "kv", "--method", "a2sf", "--forget", "nan"], "--forget"),
    (["prune", "experts", "--ratio", "nan"], "--ratio"),
    (["prune", "dynamic", "--rate", "nan"], "--rate"),
    (["linearize", "--keep-softmax", "nan"], "--keep-softmax"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_a_nan_flag_is_named_by_its_flag(model_dir, tmp_path, args, flag):
    """NaN passes every range check, and the field-type check that catches it named the config's field
    (``ExpertPruneConfig.ratio must be a number``) where the user had typed a flag."""
    assert error_line(invoke(*args, model_dir, "-o", tmp_path / "o")) == f"error: {flag} must be a number, got nan."


def test_eval_reference_base_takes_an_artifacts_base_and_every_path_is_checked_first(model_dir, artifact, tmp_path):
    """``--reference base`` took the first path's base even where that path was a plain model (an exported
    checkpoint): the model was its own reference (KL 0, top-1 100 %, recorded so by --record); a mistyped later path
    was found after the earlier models' evaluations."""
    from tests.conftest import save_char_model

    assert "no path given is an llmcomp artifact" in error_line(invoke("eval", model_dir, "--reference", "base"))
    assert "--reference and --record apply to perplexity eval" in error_line(
        invoke("eval", model_dir, "--long", "--reference", "base"))  # (the flag that does not apply, named first)
    assert "does not exist" in error_line(invoke("eval", artifact, tmp_path / "nope", "--reference", "base"))
    base, quantized = tmp_path / "base", tmp_path / "q"
    save_char_model(base)
    assert invoke("quantize", base, "-o", quantized, "--bits", 3, "--group-size", 32).exit_code == 0
    r = invoke("eval", base, quantized, "--reference", "base", "--windows", 1, "--seq-len", 16, "--json",
               tmp_path / "rows.json")
    assert r.exit_code == 0, r.output
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert all(row["reference"] == str(base.resolve()) for row in rows)  # (the artifact's base, for both)
    assert rows[0]["kld_mean"] < 1e-6 and rows[1]["kld_mean"] > 0  # (the base against itself; the artifact not)


@pytest.mark.parametrize("flags,message", [
    (["--device-map", "gpu"], "--device-map 'gpu' is not one of"),
    (["--device", "cpu", "--device-map", "cpu"], "pass one of them"),
    (["--device-map", "cpu", "--max-memory", "cpu=1GiB"], "applies to --device-map auto"),
    (["--max-memory", "cpu=1"], "pass --offload-folder"),
    (["--max-memory", "cpu=x"], "is not a size"),
    (["--max-memory", "cpu=" + "9" * 400], "is larger than any machine's memory"),  # (an OverflowError)
    (["--long", "--max-memory", "cpu=1GiB"], "--long runs the model on one --device"),
    (["--long", "--reference", "base"], "--reference and --record apply to perplexity eval"),  # (ignored before)
    (["--long", "--record"], "--reference and --record apply to perplexity eval"),
    (["--long", "--seq-len", "16"], "--seq-len applies to perplexity eval, not --long"),  # (taken and ignored)
    (["--long", "--batch-size", "2"], "--batch-size applies to perplexity eval, not --long"),
    (["--context", "64"], "--context applies to --long eval only"),
    (["--passkey-samples", "3"], "--passkey-samples applies to --long eval only"),
    (["--long", "--context", "64", "--passkey-lengths", "-5", "--passkey-samples", "1"], "must be positive token"),
    (["--long", "--context", "64", "--passkey-samples", "0", "--needle-keys", "4"],
     "and --passkey-lengths, or --needle-keys 0."),
    (["--long", "--context", "64", "--passkey-samples", "0", "--passkey-lengths", "128"],
     "--passkey-lengths applies with --passkey-samples ≥ 1"),  # (taken and ignored, exit 0)
    (["--long", "--context", "64", "--passkey-lengths", "32", "--needle-keys", "50"],
     "--needle-keys must be at most 30 (0: no needle prompts), got 50."),  # (it said "between 1 and 30", no flag)
    (["--long", "--context", "64", "--passkey-lengths", "", "--needle-keys", "4"], "--needle-keys runs with the pass"),
    (["--long", "--context", "64", "--passkey-lengths", ""], "gives no length; give lengths, or --passkey-samples 0"),
    (["--long", "--context", "64", "--passkey-lengths", "32,,32"], "--passkey-lengths '32,,32' has an empty item"),
    (["--long", "--context", "64", "--passkey-lengths", "32,32"], "--passkey-lengths '32,32' lists 32 twice"),
    (["--device", "cpu", "--max-memory", "cpu=1GiB"], "pass one of them"),  # (a traceback from model.to before)
    (["--offload-folder", "OUT/afile.txt"], "is a file; give a directory"),
    (["--seq-len", "257", "--windows", "1"], "longer than the model's context (256 tokens)"),
    (["--seq-len", "257", "--windows", "1", "--reference", "base"], "longer than the model's context (256 tokens)"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_eval_placement_errors(artifact, tmp_path, flags, message):
    (tmp_path / "afile.txt").write_text("x")
    flags = [f.replace("OUT", str(tmp_path)) for f in flags]
    assert message in error_line(invoke("eval", artifact, *flags))


def test_inspect_plain_dir(tmp_path):
    (tmp_path / "d").mkdir()
    error_line(invoke("inspect", tmp_path / "d"))


def test_check_baseline_errors(artifact, tmp_path):
    error_line(invoke("check", artifact, "--baseline", tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    error_line(invoke("check", artifact, "--baseline", bad))
    bad.write_text("[" * 100000 + "]" * 100000)  # (a RecursionError in the JSON parser)
    assert "not valid JSON" in error_line(invoke("check", artifact, "--baseline", bad))
    assert "is a directory; give the baseline JSON file" in error_line(invoke("check", artifact, "--baseline",
                                                                              tmp_path))


def test_report_paths_are_checked_first(artifact, tmp_path):
    """--json / --junit / the baseline --update writes, in a folder that does not exist or naming a directory: one
    error line before any work (it came after the whole evaluation)."""
    gone = tmp_path / "no-such-folder" / "out.json"
    assert "--json" in error_line(invoke("eval", artifact, "--json", gone))
    assert "--json" in error_line(invoke("check", artifact, "--json", gone))
    assert "--junit" in error_line(invoke("check", artifact, "--junit", gone.with_suffix(".xml")))
    assert "--baseline" in error_line(invoke("check", artifact, "--update", "--baseline", gone))
    assert "is a directory" in error_line(invoke("eval", artifact, "--json", tmp_path))
    assert not gone.parent.exists()


def test_report_folders_that_take_no_file_are_named_first(artifact, tmp_path, monkeypatch):
    """--json / --junit / a baseline in a folder on a read-only mount (or one the user may not write in), and --record
    of an artifact there: the write failed with "Read-only file system" after the whole evaluation."""
    import errno
    import shutil
    import tempfile
    from pathlib import Path

    ro = tmp_path / "ro"
    ro.mkdir()
    art = shutil.copytree(artifact, ro / "art")
    mkstemp = tempfile.mkstemp

    def read_only(*args, dir=None, **kwargs):  # (a read-only mount, which root cannot write in either)
        if dir is not None and ro in (Path(dir), *Path(dir).parents):
            raise OSError(errno.EROFS, "Read-only file system", str(dir))
        return mkstemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    for args, flag in (((artifact, "--json", ro / "e.json"), "--json"), ((art, "--record"), "--record")):
        line = error_line(invoke("eval", *args, "--windows", 1, "--seq-len", 8))
        assert flag in line and "Read-only file system" in line, line
    for args, flag in ((("--junit", ro / "j.xml"), "--junit"),
                       (("--update", "--baseline", ro / "b.json"), "--baseline")):
        line = error_line(invoke("check", artifact, *args))
        assert flag in line and "cannot be written: Read-only file system" in line, line
    assert sorted(f.name for f in ro.iterdir()) == ["art"]


def test_a_directory_is_unwritable_as_a_report(tmp_path):
    """paths.unwritable said '' of a directory (a file could be made in the folder it is in): its callers refuse one
    first, the function on its own did not."""
    from llmcomp.core.paths import unwritable

    (tmp_path / "d").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "d")
    for path in (tmp_path / "d", tmp_path / "link", tmp_path):
        assert unwritable(path) == "it is a directory", path
    assert unwritable(tmp_path / "d" / "r.json") == ""  # (a file in it is fine)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "link"] and not any((tmp_path / "d").iterdir())


def test_reports_never_overwrite_what_the_command_reads(artifact, tmp_path):
    """eval --json ART/llmcomp.json, check --update --baseline ART/config.json and check --json BASELINE exited 0
    and broke the artifact or the baseline."""
    from pathlib import Path

    art = Path(artifact)
    before = {f.name: f.read_bytes() for f in art.iterdir() if f.is_file()}
    base = tmp_path / "b.json"
    base.write_text("{}")
    for args in (("eval", art, "--json", art / "llmcomp.json"), ("eval", art, "--json", art / "tokenizer.json"),
                 ("eval", art, "--reference", art, "--json", art / "model.safetensors"),
                 ("check", art, "--update", "--baseline", art / "config.json"),
                 ("check", art, "--baseline", base, "--json", base),
                 ("check", art, "--baseline", base, "--junit", base)):
        assert "which this command reads" in error_line(invoke(*args)), args
    clash = ("check", art, "--baseline", base, "--json", tmp_path / "r", "--junit", tmp_path / "r")
    assert "is where --json writes too" in error_line(invoke(*clash))
    assert {f.name: f.read_bytes() for f in art.iterdir() if f.is_file()} == before
    assert base.read_text() == "{}"
    from llmcomp.core.paths import check_report  # a new file beside the model is fine (cd ART && check . --update)

    check_report(art / "llmcomp-baseline.json", "--baseline", reads=[art])
    check_report(art / "eval.json", "--json", reads=[art, base])


def test_reports_never_write_a_file_an_artifact_loads(artifact, tmp_path):
    """bench kernels -o ART/llmcomp.json (and bench decode --synthetic's --out) read no model, so nothing guarded the
    artifact there: its manifest, config or weights were replaced by the timings, and a new .safetensors beside them
    failed its verification."""
    import re
    from pathlib import Path

    from llmcomp.core.paths import check_report

    art = Path(artifact)
    before = {f.name: f.read_bytes() for f in art.iterdir() if f.is_file()}
    for args in (("bench", "kernels", "-o", art / "llmcomp.json"),
                 ("bench", "decode", "--synthetic", "llama3-8b", "--out", art / "model.safetensors")):
        assert "into the llmcomp artifact" in error_line(invoke(*args)), args
    for name in ("config.json", "tokenizer.json", "extra.safetensors"):
        with pytest.raises(UserError, match=re.escape(f"--out {art / name} would write {name} into the llmcomp ")):
            check_report(art / name, "--out")
    assert {f.name: f.read_bytes() for f in art.iterdir() if f.is_file()} == before
    check_report(art / "kernels.json", "--out")  # (another file beside it is fine, as eval --json's is)
    (tmp_path / "plain").mkdir()
    check_report(tmp_path / "plain" / "config.json", "--out")  # (a folder that is no artifact)


def test_reports_never_overwrite_the_base_or_the_bundled_model(artifact, model_dir, monkeypatch, tmp_path):
    """eval --reference base --json BASE/config.json and eval --json onto the bundled model's config.json (no path,
    or its alias) were accepted: the reads list left out the base a manifest names and the bundled model."""
    from pathlib import Path

    monkeypatch.setenv("LLMCOMP_CACHE", str(tmp_path))
    bundled = tmp_path / "models" / "SmolLM2-135M-Instruct"
    bundled.mkdir(parents=True)
    (bundled / "config.json").write_text("{}")
    base = Path(model_dir) / "config.json"
    before = base.read_bytes()
    for args in (("eval", artifact, "--reference", "base", "--json", base),
                 ("eval", "--json", bundled / "config.json"),
                 ("eval", "smollm2-135m", "--json", bundled / "config.json"),
                 ("eval", artifact, "--reference", "smollm2-135m", "--json", bundled / "config.json"),
                 ("check", "smollm2-135m", "--update", "--baseline", bundled / "config.json")):
        assert "which this command reads" in error_line(invoke(*args)), args
    assert base.read_bytes() == before and (bundled / "config.json").read_text() == "{}"


def test_reports_never_write_a_file_the_bundled_models_copy_loads(monkeypatch, tmp_path):
    """bench kernels -o and bench decode --synthetic --out read no model, so a report onto the bundled model's
    converted copy in the cache (its config.json, weights) replaced it with the timings: every later command of the
    bundled model then failed on it. Another file beside it stays fine."""
    from llmcomp.core.paths import check_report

    monkeypatch.setenv("LLMCOMP_CACHE", str(tmp_path))
    bundled = tmp_path / "models" / "SmolLM2-135M-Instruct"
    bundled.mkdir(parents=True)
    (bundled / "config.json").write_text("{}")
    for args in (("bench", "kernels", "-o", bundled / "config.json"),
                 ("bench", "decode", "--synthetic", "llama3-8b", "--out", bundled / "model.safetensors")):
        assert "the bundled model's converted copy" in error_line(invoke(*args)), args
    link = tmp_path / "link"
    link.symlink_to(bundled)
    with pytest.raises(UserError, match="the bundled model's converted copy"):
        check_report(link / "tokenizer.json", "--out")
    assert (bundled / "config.json").read_text() == "{}" and not (bundled / "model.safetensors").exists()
    check_report(bundled / "kernels.json", "--out")


def test_bench_kernels_bad_flags():
    assert "--ms" in error_line(invoke("bench", "kernels", "--ms", "1,x"))
    # (an empty item was dropped, a repeated one timed twice)
    assert "--ms '1,,2' has an empty item" in error_line(invoke("bench", "kernels", "--ms", "1,,2"))
    assert "--ms '1,1' lists 1 twice" in error_line(invoke("bench", "kernels", "--ms", "1,1"))
    assert "--shapes" in error_line(invoke("bench", "kernels", "--shapes", "4096by4096"))
    # (checked before the GPU is asked for: on a CPU machine these said only "needs a CUDA GPU")
    assert "--ms" in error_line(invoke("bench", "kernels", "--ms", "0,1"))
    assert "--shapes" in error_line(invoke("bench", "kernels", "--shapes", "0x4096"))
    assert "bits" in error_line(invoke("bench", "kernels", "--bits", "9"))
    assert "--out" in error_line(invoke("bench", "kernels", "--out", "/no-such-folder/k.json"))
    # (shapes a row's format cannot store crashed the run after the rows before them; pvq needs N % 64)
    line = error_line(invoke("bench", "kernels", "--shapes", "100x100", "--bits", "", "--float-formats", "pvq2"))
    assert "--shapes 100x100 cannot be timed as pvq2" in line
    assert "mxfp4" in error_line(invoke("bench", "kernels", "--shapes", "64x100", "--float-formats", "mxfp4"))
    # (taken and ignored: they time the uniform rows only)
    for flag in (["--fp16"], ["--group-size", "64"]):
        assert f"{flag[0]} applies to the uniform rows" in error_line(invoke("bench", "kernels", "--bits", "",
                                                                             *flag))


# -- artifact damage --------------------------------------------------------------------------------

def _damaged(artifact, tmp_path, name, mutate):
    import shutil

    dst = tmp_path / name
    shutil.copytree(artifact, dst)
    mutate(dst)
    return dst


@pytest.mark.parametrize("how", ["flip", "truncate", "delete", "manifest-json", "manifest-missing-file"])
def test_damaged_artifact_eval_and_inspect(artifact, tmp_path, how):
    def mutate(d):
        f = d / "model.safetensors"
        if how == "flip":
            b = bytearray(f.read_bytes())
            b[len(b) // 2] ^= 0x01
            f.write_bytes(bytes(b))
        elif how == "truncate":
            f.write_bytes(f.read_bytes()[:100])
        elif how == "delete":
            f.unlink()
        elif how == "manifest-json":
            (d / "llmcomp.json").write_text("{")
        else:
            m = json.loads((d / "llmcomp.json").read_text())
            m["files"]["extra.safetensors"] = "0" * 64
            (d / "llmcomp.json").write_text(json.dumps(m))

    d = _damaged(artifact, tmp_path, how, mutate)
    error_line(invoke("inspect", d))
    error_line(invoke("eval", d, "--windows", 1))


@pytest.mark.parametrize("how", ["manifest-json", "delete", "unsealed-edit"])
def test_eval_checks_every_artifact_before_evaluating_any(model_dir, artifact, tmp_path, monkeypatch, how):
    """`eval A B C` with C's manifest not JSON, or a file it names gone, failed after A and B were evaluated
    (minutes on large models); --long alike."""
    from llmcomp import api

    def mutate(d):
        if how == "manifest-json":
            (d / "llmcomp.json").write_text("{")
        elif how == "delete":
            (d / "model.safetensors").unlink()
        else:
            m = json.loads((d / "llmcomp.json").read_text())
            m["stages"][0]["method"] = "gptq"
            (d / "llmcomp.json").write_text(json.dumps(m))

    d = _damaged(artifact, tmp_path, how, mutate)

    def ran(*args, **kwargs):
        raise AssertionError("a model was evaluated")

    monkeypatch.setattr(api, "evaluate", ran)
    monkeypatch.setattr(api, "evaluate_long", ran)
    said = {"manifest-json": "is corrupt (not valid JSON)", "delete": "model.safetensors is missing",
            "unsealed-edit": "was edited after the artifact was written"}[how]
    assert said in error_line(invoke("eval", artifact, model_dir, d, "--windows", 1))
    assert said in error_line(invoke("eval", artifact, d, "--long", "--context", 64, "--windows", 1))


@pytest.mark.parametrize("how", ["none", "pickles"])
def test_eval_checks_every_model_folder_has_weights_before_evaluating_any(model_dir, tmp_path, monkeypatch, how):
    """`eval A B` with B a model folder whose weights are not there (config.json only, or pickles llmcomp never
    reads) failed after A was evaluated; --long alike. A folder of safetensors shards (an index, no
    model.safetensors) passes the check."""
    from llmcomp import api
    from tests.conftest import tiny_llama

    bare = _copy_model(model_dir, tmp_path, "bare")
    (bare / "model.safetensors").unlink()
    if how == "pickles":
        torch.save({}, bare / "pytorch_model.bin")
    sharded = tmp_path / "sharded"
    tiny_llama().save_pretrained(sharded, max_shard_size="100KB")
    assert not (sharded / "model.safetensors").exists() and (sharded / "model.safetensors.index.json").is_file()
    evaluated = []

    def ran(path, **kwargs):
        if path == str(bare):
            raise AssertionError("the folder without weights was loaded")
        evaluated.append(path)
        raise UserError("stop")  # (the model itself is not the point)

    monkeypatch.setattr(api, "evaluate", ran)
    monkeypatch.setattr(api, "evaluate_long", ran)
    said = "holds no weights (no .safetensors file" if how == "none" else "never unpickles"
    assert said in error_line(invoke("eval", model_dir, bare, "--windows", 1))
    assert said in error_line(invoke("eval", model_dir, bare, "--long", "--context", 64, "--windows", 1))
    assert not evaluated
    assert "stop" in error_line(invoke("eval", model_dir, sharded, "--windows", 1))
    assert evaluated == [str(model_dir)]


def test_eval_refuses_a_model_given_twice(model_dir, artifact, tmp_path, monkeypatch):
    """`eval A A --record` evaluated A twice and appended its results to its manifest twice; the same artifact under
    another name (./A, a link) alike, and without --record a second identical row."""
    from llmcomp import api

    def ran(*args, **kwargs):
        raise AssertionError("a model was evaluated")

    monkeypatch.setattr(api, "evaluate", ran)
    monkeypatch.setattr(api, "evaluate_long", ran)
    link = tmp_path / "link"
    link.symlink_to(artifact)
    again = f"{artifact.parent}/./{artifact.name}"
    assert error_line(invoke("eval", artifact, model_dir, artifact, "--record")) == \
        f"error: {artifact} is given twice; evaluate each model once."
    for args in ((artifact, again), (artifact, link, "--record"), (model_dir, again, link, "--long")):
        assert error_line(invoke("eval", *args)).endswith(" are the same model; evaluate each model once."), args


def test_an_artifact_without_its_config_is_named_as_such(artifact, tmp_path):
    """inspect, eval and check of an artifact whose config.json is gone said it "is not a model directory (no
    config.json); pass a Hugging Face model folder or an llmcomp artifact", of an llmcomp artifact (report named the
    missing file)."""
    d = _damaged(artifact, tmp_path, "config", lambda d: (d / "config.json").unlink())
    for args in (("inspect", d), ("eval", d), ("check", d), ("report", d), ("eval", artifact, "--reference", d)):
        assert error_line(invoke(*args)) == f"error: Artifact file {d / 'config.json'} is missing.", args


def test_eval_takes_a_batch_size_past_int64_and_inspect_an_artifact_without_its_version(artifact, tmp_path):
    """--batch-size 99999999999999999999: "Overflow when unpacking long long"; inspect of a manifest without
    llmcomp_version (unsealed, as before the seal): KeyError. Both tracebacks."""
    import llmcomp
    from llmcomp.eval.perplexity import perplexity

    windows = torch.randint(0, 100, (3, 16))
    model = llmcomp.load(artifact)
    assert perplexity(model, None, windows=windows, batch_size=99999999999999999999) == perplexity(
        model, None, windows=windows, batch_size=3)

    def mutate(d):
        m = json.loads((d / "llmcomp.json").read_text())
        del m["manifest_sha256"], m["llmcomp_version"]
        (d / "llmcomp.json").write_text(json.dumps(m))

    r = invoke("inspect", _damaged(artifact, tmp_path, "old", mutate))
    assert r.exit_code == 0 and "1 / ?" in r.output, r.output


def test_a_listed_folder_is_refused_not_hashed(artifact, tmp_path):
    """An unsealed manifest (as artifacts from before the seal are) listing a folder: IsADirectoryError from the
    library (the CLI said only "error: Is a directory")."""
    import llmcomp
    from llmcomp.errors import UserError

    def mutate(d):
        (d / "extra").mkdir()
        m = json.loads((d / "llmcomp.json").read_text())
        del m["manifest_sha256"]
        m["files"]["extra"] = "0" * 64
        (d / "llmcomp.json").write_text(json.dumps(m))

    d = _damaged(artifact, tmp_path, "folder", mutate)
    with pytest.raises(UserError, match="extra is not a file"):
        llmcomp.load(d)


def test_fuzz_artifact_reader(artifact, tmp_path):
    """40 random byte flips and truncations of the manifest and the weights: the loader either raises
    UserError or (for a change the checks cannot see and that does not matter) loads a working model."""
    import shutil

    import llmcomp
    from llmcomp.errors import UserError

    rng = random.Random(0)
    outcomes = {"error": 0, "loaded": 0}
    for i in range(40):
        d = tmp_path / f"f{i}"
        shutil.copytree(artifact, d)
        f = d / rng.choice(["llmcomp.json", "model.safetensors"])
        data = bytearray(f.read_bytes())
        if rng.random() < 0.5:
            for _ in range(rng.randint(1, 4)):
                data[rng.randrange(len(data))] = rng.randrange(256)
        else:
            del data[rng.randrange(len(data)):]
        f.write_bytes(bytes(data))
        try:
            model = llmcomp.load(d)
            with torch.no_grad():
                model(input_ids=torch.tensor([[1, 2, 3]]))
            outcomes["loaded"] += 1
        except UserError:
            outcomes["error"] += 1
        shutil.rmtree(d)
    assert outcomes["error"] >= 30, outcomes


def test_pickle_weights_are_refused_not_loaded(tmp_path):
    """A model saved as pytorch_model.bin was unpickled (and its size counted as 0 MB)."""
    from tests.conftest import tiny_llama

    path = tmp_path / "bin"
    model = tiny_llama()
    model.save_pretrained(path)
    (path / "model.safetensors").unlink()
    torch.save(model.state_dict(), path / "pytorch_model.bin")
    assert "never unpickles" in error_line(invoke("quantize", path, "-o", tmp_path / "o"))
    assert not (tmp_path / "o").exists()


def test_calibration_windows_longer_than_the_context_refused(tmp_path):
    """quantize calibrated past the context silently (RoPE) or crashed with an IndexError (learned positions);
    eval refused the same windows."""
    from tests.conftest import save_char_model

    model = save_char_model(tmp_path / "m", layers=1)
    assert "Calibration windows of 400 tokens are longer than the model's context (256 tokens)" in error_line(
        invoke("quantize", model, "-o", tmp_path / "o", "--method", "gptq", "--seq-len", 400, "--calib-samples", 2))


def test_user_text_is_not_read_as_markup(model_dir, tmp_path):
    """Paths, patterns and config values print as given: rich markup in them raised a MarkupError (a traceback)
    or vanished (a path ``q4[v2]`` printed as ``q4``, a target ``re:.*[qkv]_proj`` as ``re:.*_proj``)."""
    assert f"{tmp_path / 'no[/x]'} does not exist" in error_line(invoke("eval", tmp_path / "no[/x]"))
    out = tmp_path / "q4[v2]"
    r = invoke("quantize", model_dir, "-o", out, "--bits", 4, "--group-size", 32, "--target", "re:.*[qkv]_proj")
    assert r.exit_code == 0, r.output
    assert f"wrote {out}" in " ".join(r.output.split())
    shown = invoke("inspect", out)
    assert shown.exit_code == 0 and "re:.*[qkv]_proj" in shown.output
    assert "q4[v2]" in invoke("eval", out, "--windows", 1, "--seq-len", 16).output


@pytest.mark.parametrize("edit,needle", [
    (lambda c: c.update(num_hidden_layers=1), "gives 1 layers, but its weights hold more"),
    (lambda c: c.update(vocab_size=c["vocab_size"] + 3), "other shapes than its config.json gives"),
    (lambda c: c.update(_name_or_path=5), None),
], ids=["fewer-layers", "vocab", "name-not-a-string"])
def test_a_config_that_does_not_fit_its_weights(tiny_model_dir, edit, needle):
    """config.json against its weights: fewer layers than stored loaded a model cut short, silently; other sizes
    were a transformers RuntimeError traceback; a non-string name a TypeError."""
    import json

    from llmcomp.core import model as model_mod
    from llmcomp.errors import UserError

    cfg_path = tiny_model_dir / "config.json"
    cfg = json.loads(cfg_path.read_text())
    edit(cfg)
    cfg_path.write_text(json.dumps(cfg))
    if needle is None:
        assert model_mod.model_name(tiny_model_dir) == tiny_model_dir.resolve().name
        return
    with pytest.raises(UserError, match=needle):
        model_mod.load_hf(tiny_model_dir)


@pytest.mark.parametrize("exc,files_fault", [
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), False),
    (RuntimeError("expected m1 and m2 to have the same dtype, but got: float != c10::BFloat16"), False),
    (RuntimeError("Error(s) in loading state_dict for LlamaForCausalLM:\n\tsize mismatch for lm_head.weight\n\tYou "
                  "may consider adding `ignore_mismatched_sizes=True` in the model `from_pretrained` method."), True),
], ids=["out-of-memory", "dtype", "transformers-4-size-mismatch"])
def test_only_runtime_errors_of_the_weights_are_a_bad_model_folder(tiny_model_dir, monkeypatch, exc, files_fault):
    """Every RuntimeError of from_pretrained was told as 'Could not load a causal LM from DIR' (a CUDA out of memory
    too, a torch.OutOfMemoryError being one); only the weights' misfit to config.json is the folder's fault."""
    from transformers import AutoModelForCausalLM

    from llmcomp.core import model as model_mod

    def fail(*args, **kwargs):
        raise exc

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", fail)
    with pytest.raises(UserError if files_fault else type(exc)) as caught:
        model_mod.load_hf(tiny_model_dir)
    assert isinstance(caught.value, UserError) == files_fault
    if files_fault:
        assert "other shapes than its config.json gives" in str(caught.value)
    else:
        assert caught.value is exc


@pytest.mark.parametrize("content", ["{", '{"version": "1.0"}'], ids=["not-json", "wrong-structure"])
def test_tokenizer_files_that_do_not_load_are_one_error(tmp_path, content):
    """A damaged tokenizer.json was taken for no tokenizer (GPTQ: "the model directory has none"; RTN wrote an
    artifact without one) or was a KeyError traceback."""
    import llmcomp
    from conftest import save_char_model
    from llmcomp import api
    from llmcomp.core import model as model_mod
    from llmcomp.errors import UserError
    from llmcomp.formats import Uniform
    from llmcomp.quant import RTNConfig

    path = save_char_model(tmp_path / "m", layers=1)
    assert model_mod.load_tokenizer(path) is not None
    (path / "tokenizer.json").write_text(content)
    with pytest.raises(UserError, match="tokenizer files of .* do not load"):
        model_mod.load_tokenizer(path)
    with pytest.raises(UserError, match="tokenizer files of .* do not load"):  # (what would be written without it)
        api.quantize(RTNConfig(format=Uniform(bits=4, group_size=16)), tmp_path / "a", str(path))
    with pytest.raises(UserError, match="tokenizer files of .* do not load"):
        llmcomp.load(path, return_tokenizer=True)
    # a load for inference needs no tokenizer (one a missing optional package keeps from loading blocked the model)
    with pytest.warns(UserWarning, match="do not load.*without a tokenizer"):
        assert llmcomp.load(path).model.embed_tokens.weight.shape[0] > 0
    for f in model_mod.TOKENIZER_FILES:
        (path / f).unlink(missing_ok=True)
    assert model_mod.load_tokenizer(path) is None


# -- the Python API -----------------------------------------------------------------------------------

def test_api_arguments_of_the_wrong_kind_are_one_error(artifact, model_dir, tmp_path):
    """Library callers got AttributeErrors from deep inside (a preset's name as the config), deep torch errors
    (evaluate at seq_len 0, load(dtype="bfloat16")) or silent wrong results (symmetric="no" was truthy, a
    per-layer format under a dotted suffix was dropped)."""
    import llmcomp
    from llmcomp import api
    from llmcomp.errors import UserError
    from llmcomp.formats import Uniform
    from llmcomp.formats.fp4 import FP4, NVFP4
    from llmcomp.prune.kv.kivi import KIVIConfig
    from llmcomp.quant import GPTQConfig, RTNConfig
    from llmcomp.quant.allocate import AllocationConfig
    from llmcomp.quant.fp4 import FP4Config

    W4 = Uniform(bits=4, group_size=32)
    bad = [
        (lambda: api.quantize("w4g128", tmp_path / "o", str(model_dir)), "config must be a quantization config"),
        (lambda: api.prune_kv("kivi", tmp_path / "o", str(model_dir)), "policy must be a KV policy"),
        (lambda: Uniform(bits=4, group_size=32, symmetric="no"), "Uniform.symmetric must be True or False"),
        (lambda: KIVIConfig(bits=4.0), "KIVIConfig.bits must be an integer"),
        (lambda: RTNConfig(targets="Linear"), "RTNConfig.targets must be a tuple"),
        (lambda: RTNConfig(format=NVFP4()), "RTNConfig.format must be Uniform"),
        (lambda: FP4Config(format=W4), "FP4Config.format must be BlockFP"),
        (lambda: FP4(group_size=1 << 30), "at most 65536"),
        (lambda: api.quantize(RTNConfig(format=W4, formats={"mlp.down_proj": Uniform(bits=8, group_size=32)}),
                              tmp_path / "o", str(model_dir)), "per-layer format names 'mlp.down_proj'"),
        (lambda: api.quantize(RTNConfig(format=W4, formats={"model.layers.0.mlp.down_proj": "int8"}),
                              tmp_path / "o", str(model_dir)), "must be a weight format"),
        (lambda: api.quantize(GPTQConfig(format=W4), tmp_path / "o", str(model_dir), calib_samples=4.0),
         "must be integers"),
        (lambda: api.quantize(RTNConfig(format=W4), tmp_path / "o", str(model_dir), calib_samples=4),
         "calib_samples does not apply here: method 'rtn'"),
        (lambda: api.quantize(RTNConfig(format=W4), tmp_path / "o", str(model_dir), calib_batch=2),
         "calib_batch does not apply here"),
        (lambda: llmcomp.load(artifact, dtype=torch.int8), "dtype must be a floating-point"),
        (lambda: api.evaluate(artifact, seq_len=0), "--seq-len must be an integer ≥ 2"),
        (lambda: api.evaluate(artifact, seq_len=32, batch_size=0), "--batch-size must be an integer ≥ 1"),
        (lambda: api.evaluate(artifact, seq_len=32.0), "--seq-len must be an integer"),
        (lambda: RTNConfig(targets=None), "RTNConfig.targets must be a tuple of strings"),
        (lambda: RTNConfig(targets=(1,)), "RTNConfig.targets must be a tuple of strings"),
        (lambda: RTNConfig(formats=None), "RTNConfig.formats must be a dict"),
        (lambda: api.evaluate_long(artifact, context=-1), "--context must be an integer ≥ 16"),
        (lambda: api.evaluate_long(artifact, n_windows=1.5), "--windows must be an integer"),
        (lambda: api.evaluate_long(artifact, passkey_lengths=512), "--passkey-lengths must be a sequence"),
        (lambda: api.evaluate_long(artifact, passkey_samples=0, needle_keys=2), "--needle-keys runs with"),
        (lambda: api.quantize(RTNConfig(format=Uniform(bits=4, group_size=64)), tmp_path / "o", str(model_dir),
                              allocation=AllocationConfig(budget=3.5, group_size=32)),
         r"differs from .* e.g. AllocationConfig\(..., group_size=64, symmetric=False\)"),
        (lambda: api.quantize(FP4Config(), tmp_path / "o", str(model_dir), allocation=AllocationConfig(budget=3.5)),
         "FP4Config's format MXFP4 does not take it"),
        (lambda: api.quantize(RTNConfig(format=W4, formats={"model.layers.0.mlp.down_proj": W4}), tmp_path / "o",
                              str(model_dir), allocation=AllocationConfig(budget=3.5, group_size=32)),
         "drop config.formats or the allocation"),
        (lambda: api.quantize(RTNConfig(format=W4), tmp_path / "o", str(model_dir), device="tpu"), "is not a device"),
        (lambda: api.quantize(RTNConfig(format=W4), tmp_path / "o", torch.nn.Linear(2, 2)),
         "The model must be a path .* got Linear; save it with save_pretrained"),
        (lambda: api.quantize(RTNConfig(format=W4), 5, str(model_dir)), "The output must be a path"),
        (lambda: llmcomp.load(3), "The model must be a path .* got int"),
        (lambda: api.export(torch.nn.Linear(2, 2), "gptq", tmp_path / "o"), "The artifact must be a path"),
        (lambda: api.report(None), "The artifact must be a path .* got NoneType"),
    ]
    for call, match in bad:
        with pytest.raises(UserError, match=match):
            call()
    assert not (tmp_path / "o").exists()
    assert GPTQConfig(format=NVFP4()).format == NVFP4()  # (GPTQ takes the FP4 grids too)
    assert RTNConfig(targets=["q_proj"]).targets == ("q_proj",)  # (a list stands for its tuple)
    assert llmcomp.load(artifact, dtype="bfloat16").model.embed_tokens.weight.dtype == torch.bfloat16


def test_bench_decode_refuses_a_kv_policy(model_dir, tmp_path):
    """bench decode's static cache bypasses the policy: the dense model was timed under the artifact's name."""
    out = tmp_path / "kv"
    r = invoke("prune", "kv", model_dir, "-o", out, "--method", "streaming", "--budget", 40)
    assert r.exit_code == 0, r.output
    assert "holds a KV-cache policy (kv-streaming), which bench decode" in error_line(invoke("bench", "decode", out))



def test_bench_decode_refuses_a_linearized_model(tmp_path):
    """Its static cache decoded a hybrid's softmax layers over unwritten slots."""
    from llmcomp.core.artifact import write_artifact
    from tests.conftest import tiny_llama

    stage = {"method": "linearize-hedgehog", "kind": "linearize", "config": {}, "metrics": {}}
    out = write_artifact(tmp_path / "lin", tiny_llama(), None, base_model={}, stages=[stage])
    assert "is linearized (linearize-hedgehog); bench decode times a static cache" in error_line(
        invoke("bench", "decode", out))
    # (as the original it was loaded and timed first, before the artifact; a KV policy's, dense, as the original)
    plain = write_artifact(tmp_path / "plain", tiny_llama(), None, base_model={}, stages=[])
    assert f"--original {out} is linearized" in error_line(invoke("bench", "decode", plain, "--original", out))


@pytest.mark.parametrize("seed", [2 ** 64, -1])
def test_seeds_torch_cannot_take_are_refused_before_the_model_loads(model_dir, tmp_path, seed):
    """2**64 overflowed inside torch after the model had loaded (a traceback); 1.5 reached torch.manual_seed."""
    from llmcomp import api
    from llmcomp.errors import UserError
    from llmcomp.linearize.distill import LinearizeConfig
    from llmcomp.quant import GPTQConfig

    assert "--seed must be a whole number in [0, 2**62)" in error_line(
        invoke("quantize", model_dir, "-o", tmp_path / "q", "--method", "gptq", f"--seed={seed}"))
    with pytest.raises(UserError, match="--seed must be a whole number"):
        api.quantize(GPTQConfig(), tmp_path / "q", str(model_dir), seed=1.5)
    with pytest.raises(UserError, match="LinearizeConfig.seed must be a whole number"):
        LinearizeConfig(seed=seed)
    # (a config's seed is named by the command's flag: it said "LinearizeConfig.seed must be ...")
    for cmd in (["linearize", model_dir, "--tokens", "0"], ["prune", "experts", model_dir, "--method", "random"]):
        line = error_line(invoke(*cmd, "-o", tmp_path / "o", f"--seed={seed}"))
        assert "error: --seed must be a whole number in [0, 2**62)" in line, line


def test_calibration_flags_of_a_method_that_reads_no_text_are_refused(model_dir, tmp_path):
    """RTN took --calib-samples/--seq-len/--seed/--calib-batch and recorded calibration: null."""
    for flags in (["--calib-samples", 3], ["--seq-len", 9], ["--seed", 5], ["--calib-batch", 2]):
        assert "reads no calibration text" in error_line(invoke("quantize", model_dir, "-o", tmp_path / "q", *flags))


def test_library_arguments_found_by_the_api_hunt(artifact, model_dir, tmp_path):
    """Each went wrong quietly or deep inside: overwrite="no" replaced the output; layer_ratios=[0.5] raised an
    AttributeError; ridge=nan passed the config and failed at the write, blaming the model; bits="4" read "got 4";
    progress=None failed at the first note; shard_bytes=True wrote one-byte shards; a torch dtype was "unknown";
    linearize fine-tuned on windows past the model's context."""
    from llmcomp import api
    from llmcomp.convert.moefy import MoefyConfig
    from llmcomp.errors import UserError
    from llmcomp.formats import Uniform
    from llmcomp.linearize.distill import LinearizeConfig
    from llmcomp.prune.experts import ExpertPruneConfig
    from llmcomp.quant import RTNConfig
    from tests.conftest import save_char_model

    W4 = Uniform(bits=4, group_size=32)
    (tmp_path / "o").mkdir()
    chars = save_char_model(tmp_path / "chars", layers=1)
    bad = [
        (lambda: api.quantize(RTNConfig(format=W4), tmp_path / "o", str(model_dir), overwrite="no"),
         "overwrite must be True or False, got 'no'"),
        (lambda: api.export(artifact, "gptq", tmp_path / "o", overwrite=1), "overwrite must be True or False"),
        (lambda: api.load(artifact, return_tokenizer="no"), "return_tokenizer must be True or False, got 'no'"),
        (lambda: ExpertPruneConfig(layer_ratios=[0.5]), "ExpertPruneConfig.layer_ratios must be a dict"),
        (lambda: MoefyConfig(ridge=float("nan")), "MoefyConfig.ridge must be a number, got nan"),
        (lambda: Uniform(bits="4"), "Uniform.bits must be an integer, got '4'"),
        (lambda: api.quantize(RTNConfig(format=W4), tmp_path / "s", str(model_dir), shard_bytes=True),
         "shard_bytes must be a positive integer, got True"),
        (lambda: api.evaluate(str(chars), seq_len=32, n_windows=1, progress="bar"), "progress must be an llmcomp"),
        (lambda: api.linearize(LinearizeConfig(transfer_steps=1, tokens=2048, seq_len=1024, batch_size=1,
                                               window=16), tmp_path / "lin", str(chars), calib_samples=2,
                               calib_seq_len=64),
         r"Fine-tune windows of 1024 tokens are longer than the model's context \(256 tokens\)"),
    ]
    for call, match in bad:
        with pytest.raises(UserError, match=match):
            call()
    assert not any((tmp_path / "o").iterdir()) and not (tmp_path / "s").exists() and not (tmp_path / "lin").exists()
    assert api.evaluate(str(chars), seq_len=32, n_windows=1, progress=None)["windows"] == 1
    from llmcomp.core.progress import Progress

    class Notes(Progress):
        def __init__(self):
            self.seen = []

        def note(self, message):
            self.seen.append(message)

    notes = Notes()  # more windows than the held-out text holds: evaluated, and said so
    got = api.evaluate(str(chars), seq_len=256, n_windows=10 ** 6, batch_size=64, progress=notes)["windows"]
    said = f"holds {got} windows of 256 tokens; evaluating those {got} (--windows 1000000)"
    assert got < 10 ** 6 and said in " ".join(notes.seen)
    assert api.parse_dtype(torch.bfloat16) is torch.bfloat16 and api.parse_dtype("float16") is torch.float16


@pytest.mark.parametrize("args", [
    ["quantize", "-o", ""], ["quantize", "--offload-folder", " "], ["eval", "--json", ""],
    ["check", "x", "--baseline", ""], ["check", "x", "--junit", ""], ["bench", "kernels", "-o", ""],
    ["bench", "decode", "-o", ""], ["report", "x", "-o", ""], ["convert", "moefy", "x", "-o", ""],
    ["export", "x", "--to", "gptq", "-o", ""], ["linearize", "-o", ""], ["prune", "experts", "-o", ""],
    ["prune", "dynamic", "-o", ""], ["prune", "kv", "-o", ""],
], ids=lambda v: " ".join(repr(a) if not a.strip() else a for a in v))
def test_an_empty_path_flag_is_refused_by_name(args):
    """click reads '' as Path('.'): `quantize -o ''` said "Output . already exists", as if . had been given."""
    result = invoke(*args)
    said = "is only spaces" if args[-1] == " " else "is empty"
    assert result.exit_code == 2 and f"{said}; give a path." in result.output, result.output
    flag = next(a for a, v in zip(args, args[1:]) if not v.strip())
    assert f"'{flag}'" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("command", ["quantize", "eval", "inspect", "report", "check", "export"])
def test_an_empty_model_path_is_refused(command):
    """An empty model argument was read as the current folder (". is not a model directory")."""
    extra = ["--to", "gptq", "-o", "x"] if command == "export" else []
    assert "path is empty" in error_line(invoke(command, "", *extra))


def test_gpt2_conv1d_layers_are_named(tmp_path):
    """GPT-2 keeps its projections as transformers' Conv1D: the refusal offered --ignore '' (its tied lm_head alone
    would have been quantized)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=32, bos_token_id=0,
                               eos_token_id=0)).save_pretrained(tmp_path / "gpt2")
    said = error_line(invoke("quantize", tmp_path / "gpt2", "-o", tmp_path / "o"))
    assert "holds its projections as transformers' Conv1D (4 layers, e.g. transformer.h.0.attn.c_attn)" in said
    assert "--ignore" not in said


@pytest.mark.parametrize("command", [["quantize"], ["prune", "kv"]])
def test_an_output_name_too_long_for_its_siblings_is_named(model_dir, tmp_path, command):
    """A 250-byte name is a legal folder, but its lock file .NAME.resume.lock is not: "File name too long" named
    that hidden file, not the name given."""
    said = error_line(invoke(*command, model_dir, "-o", tmp_path / ("a" * 250)))
    assert "is 250 bytes; llmcomp writes beside it" in said and "give at most 241 bytes" in said

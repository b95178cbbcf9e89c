"""The command line: one clear line and exit code 2 for every bad input; nothing written."""
import json

import pytest
from typer.testing import CliRunner

from llmcomp.cli.app import app

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def one_error_line(result):
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2, result.output
    assert len([line for line in lines if line.startswith("error:")]) == 1, result.output
    assert "Traceback" not in result.output
    return next(line for line in lines if line.startswith("error:"))


def test_help_reads_well():
    r = invoke("--help")
    assert r.exit_code == 0 and "quantize" in r.output and "eval" in r.output and "inspect" in r.output
    for cmd in ("quantize", "eval", "inspect"):
        r = invoke(cmd, "--help")
        assert r.exit_code == 0, r.output
    # --overwrite is a flag with no --no-overwrite twin: the twin did nothing and widened every writer's option table
    for cmd in (["quantize"], ["export"], ["report"], ["linearize"], ["prune", "experts"], ["prune", "kv"],
                ["convert", "moefy"]):
        r = runner.invoke(app, [*cmd, "--help"], env={"COLUMNS": "200"})
        assert "--overwrite" in r.output and "--no-overwrite" not in r.output, (cmd, r.output)


def test_quantize_help_names_every_method_that_reads_a_flag():
    """--damp and --act-order said GPTQ/decoupleQ only, while vptq and pvq read both; --format named mxfp4 the default
    of gptq too, whose default is the integer grid."""
    import typer.main

    from llmcomp.cli.methods import unused_options
    from llmcomp.quant import METHODS

    helps = {p.name: p.help.lower() for p in typer.main.get_command(app).commands["quantize"].params}
    for method in METHODS.names():
        for flag in ("damp", "act_order"):
            if flag not in unused_options(method, 4, None, None):
                assert method in helps[flag], (flag, method)
    assert "--sensitivity output" in helps["damp"] and "integer grid for gptq" in helps["fp4_format"]


def test_quantize_then_inspect(tiny_model_dir, tmp_path):
    out = tmp_path / "q"
    r = invoke("quantize", tiny_model_dir, "-o", out, "--bits", 3, "--group-size", 32)
    assert r.exit_code == 0, r.output
    r = invoke("inspect", out, "--json")
    assert r.exit_code == 0
    m = json.loads(r.output)
    assert m["stages"][0]["config"]["format"]["bits"] == 3
    r = invoke("inspect", out)
    assert r.exit_code == 0 and "Uniform" in r.output


@pytest.mark.parametrize(
    "args,message",
    [
        (["--bits", "9"], "bits must be an integer from 2 to 8"),
        (["--bits", "1"], "bits must be an integer from 2 to 8"),
        (["--method", "magic"], "Unknown quantization method 'magic'"),
        (["--group-size", "12"], "group size must be a multiple of 8"),
        (["--preset", "w5"], "Unknown preset 'w5'"),
        (["--target", "re:("], "Invalid layer pattern"),
        (["--target", "Conv2d"], "'Conv2d' (targets) matches no module"),
        (["--dtype", "float8"], "Unknown dtype"),
    ],
    ids=lambda v: v if isinstance(v, str) else " ".join(v),
)
def test_bad_quantize_flags(tiny_model_dir, tmp_path, args, message):
    out = tmp_path / "o"
    r = invoke("quantize", tiny_model_dir, "-o", out, *args)
    assert message in one_error_line(r)
    assert not out.exists()


@pytest.mark.parametrize("args", [["--method", "gptq"], ["--method", "decoupleq"], ["--bits", "2.5"]],
                         ids=["gptq", "decoupleq", "allocation"])
def test_calibrated_methods_need_a_tokenizer(tiny_model_dir, tmp_path, args):
    r = invoke("quantize", tiny_model_dir, "-o", tmp_path / "o", *args)
    assert "needs a tokenizer" in one_error_line(r)


def test_bad_allocation_flags(tiny_model_dir, tmp_path):
    r = invoke("quantize", tiny_model_dir, "-o", tmp_path / "o", "--bits", "2.5", "--candidates", "2,x")
    assert "--candidates" in one_error_line(r)
    r = invoke("quantize", tiny_model_dir, "-o", tmp_path / "o", "--bits", "2.5", "--candidates", "1,4")
    assert "candidates must be integers from 2 to 8" in one_error_line(r)


def test_missing_model(tmp_path):
    r = invoke("quantize", tmp_path / "nope", "-o", tmp_path / "o")
    assert "does not exist" in one_error_line(r)


def test_not_a_model(tmp_path):
    (tmp_path / "d").mkdir()
    r = invoke("quantize", tmp_path / "d", "-o", tmp_path / "o")
    assert "not a model directory" in one_error_line(r)


def test_output_exists(tiny_model_dir, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    r = invoke("quantize", tiny_model_dir, "-o", out)
    assert "already exists" in one_error_line(r)
    assert list(out.iterdir()) == []


def test_corrupt_artifact_on_eval_and_inspect(tiny_model_dir, tmp_path):
    out = tmp_path / "q"
    assert invoke("quantize", tiny_model_dir, "-o", out).exit_code == 0
    f = out / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-5] ^= 0xFF
    f.write_bytes(bytes(data))
    assert "model.safetensors is corrupt" in one_error_line(invoke("inspect", out))
    assert "corrupt" in one_error_line(invoke("eval", out))


def test_eval_bad_windows(tiny_model_dir):
    assert "--windows" in one_error_line(invoke("eval", tiny_model_dir, "--windows", 0))


def test_eval_record_writes_manifest(tiny_model_dir, tmp_path, monkeypatch):
    from llmcomp import api
    from llmcomp.core.artifact import read_manifest

    out = tmp_path / "q"
    assert invoke("quantize", tiny_model_dir, "-o", out).exit_code == 0
    row = {"path": str(out), "name": "q", "stages": "rtn", "ppl": 12.5, "nll": 2.5, "tokens": 10, "windows": 1,
           "seq_len": 11, "bits_per_weight": 4.5, "size_mb": 0.1, "text": "pydoc", "eval_time_s": 0.1,
           "kld_mean": 0.01, "kld_p99": 0.1, "top1_agree": 0.9, "greedy_prefix": 20.0}
    monkeypatch.setattr(api, "evaluate", lambda *a, **k: dict(row))
    r = invoke("eval", out, "--record")
    assert r.exit_code == 0, r.output
    m = read_manifest(out)  # still verifies: the manifest is not a hashed file
    assert m["evaluations"][-1]["ppl"] == 12.5 and m["evaluations"][-1]["kld_mean"] == 0.01
    import io

    from rich.console import Console

    from llmcomp.cli import render

    text = io.StringIO()  # (inspect did not show them: report.md only)
    Console(file=text, width=300).print(*render.manifest_tables(m))
    assert "ppl 12.5000, kld_mean 0.0100, top1_agree 0.9000, bits_per_weight 4.5000" in text.getvalue()
    # (a plain model directory was skipped without a word, and with no artifact at all nothing was recorded)
    assert "no path given is an artifact" in one_error_line(invoke("eval", tiny_model_dir, "--record"))
    assert "does not exist" in one_error_line(invoke("eval", tmp_path / "typo", "--record"))  # (not "no artifact")
    monkeypatch.setattr(api, "evaluate", lambda p, **k: {**row, "path": str(p)})
    r = invoke("eval", out, tiny_model_dir, "--record")
    assert r.exit_code == 0 and "is not an artifact: --record skipped it" in " ".join(r.output.split()), r.output
    assert len(read_manifest(out)["evaluations"]) == 2


def test_eval_caption_says_when_the_text_holds_fewer_windows():
    from llmcomp.cli.render import eval_table

    rows = [{"name": "a", "stages": "rtn", "ppl": 10.0, "bits_per_weight": 4.5, "eval_time_s": 1.0,
             "text": "austen", "windows": 3, "seq_len": 512}]
    assert "(all the held-out text holds; 100 asked)" in eval_table(rows, False, asked=100).caption
    assert "asked" not in eval_table(rows, False, asked=3).caption


def test_compare_shows_no_delta_between_tokenizers_or_window_counts():
    """--compare of a char-level model and SmolLM2 printed Δppl −74.5 % (per-token perplexities under two tokenizers)
    and a caption of the first row's 1000 windows where the second had 655."""
    from rich.console import Console

    from llmcomp.cli.render import eval_table

    row = {"name": "a", "stages": "original", "ppl": 10.0, "bits_per_weight": 16.0, "eval_time_s": 1.0,
           "text": "austen", "windows": 1000, "seq_len": 256, "tokenizer": "t1"}
    rows = [row, {**row, "name": "b", "ppl": 11.0}, {**row, "name": "c", "tokenizer": "t2"},
            {**row, "name": "d", "windows": 655}]
    console = Console(width=200, record=True)
    console.print(eval_table(rows, True, asked=1000))
    lines = {line.split()[1]: line for line in console.export_text().splitlines() if line.split()[1:2] in
             (["a"], ["b"], ["c"], ["d"])}
    assert "+10.0" in lines["b"] and "+0.0" in lines["a"]
    assert "+0.0" not in lines["c"] and "+0.0" not in lines["d"]
    caption = eval_table(rows, True, asked=1000).caption
    assert "1000 / 655 windows (all the held-out text holds; 1000 asked)" in caption and "do not compare" in caption
    assert "do not compare" not in eval_table(rows[:2], True).caption


def test_progress_without_a_terminal_prints_lines_while_it_runs(capsys, monkeypatch):
    """Piped or logged (no terminal), rich would draw the bars only at the end: a long job would print
    nothing for minutes. Plain lines instead: while a task runs, and once when it is done."""
    import time

    from llmcomp.cli.render import RichProgress

    monkeypatch.setattr(RichProgress, "interval", 0.05)
    with RichProgress() as progress:
        assert progress.plain
        for _ in progress.track(range(2), "Quantizing layers"):
            time.sleep(0.2)  # a slow item: the ticker reports it before it ends
        progress.note("a note")
    lines = capsys.readouterr().err.splitlines()
    assert any(line.startswith("Quantizing layers 0/2 … ") and line.endswith("so far") for line in lines), lines
    assert lines[-2].startswith("Quantizing layers 2/2 in 0:00:0") and lines[-1] == "a note", lines
    with pytest.raises(KeyboardInterrupt), RichProgress() as progress:  # a task left early says so
        for i in progress.track(range(5), "Calibrating layers"):
            if i == 2:
                raise KeyboardInterrupt
    assert capsys.readouterr().err.splitlines()[-1].startswith("Calibrating layers stopped at 2/5 after 0:00:0")


@pytest.mark.parametrize("args,flag", [
    (["--method", "vptq", "--bits", "2", "--group-size", "32"], "--group-size"),
    (["--method", "pvq", "--bits", "2", "--sym"], "--sym"),
    (["--method", "fp4", "--format", "fp4", "--sym"], "--sym"),
    (["--method", "gptq", "--rounds", "3"], "--rounds"),
    (["--damp", "0.1"], "--damp"),
    (["--no-act-order"], "--act-order"),
    (["--candidates", "2,4"], "--candidates"),
    (["--method", "vptq", "--bits", "2.25", "--sensitivity", "output"], "--sensitivity"),
    (["--bits", "2.5", "--no-act-order"], "--act-order"),  # rtn with allocation has no solver either
    (["--bits", "2.5", "--damp", "0.3"], "--damp"),  # (only --sensitivity output dampens)
], ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_flags_the_method_does_not_read_are_refused(tiny_model_dir, tmp_path, args, flag):
    """These were accepted and silently dropped (a vptq artifact said g0 after --group-size 32)."""
    line = one_error_line(invoke("quantize", tiny_model_dir, "-o", tmp_path / "o", *args))
    assert line.startswith(f"error: {flag}") and "does not apply here" in line, line
    assert not (tmp_path / "o").exists()


def test_flags_read_by_allocation_are_accepted(monkeypatch, tiny_model_dir, tmp_path):
    from llmcomp import api

    seen = []
    monkeypatch.setattr(api, "quantize", lambda config, *a, **k: seen.append((config, k["allocation"])) or tmp_path)
    r = invoke("quantize", tiny_model_dir, "-o", tmp_path / "o", "--bits", "2.5", "--sensitivity", "output",
               "--damp", "0.3", "--candidates", "2,4")
    assert r.exit_code == 0, r.output
    assert seen[0][1].damp == 0.3 and seen[0][1].candidates == (2, 4)


def test_ignore_adds_to_the_default_lm_head():
    """typer replaces a list default: `--ignore down_proj` quantized lm_head (a tied model's embeddings)."""
    from llmcomp.cli.app import ignore_patterns

    assert ignore_patterns(None) == ("lm_head",)
    assert ignore_patterns(["down_proj"]) == ("lm_head", "down_proj")
    assert ignore_patterns(["lm_head", "mlp"]) == ("lm_head", "mlp")
    assert ignore_patterns([""]) == ()
    assert ignore_patterns(["", "down_proj"]) == ("down_proj",)


def test_import_is_light_and_names_load_on_use():
    """`import llmcomp` pulled in torch and transformers (~3 s), and an interrupt then was a traceback."""
    import subprocess
    import sys

    import llmcomp

    code = ("import sys, llmcomp; light = 'torch' not in sys.modules; "
            "from llmcomp import load, PRESETS; print(light, callable(load), 'w4g128' in PRESETS, 'load' in dir(llmcomp), "
            "'rtn' in llmcomp.quant.METHODS, llmcomp.errors.UserError is llmcomp.UserError)")  # (subpackages too)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["True"] * 6
    names = ("CSKVConfig", "ExpertPruneConfig", "DynamicSkipConfig", "MoefyConfig", "LinearizeConfig", "Uniform")
    code = f"from llmcomp.core.config import CONFIGS; print(*(CONFIGS.get(n).__name__ for n in {names!r}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)  # (core alone: load_all)
    assert out.stdout.split() == list(names), out.stderr[-2000:]
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        llmcomp.nope  # noqa: B018


@pytest.fixture(autouse=True)
def sigterm_restored(monkeypatch):
    """``main`` installs a SIGTERM handler; the test process gets its own back, and each test a fresh record of
    SIGTERMs received."""
    import signal

    from llmcomp import cli

    monkeypatch.setattr(cli, "TERMINATED", [])
    before = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, before)


def test_sigterm_removes_the_write_in_progress_and_exits_143(tmp_path, capsys):
    """SIGTERM (timeout, docker stop, a cancelled CI job) ended the process where it was: the write's full-size
    hidden temporary folder stayed. It is now an interrupt there: the folder goes, one line, exit 143."""
    import os
    import signal

    import typer

    from llmcomp import cli
    from llmcomp.cli import app as app_mod
    from llmcomp.core.paths import atomic_dir

    def job():
        with atomic_dir(tmp_path / "out") as tmp:
            (tmp / "model.safetensors").write_bytes(b"x" * 1000)
            os.kill(os.getpid(), signal.SIGTERM)

    signal.signal(signal.SIGTERM, cli._terminate)  # (as main does)
    with pytest.raises(typer.Exit) as exc:
        app_mod.run(job)
    assert exc.value.exit_code == 143
    assert list(tmp_path.iterdir()) == []
    assert "terminated; nothing was written at the destination." in " ".join(capsys.readouterr().err.split())


def test_an_interrupt_after_the_output_was_published_says_it_is_complete(tmp_path, capsys):
    """Ctrl-C while a command re-read what it had published (prune experts, linearize, moefy hashed the artifact again
    for their summary line) said "nothing was written at the destination" beside a complete artifact."""
    import typer

    from llmcomp.cli import app as app_mod
    from llmcomp.core.paths import atomic_dir

    def job():
        with atomic_dir(tmp_path / "out") as tmp:
            (tmp / "model.safetensors").write_bytes(b"x" * 1000)
        raise KeyboardInterrupt

    with pytest.raises(typer.Exit) as exc:
        app_mod.run(job)
    assert exc.value.exit_code == 130 and (tmp_path / "out" / "model.safetensors").exists()
    said = "".join(capsys.readouterr().err.split())  # (rich may wrap the long path anywhere)
    assert "".join(f"interrupted; {tmp_path / 'out'} had been written in full.".split()) in said


    def convert_then_stop():  # (a cache entry, such as the bundled model's converted copy, is no output)
        with atomic_dir(tmp_path / "cache", output=False) as tmp:
            (tmp / "config.json").write_text("{}")
        raise KeyboardInterrupt

    with pytest.raises(typer.Exit):
        app_mod.run(convert_then_stop)
    assert "interrupted; nothing was written at the destination." in " ".join(capsys.readouterr().err.split())


@pytest.mark.parametrize("where", ["typer took it", "building the command tree"])
def test_sigterm_before_the_work_exits_143(monkeypatch, capsys, where):
    """SIGTERM while a command imports torch (typer takes the interrupt: exit 130) or while typer builds the
    command tree (a traceback) exited 130 or 1, not 143."""
    import os
    import signal
    import sys
    import types

    from llmcomp import cli
    from llmcomp.cli import render

    def command():
        os.kill(os.getpid(), signal.SIGTERM)  # (the handler raises Terminated here)

    def typer_took_it():
        try:
            command()
        except KeyboardInterrupt:
            raise SystemExit(130) from None

    monkeypatch.setattr(signal, "getsignal", lambda s: signal.SIG_DFL)  # (pytest's own handler aside)
    monkeypatch.setattr(render, "ERRORS_SHOWN", [])
    monkeypatch.setattr(cli, "MAIN", [])  # (else the later in-process commands would ignore Ctrl-C: `finished`)
    app = typer_took_it if where == "typer took it" else command
    monkeypatch.setitem(sys.modules, "llmcomp.cli.app", types.SimpleNamespace(app=app))
    with pytest.raises(SystemExit) as exc:
        cli.main()
    assert exc.value.code == 143
    assert " ".join(capsys.readouterr().err.split()) == "error: terminated."


def test_interrupt_while_the_command_line_loads(monkeypatch, capsys):
    import sys
    import types

    from llmcomp.cli import main

    class Loading(types.ModuleType):
        def __getattr__(self, name):
            raise KeyboardInterrupt

    monkeypatch.setitem(sys.modules, "llmcomp.cli.app", Loading("llmcomp.cli.app"))
    monkeypatch.setattr("llmcomp.cli.MAIN", [])
    with pytest.raises(SystemExit) as exc:
        main()
    assert exc.value.code == 130
    assert capsys.readouterr().err == "error: interrupted.\n"


def test_interrupt_typer_took_silently_is_one_line(monkeypatch, capsys):
    """An interrupt while a command imports torch (before app.run) left typer's silent exit 130."""
    import sys
    import types

    from llmcomp.cli import main, render

    def interrupted():
        raise SystemExit(130)

    monkeypatch.setitem(sys.modules, "llmcomp.cli.app", types.SimpleNamespace(app=interrupted))
    monkeypatch.setattr(render, "ERRORS_SHOWN", [])
    monkeypatch.setattr("llmcomp.cli.MAIN", [])
    with pytest.raises(SystemExit) as exc:
        main()
    assert exc.value.code == 130
    assert " ".join(capsys.readouterr().err.split()) == "error: interrupted."


@pytest.mark.parametrize("ending", ["run returned", "exit 0", "exit 2"])
def test_a_finished_command_ignores_an_interrupt_while_the_interpreter_tears_down(monkeypatch, ending):
    """Ctrl-C in the ~1 s after `wrote ...`, while the interpreter freed the model, killed the process by SIGINT
    with no message (exit -2) though the command had succeeded. In-process callers (tests, libraries) keep theirs."""
    import signal
    import sys
    import types

    from llmcomp import cli
    from llmcomp.cli import app as app_mod

    before, term = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(cli, "MAIN", [])
    monkeypatch.setattr(signal, "getsignal", lambda s, real=signal.getsignal: (  # (pytest's own handler aside)
        signal.SIG_DFL if s == signal.SIGTERM and real(s) is term else real(s)))
    try:
        app_mod.run(lambda: None)
        assert signal.getsignal(signal.SIGINT) is before  # (not the llmcomp process: untouched)

        def command():
            if ending == "run returned":
                return app_mod.run(lambda: None)
            raise SystemExit(0 if ending == "exit 0" else 2)

        monkeypatch.setitem(sys.modules, "llmcomp.cli.app", types.SimpleNamespace(app=command))
        try:
            cli.main()
        except SystemExit as exc:
            assert exc.code == (0 if ending == "exit 0" else 2)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # (not Terminated raised in the teardown)
    finally:
        signal.signal(signal.SIGINT, before)
        signal.signal(signal.SIGTERM, term)


def test_version_names_llmcomp_and_its_main_dependencies():
    from importlib.metadata import version

    import llmcomp

    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"llmcomp {llmcomp.__version__} (torch {version('torch')}, transformers ")


def test_the_cli_modules_are_pyflakes_clean():
    """bench kernels probed for triton with a bare import, which pyflakes reads as an unused name."""
    import io
    from pathlib import Path

    import llmcomp.cli

    flakes = pytest.importorskip("pyflakes.api")
    from pyflakes.reporter import Reporter

    said = io.StringIO()
    assert flakes.checkRecursive([str(Path(llmcomp.cli.__file__).parent)], Reporter(said, said)) == 0, said.getvalue()


def test_bench_kernels_without_triton_is_one_line(monkeypatch):
    import sys

    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "triton", None)  # (its import raises ImportError)
    assert "install triton" in one_error_line(invoke("bench", "kernels", "--shapes", "64x128", "--ms", "1"))

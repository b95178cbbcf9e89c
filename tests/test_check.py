import json

import pytest
from typer.testing import CliRunner

from llmcomp import api
from llmcomp import check as chk
from llmcomp.cli.app import app
from llmcomp.errors import UserError

runner = CliRunner()
SETTINGS = {"windows": 2, "seq_len": 64}


def fake_evaluate(values):
    def evaluate(path, **kwargs):
        return dict(values)

    return evaluate


def fake_artifact(tmp_path):
    """A directory that passes the path checks (the faked ``evaluate`` never opens it)."""
    art = tmp_path / "art"
    art.mkdir()
    (art / "config.json").write_text("{}")
    (art / "model.safetensors").touch()  # (eval's check that a folder holds weights lists them, reads none)
    return str(art)


def test_one_percent_ppl_regression_fails():
    base = chk.make_baseline({"ppl": 24.0, "bits_per_weight": 4.27, "size_mb": 170.0}, SETTINGS)
    same = chk.compare(base, {"ppl": 24.0, "bits_per_weight": 4.27, "size_mb": 170.0})
    assert all(o.passed for o in same)
    worse = chk.compare(base, {"ppl": 24.0 * 1.01, "bits_per_weight": 4.27, "size_mb": 170.0})
    assert [o.metric for o in worse if not o.passed] == ["ppl"]
    better = chk.compare(base, {"ppl": 23.0, "bits_per_weight": 4.0, "size_mb": 160.0})
    assert all(o.passed for o in better)


def test_higher_is_better_direction():
    base = {"llmcomp_check": 1, "settings": SETTINGS,
            "metrics": {"top1": {"value": 0.9, "better": "higher", "tolerance_rel": 0.01}}}
    assert not chk.compare(base, {"top1": 0.88})[0].passed
    assert chk.compare(base, {"top1": 0.895})[0].passed


def test_bad_baselines(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        chk.read_baseline(tmp_path / "none.json")
    (tmp_path / "b.json").write_text("{")
    with pytest.raises(UserError, match="not valid JSON"):
        chk.read_baseline(tmp_path / "b.json")
    (tmp_path / "b.json").write_text('{"llmcomp_check": 1, "metrics": {"ppl": {"value": "x", "better": "lower"}}}')
    with pytest.raises(UserError, match="numeric value"):
        chk.read_baseline(tmp_path / "b.json")


def test_cli_update_pass_fail_and_reports(tmp_path, monkeypatch):
    values = {"ppl": 24.0, "bits_per_weight": 4.27, "size_mb": 170.0}
    monkeypatch.setattr(api, "evaluate", fake_evaluate(values))
    b = tmp_path / "base.json"
    art = fake_artifact(tmp_path)
    r = runner.invoke(app, ["check", art, "--baseline", str(b), "--update", "--windows", "2"])
    assert r.exit_code == 0, r.output
    assert json.loads(b.read_text())["settings"]["windows"] == 2
    r = runner.invoke(app, ["check", art, "--baseline", str(b), "--junit", str(tmp_path / "j.xml")])
    assert r.exit_code == 0, r.output
    assert 'failures="0"' in (tmp_path / "j.xml").read_text()
    monkeypatch.setattr(api, "evaluate", fake_evaluate({**values, "ppl": 24.0 * 1.01}))
    r = runner.invoke(app, ["check", art, "--baseline", str(b), "--json", str(tmp_path / "r.json"),
                            "--junit", str(tmp_path / "j.xml")])
    assert r.exit_code == 1, r.output
    assert "FAIL" in r.output
    assert json.loads((tmp_path / "r.json").read_text())["passed"] is False
    assert 'failures="1"' in (tmp_path / "j.xml").read_text()


def test_cli_missing_baseline(tmp_path):
    r = runner.invoke(app, ["check", fake_artifact(tmp_path), "--baseline", str(tmp_path / "nope.json")])
    assert r.exit_code == 2 and "nope.json does not exist" in r.output


def test_cli_missing_artifact_is_reported_before_the_baseline(tmp_path):
    r = runner.invoke(app, ["check", str(tmp_path / "gone"), "--baseline", str(tmp_path / "nope.json")])
    assert r.exit_code == 2 and "gone does not exist" in r.output and "nope.json" not in r.output, r.output


@pytest.mark.slow
def test_real_regression_caught(bundled_dir, tmp_path):
    """A baseline from a W8 artifact; an artifact with a few layers at W3 per-channel must fail on ppl."""
    from llmcomp.formats import Uniform
    from llmcomp.quant import RTNConfig

    good = api.quantize(RTNConfig(format=Uniform(bits=8, group_size=0, symmetric=True)), tmp_path / "good",
                        str(bundled_dir))
    bad_first = api.quantize(RTNConfig(format=Uniform(bits=3, group_size=0), targets=(r"re:.*layers\.(3|4)\.mlp\..*",)),
                             tmp_path / "bad1", str(bundled_dir))
    bad = api.quantize(RTNConfig(format=Uniform(bits=8, group_size=0, symmetric=True)), tmp_path / "bad",
                       str(bad_first))
    b = tmp_path / "baseline.json"
    args = ["--baseline", str(b)]
    assert runner.invoke(app, ["check", str(good), *args, "--update", "--windows", "4"]).exit_code == 0
    assert runner.invoke(app, ["check", str(good), *args]).exit_code == 0
    r = runner.invoke(app, ["check", str(bad), *args, "--json", str(tmp_path / "r.json")])
    assert r.exit_code == 1, r.output
    failed = {m["metric"] for m in json.loads((tmp_path / "r.json").read_text())["metrics"] if not m["passed"]}
    assert "ppl" in failed


def test_a_zero_baseline_still_catches_a_regression():
    """change_rel was 0 against a baseline of 0, so any growth passed."""
    assert not chk.Outcome("size_mb", 0.0, 0.44, 0.0, "lower").passed
    assert chk.Outcome("size_mb", 0.0, 0.0, 0.0, "lower").passed
    assert chk.Outcome("top1", 0.0, 0.5, 0.0, "higher").passed


def test_a_baseline_checking_nothing_refused(tmp_path):
    (tmp_path / "b.json").write_text('{"llmcomp_check": 1, "metrics": {}}')
    with pytest.raises(UserError, match="non-empty"):
        chk.read_baseline(tmp_path / "b.json")


def test_junit_xml_parses_with_quotes_in_the_path():
    from xml.dom import minidom

    xml = chk.junit_xml([chk.Outcome('p"p<&', 1.0, 2.0, 0.0, "lower")], 'art "x" & <y>', 1.0)
    suite = minidom.parseString(xml).documentElement
    assert suite.getAttribute("name") == 'llmcomp check art "x" & <y>'
    assert suite.getElementsByTagName("failure")[0].getAttribute("message").startswith('p"p<& regressed')


def test_json_report_from_a_zero_baseline_is_strict_json(tmp_path, monkeypatch):
    monkeypatch.setattr(api, "evaluate", fake_evaluate({"ppl": 24.0, "bits_per_weight": 4.27, "size_mb": 0.5}))
    b = tmp_path / "base.json"
    b.write_text(json.dumps({"llmcomp_check": 1, "settings": SETTINGS, "metrics": {
        "size_mb": {"value": 0.0, "better": "lower", "tolerance_rel": 0.0}}}))
    r = runner.invoke(app, ["check", fake_artifact(tmp_path), "--baseline", str(b), "--json", str(tmp_path / "r.json")])
    assert r.exit_code == 1, r.output
    report = json.loads((tmp_path / "r.json").read_text(), parse_constant=lambda c: pytest.fail(f"non-JSON {c}"))
    assert report["metrics"][0]["change_rel"] is None and report["passed"] is False


def test_a_nan_measurement_fails_against_a_baseline_of_zero():
    """Its change from 0 took NaN's sign bit (+inf or -inf): with better=higher, or a negative NaN with lower, it
    passed."""
    import math

    for better, current in (("higher", math.nan), ("lower", -math.nan), ("lower", math.nan)):
        assert not chk.Outcome("m", 0.0, current, 0.005, better).passed
    assert chk.Outcome("m", 0.0, 0.0, 0.005, "lower").passed


def test_a_baseline_of_nan_refused():
    with pytest.raises(UserError, match="finite"):
        chk.make_baseline({"ppl": float("nan"), "bits_per_weight": 4.0, "size_mb": 1.0}, SETTINGS)


def test_eval_json_of_a_nan_model_is_strict_json(tmp_path, monkeypatch):
    """eval --json (and --record, and eval --long --json) wrote bare NaN for a NaN model's rows."""
    from llmcomp.core.config import dumps

    row = {"path": "art", "name": "art", "stages": "original", "ppl": float("nan"), "nll": float("inf"),
           "bits_per_weight": 4.27, "size_mb": 0.5, "eval_time_s": 1.0, "text": "t", "windows": 1, "seq_len": 16,
           "passkey": {"64": float("nan")}}
    monkeypatch.setattr(api, "evaluate", fake_evaluate(row))
    r = runner.invoke(app, ["eval", fake_artifact(tmp_path), "--json", str(tmp_path / "r.json")])
    assert r.exit_code == 0, r.output
    rows = json.loads((tmp_path / "r.json").read_text(), parse_constant=lambda c: pytest.fail(f"non-JSON {c}"))
    assert rows[0]["ppl"] is None and rows[0]["nll"] is None and rows[0]["bits_per_weight"] == 4.27
    assert json.loads(dumps([row]))[0]["passkey"] == {"64": None}  # nested values too


def test_a_baseline_records_its_text_and_another_text_is_refused(tmp_path, monkeypatch):
    """LLMCOMP_TEXT=pydoc (or auto's fallback where the Austen package cannot be fetched) passed against an Austen
    baseline: -4.8 % ppl, "3 passed"."""
    values = {"ppl": 24.0, "bits_per_weight": 4.27, "size_mb": 170.0, "text": "austen"}
    base = chk.make_baseline(chk.measure(fake_evaluate(values), "a", SETTINGS), SETTINGS)
    assert base["settings"]["text"] == "austen"
    assert all(o.passed for o in chk.compare(base, chk.measure(fake_evaluate(values), "a", SETTINGS)))
    with pytest.raises(UserError, match="measured on the austen text, this run's is on the pydoc text"):
        chk.compare(base, chk.measure(fake_evaluate({**values, "text": "pydoc"}), "a", SETTINGS))
    del base["settings"]["text"]  # (a baseline written before it recorded its text: not checked)
    chk.compare(base, chk.measure(fake_evaluate({**values, "text": "pydoc"}), "a", SETTINGS))


@pytest.mark.parametrize("field,value,message", [
    ("value", "NaN", "'ppl' needs a finite numeric value"), ("value", "Infinity", "'ppl' needs a finite numeric"),
    ("tolerance_rel", "NaN", "give a number ≥ 0"), ("value", "1" + "0" * 400, "'ppl' needs a finite numeric value"),
    ("tolerance_rel", "1" + "0" * 400, "give a number ≥ 0"),
    ("value", "1" * 5000, "holds an integer too long to read")])
def test_a_non_finite_baseline_is_bad_input_not_a_regression(tmp_path, field, value, message):
    """It exited 1 (a regression) with a nan row; a 401-digit integer gave an OverflowError traceback, a
    5000-digit one a ValueError."""
    base = chk.make_baseline({"ppl": 24.0}, SETTINGS)
    text = json.dumps(base).replace(f'"{field}": {base["metrics"]["ppl"][field]}', f'"{field}": {value}')
    assert value in text
    (tmp_path / "b.json").write_text(text)
    with pytest.raises(UserError, match=message):
        chk.read_baseline(tmp_path / "b.json")


def test_a_metric_check_does_not_measure_is_refused_before_the_evaluation(tmp_path):
    base = chk.make_baseline({"ppl": 24.0}, SETTINGS)
    base["metrics"]["perplexity"] = base["metrics"].pop("ppl")
    (tmp_path / "b.json").write_text(json.dumps(base))
    with pytest.raises(UserError, match="'perplexity' is not measured by this llmcomp"):
        chk.read_baseline(tmp_path / "b.json")


def test_junit_xml_parses_with_control_characters_in_the_path():
    from xml.dom import minidom

    outcomes = chk.compare(chk.make_baseline({"ppl": 24.0}, SETTINGS), {"ppl": 30.0})
    minidom.parseString(chk.junit_xml(outcomes, "out/ctl\x1bx & <y> \udcff", 1.0))


def test_check_flags_that_do_not_apply_are_refused(tmp_path):
    """--update wrote neither --json nor --junit (exit 0); --windows / --seq-len were ignored by a check."""
    art = fake_artifact(tmp_path)
    for args, needle in ((["--update", "--json", str(tmp_path / "r.json")], "--json applies to a check"),
                         (["--baseline", str(tmp_path / "b.json"), "--windows", "4"], "--windows applies with --update")):
        r = runner.invoke(app, ["check", art, *args])
        assert r.exit_code == 2 and needle in r.output, r.output


def test_a_baselines_window_past_the_context_and_reports_on_one_path_are_named(tmp_path, monkeypatch):
    """A baseline's seq_len past the model's context asked for a shorter --seq-len, which a check refuses; --junit
    and --json on one path said the first "would overwrite ..., which this command reads"."""
    values = {"ppl": 24.0, "bits_per_weight": 4.27, "size_mb": 170.0}
    monkeypatch.setattr(api, "evaluate", fake_evaluate(values))
    art = fake_artifact(tmp_path)
    (tmp_path / "art" / "config.json").write_text(json.dumps({"model_type": "llama", "max_position_embeddings": 256}))
    b = tmp_path / "base.json"
    assert runner.invoke(app, ["check", art, "--baseline", str(b), "--update", "--seq-len", "64"]).exit_code == 0
    r = runner.invoke(app, ["check", art, "--baseline", str(b), "--junit", str(tmp_path / "x"), "--json",
                            str(tmp_path / "x")])
    assert r.exit_code == 2 and "--junit" in r.output and "is where --json writes too" in r.output, r.output
    b.write_text(json.dumps({**json.loads(b.read_text()), "settings": {"windows": 8, "seq_len": 512}}))
    r = runner.invoke(app, ["check", art, "--baseline", str(b)])
    said = " ".join(r.output.split())
    assert r.exit_code == 2 and "measures windows of 512 tokens (its settings.seq_len), longer than the model's " \
        "context (256 tokens); write it again with --update --seq-len N" in said, r.output


def test_update_keeps_hand_edited_tolerances(tmp_path, monkeypatch):
    """--update rewrote every tolerance to its default, losing the ones edited by hand (the file says to edit them)."""
    values = {"ppl": 24.0, "bits_per_weight": 4.27, "size_mb": 170.0}
    monkeypatch.setattr(api, "evaluate", fake_evaluate(values))
    b, art = tmp_path / "base.json", fake_artifact(tmp_path)
    assert runner.invoke(app, ["check", art, "--baseline", str(b), "--update", "--windows", "2"]).exit_code == 0
    data = json.loads(b.read_text())
    default = data["metrics"]["ppl"]["tolerance_rel"]
    data["metrics"]["ppl"]["tolerance_rel"] = 0.05
    del data["metrics"]["size_mb"]  # a metric the old baseline lacks takes the default
    b.write_text(json.dumps(data))
    monkeypatch.setattr(api, "evaluate", fake_evaluate({**values, "ppl": 25.0}))
    r = runner.invoke(app, ["check", art, "--baseline", str(b), "--update"])
    assert r.exit_code == 0 and "Keeping the tolerances" in " ".join(r.output.split()), r.output
    metrics = json.loads(b.read_text())["metrics"]
    assert json.loads(b.read_text())["settings"]["windows"] == 2  # (and its settings: 8 windows before)
    assert metrics["ppl"] == {"value": 25.0, "better": "lower", "tolerance_rel": 0.05}
    assert metrics["size_mb"]["tolerance_rel"] == chk.TRACKED["size_mb"][1] and default != 0.05
    b.write_text('{"llmcomp_check": 1, "metrics": []}')  # a damaged baseline is replaced, with a word
    r = runner.invoke(app, ["check", art, "--baseline", str(b), "--update", "--windows", "2"])
    said = " ".join(r.output.split())  # (the console wraps long paths)
    assert r.exit_code == 0 and "metrics must be a non-empty object" in said and "Replacing it" in said, r.output
    assert json.loads(b.read_text())["metrics"]["ppl"]["tolerance_rel"] == default


@pytest.mark.parametrize("text", ['{"name": "mypkg", "version": "1.0"}', "{not json", "[1, 2]"])
def test_update_replaces_only_a_baseline(tmp_path, monkeypatch, text):
    """A mistyped --baseline (package.json, a results file) was replaced by a baseline, exit 0."""
    monkeypatch.setattr(api, "evaluate", fake_evaluate({"ppl": 24.0, "bits_per_weight": 4.27, "size_mb": 170.0}))
    b, art = tmp_path / "other.json", fake_artifact(tmp_path)
    b.write_text(text)
    r = runner.invoke(app, ["check", art, "--baseline", str(b), "--update"])
    assert r.exit_code != 0 and "--update replaces only a baseline" in " ".join(r.output.split()), r.output
    assert b.read_text() == text


def test_reports_are_written_into_a_pipe_not_over_it(tmp_path, monkeypatch):
    """--json /dev/stdout (or a FIFO, /dev/null) was replaced by a regular file renamed onto it: as root /dev/stdout
    and /dev/null became files."""
    import os
    import stat
    import threading

    monkeypatch.setattr(api, "evaluate", fake_evaluate({"ppl": 24.0, "bits_per_weight": 4.27, "size_mb": 170.0}))
    art, b, fifo = fake_artifact(tmp_path), tmp_path / "base.json", tmp_path / "pipe"
    assert runner.invoke(app, ["check", art, "--baseline", str(b), "--update", "--windows", "2"]).exit_code == 0
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_text()), daemon=True)
    reader.start()
    r = runner.invoke(app, ["check", art, "--baseline", str(b), "--json", str(fifo)])
    reader.join(timeout=10)
    assert r.exit_code == 0, r.output
    assert stat.S_ISFIFO(os.stat(fifo).st_mode) and json.loads(got[0])["passed"] is True
    out, link = tmp_path / "out.txt", tmp_path / "stdout"  # /dev/stdout where the shell sent stdout to a file
    out.write_text("table\n")
    with open(out, "a") as fh:
        link.symlink_to(f"/proc/self/fd/{fh.fileno()}")
        r = runner.invoke(app, ["check", art, "--baseline", str(b), "--junit", str(link)])
    assert r.exit_code == 0, r.output
    assert link.is_symlink() and out.read_text().startswith("table\n<?xml")


def test_a_report_on_a_socket_is_refused_before_the_work(tmp_path, monkeypatch):
    """--json SOCKET was taken as a device or a pipe is, and its write failed after the evaluation ('No such device or
    address': open() cannot write a socket)."""
    import socket

    calls = []
    measured = fake_evaluate({"ppl": 24.0, "bits_per_weight": 4.27, "size_mb": 170.0})
    monkeypatch.setattr(api, "evaluate", lambda *a, **kw: calls.append(a) or measured(*a, **kw))
    art, b = fake_artifact(tmp_path), tmp_path / "base.json"
    assert runner.invoke(app, ["check", art, "--baseline", str(b), "--update", "--windows", "2"]).exit_code == 0
    monkeypatch.chdir(tmp_path)  # (a relative name: a socket's path is at most 107 bytes)
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind("s")
        r = runner.invoke(app, ["check", art, "--baseline", str(b), "--json", "s"])
    assert r.exit_code == 2 and "--json s cannot be written: it is a socket" in r.output, r.output
    assert "Traceback" not in r.output and len(calls) == 1


_SOCKET_STDOUT = """
from llmcomp.core.paths import unwritable, write_report
assert unwritable("/dev/stdout") == ""
write_report("/dev/stdout", "report\\n")
"""


def test_a_report_on_stdout_that_is_a_socket_is_written():
    """A command's stdout may be a socket (a service manager's log): /dev/stdout is written through stdout there."""
    import socket
    import subprocess
    import sys

    ours, theirs = socket.socketpair()
    with ours, theirs:
        r = subprocess.run([sys.executable, "-c", _SOCKET_STDOUT], stdout=theirs, stderr=subprocess.PIPE, text=True,
                           timeout=60)
        assert r.returncode == 0, r.stderr[-2000:]
        assert ours.recv(100) == b"report\n"


_STDOUT_REPORT = """
import sys
from llmcomp.core.paths import write_json, write_report
print("table", flush=True)
write_report("/dev/stdout", '{"passed": true}\\n')
print("note: wrote")
write_json(sys.argv[1], {"rows": [1]}, partial=True)  # (a named pipe without a reader: an open would block)
"""


def test_a_report_on_stdout_redirected_to_a_file_survives_later_output(tmp_path):
    """`--json /dev/stdout > out.txt`: the report went through a descriptor of its own, whose offset the shell's `>`
    file did not share, so what the command printed after it overwrote the report ('table', 'note: wrote',
    'cument...'); and a bench's intermediate write to a named pipe reopened it, blocking once its reader had gone."""
    import os
    import subprocess
    import sys

    fifo, out = tmp_path / "pipe", tmp_path / "out.txt"
    os.mkfifo(fifo)
    with open(out, "w") as fh:
        r = subprocess.run([sys.executable, "-c", _STDOUT_REPORT, str(fifo)], stdout=fh, stderr=subprocess.PIPE,
                           text=True, timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]
    assert out.read_text() == 'table\n{"passed": true}\nnote: wrote\n'

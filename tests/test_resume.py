"""A killed calibrated ``quantize`` (SIGKILL, a real kill of the process) restarted with the same command
resumes from its last finished layer and writes the same weights, byte for byte, as an uninterrupted run."""
import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

pytestmark = pytest.mark.slow  # four short subprocesses (~40 s on 2 cores)


@pytest.fixture(scope="module")
def char_model(tmp_path_factory):
    """The tiny random Llama with a character-level tokenizer, so calibration runs on the real text."""
    from tests.conftest import save_char_model

    return save_char_model(tmp_path_factory.mktemp("cm") / "tiny", layers=3)


def _quantize(model, out, kill_at=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("LLMCOMP_TEST_KILL_AT", None)
    if kill_at:
        env["LLMCOMP_TEST_KILL_AT"] = kill_at
    cmd = [sys.executable, "-m", "llmcomp", "quantize", str(model), "-o", str(out), "--method", "gptq",
           "--bits", "3", "--group-size", "32", "--calib-samples", "8", "--seq-len", "64", "--device", "cpu"]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def _weights(path):
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def test_kill_and_resume_is_byte_identical(char_model, tmp_path):
    clean = tmp_path / "clean"
    r = _quantize(char_model, clean)
    assert r.returncode == 0, r.stderr
    assert not (tmp_path / ".clean.resume").exists()  # removed once the artifact is complete
    reference = (clean / "model.safetensors").read_bytes()

    out = tmp_path / "killed"
    resume_dir = tmp_path / ".killed.resume"
    # killed after layer 0 is saved, then after layer 1's file is written but before it is renamed into
    # place (that layer is redone), then after the last layer, before the artifact is written
    for point, finished in [("after-layer-0", 1), ("before-rename-1", 1), ("after-layer-2", 3)]:
        r = _quantize(char_model, out, kill_at=point)
        assert r.returncode == -signal.SIGKILL, (point, r.returncode, r.stderr[-500:])
        assert not out.exists()  # nothing at the destination until the artifact is complete
        assert len(list(resume_dir.glob("layer-*.safetensors"))) == finished, point
    import json

    earlier = json.loads((resume_dir / "elapsed.json").read_text())["seconds"]  # the killed runs' time, kept
    r = _quantize(f"{char_model.parent}/./{char_model.name}", out)  # the model spelled otherwise: the same job
    assert r.returncode == 0, r.stderr
    assert "Resuming: 3 finished layer(s)" in r.stdout + r.stderr
    assert (out / "model.safetensors").read_bytes() == reference
    assert not resume_dir.exists()
    stage = json.loads((out / "llmcomp.json").read_text())["stages"][-1]
    assert stage["wall_time_s"] >= earlier > 0  # (it showed the last run's seconds alone)


def test_other_job_discards_stale_checkpoint(tmp_path):
    from llmcomp.core.resume import Checkpoint

    d = tmp_path / ".o.resume"
    cp = Checkpoint(d, "a")
    save_file({"w": torch.zeros(1)}, str(d / "layer-0000.safetensors"))
    assert Checkpoint(d, "a").has(0)
    notes = []
    assert not Checkpoint(d, "b", notes.append).has(0)
    assert "different job" in notes[0]
    cp.finish()
    assert not d.exists()


def test_state_with_its_own_key_is_dropped_alone_when_that_key_changes(tmp_path):
    """State that depends on settings the directory's key leaves out (linearize's fine-tune) carries them: another
    value drops that file and keeps the rest of the job's work."""
    from llmcomp.core.resume import Checkpoint, save_state

    d = tmp_path / ".o.resume"
    cp = Checkpoint(d, "a")
    save_state({"w": torch.zeros(1)}, d / "layer-0000.safetensors", {})
    save_state({"w": torch.ones(1)}, d / "tuned.safetensors", {"step": "3"}, key="lr=1")
    save_state({"w": torch.ones(1)}, d / "unkeyed.safetensors", {})
    assert not cp.drop_stale("tuned.safetensors", "lr=1") and not cp.drop_stale("absent.safetensors", "lr=1")
    assert cp.drop_stale("tuned.safetensors", "lr=2") and cp.drop_stale("unkeyed.safetensors", "lr=1")
    assert sorted(p.name for p in d.glob("*.safetensors")) == ["layer-0000.safetensors"]


def test_rewound_time_leaves_out_the_seconds_of_dropped_work(tmp_path, monkeypatch):
    """A linearize rerun that dropped the interrupted fine-tune counted its seconds in the artifact's wall time."""
    from llmcomp.core import resume

    clock = [100.0]
    monkeypatch.setattr(resume.time, "perf_counter", lambda: clock[0])
    d = tmp_path / ".o.resume"
    cp = resume.Checkpoint(d, "a")
    clock[0] += 30  # the transfer
    cp.mark_time()
    cp.mark_time("transfer.json")
    clock[0] += 50  # a fine-tune, interrupted
    cp.mark_time()
    again = resume.Checkpoint(d, "a")
    assert again.earlier_s == 80
    again.rewind_time("transfer.json")
    assert again.earlier_s == 30
    again.rewind_time("absent.json")
    assert again.earlier_s == 30


def test_a_stale_resume_folder_behind_a_link_is_discarded(tmp_path):
    """rmtree(ignore_errors=True) kept a linked folder, and the next job resumed the other job's layers."""
    from llmcomp.core.resume import Checkpoint

    store = tmp_path / "store" / ".o.resume"
    Checkpoint(store, "a")
    save_file({"w": torch.zeros(1)}, str(store / "layer-0000.safetensors"))
    d = tmp_path / ".o.resume"
    d.symlink_to(store)
    assert not Checkpoint(d, "b").has(0) and not d.is_symlink()


def test_damaged_resume_files_are_computed_again(tmp_path):
    """A half-written layer file (a crash) failed every rerun with a safetensors traceback."""
    from llmcomp.core.resume import Checkpoint

    d = tmp_path / ".o.resume"
    Checkpoint(d, "a")
    for i in range(3):
        save_file({"w": torch.zeros(1)}, str(d / f"layer-{i:04d}.safetensors"))
    (d / "layer-0001.safetensors").write_bytes(b"x" * 100)
    (d / "finetune.safetensors").write_bytes(b"")
    notes = []
    cp = Checkpoint(d, "a", notes.append)
    assert [cp.has(i) for i in range(3)] == [True, False, False]  # (the resumed layers stay a prefix)
    assert not (d / "finetune.safetensors").exists() and "3 damaged resume file(s)" in notes[0]


def test_a_second_job_on_the_same_output_is_refused(tmp_path):
    """Two processes writing one output shared its resume directory: the second discarded the first's layers,
    the first then saved into the second's, and the artifact mixed both jobs' layers. Now the second stops."""
    from llmcomp.core.resume import Checkpoint
    from llmcomp.errors import UserError

    d = tmp_path / ".o.resume"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from llmcomp.core.resume import Checkpoint; "
        f"c = Checkpoint(__import__('pathlib').Path({str(d)!r}), 'a'); print('held', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(UserError, match="Another llmcomp job is writing"):
            Checkpoint(d, "b")
        assert d.exists()  # the other job's directory is left alone
    finally:
        holder.kill()
        holder.wait()
    cp = Checkpoint(d, "b")  # the holder is gone (its lock went with it)
    failed = Checkpoint(d, "b")  # one process may open it again (a job after a failed one still referenced)
    cp.finish()
    assert (tmp_path / ".o.resume.lock").exists()  # still held (by ``failed``): other processes still wait
    probe = subprocess.run([sys.executable, "-c", (
        "from pathlib import Path; from llmcomp.core.resume import Checkpoint; "
        f"Checkpoint(Path({str(d)!r}), 'c')")], capture_output=True, text=True)
    assert "Another llmcomp job is writing" in probe.stderr, probe.stderr[-300:]
    failed.finish()
    assert not d.exists() and not (tmp_path / ".o.resume.lock").exists()


def test_checkpoint_in_a_folder_that_does_not_exist_yet(tmp_path):
    from llmcomp.core.resume import for_output

    cp = for_output(tmp_path / "runs" / "new" / "q", "a")
    assert (tmp_path / "runs" / "new" / ".q.resume").is_dir()
    cp.finish()
    assert list((tmp_path / "runs" / "new").iterdir()) == []


@pytest.mark.parametrize("code", ["ENOSYS", "EBADF"])
def test_a_filesystem_without_flock_runs_unlocked(tmp_path, monkeypatch, code):
    """(Lustre without -o flock, some network mounts): the job runs as before, no fd left open. EBADF: NFS emulates
    flock by POSIX locks, which a directory (open for reading) cannot take — every artifact write failed there."""
    import errno
    import fcntl

    from llmcomp.core import paths

    def no_flock(fd, op):
        raise OSError(getattr(errno, code), code)

    monkeypatch.setattr(fcntl, "flock", no_flock)
    fds = len(os.listdir("/proc/self/fd"))
    for _ in range(3):
        with paths.locked(tmp_path / "l", busy="busy", remove=True):
            pass
        with paths.atomic_dir(tmp_path / "out", overwrite=True) as tmp:
            (tmp / "a").write_text("1")
    assert len(os.listdir("/proc/self/fd")) == fds and (tmp_path / "out" / "a").read_text() == "1"


def test_the_job_key_sees_the_config_the_calibration_and_the_device():
    """A resumed run reused layers calibrated under another model config (and would under another tokenizer or
    device); and a sample of 64 elements a tensor missed edits of a few rows."""
    import torch

    from llmcomp.api import _job_key
    from tests.conftest import tiny_llama

    net = tiny_llama()
    ids = torch.arange(12).reshape(2, 6)
    base = _job_key(net, ids, "cpu")
    assert _job_key(net, ids, "cpu") == base
    assert _job_key(net, ids + 1, "cpu")["calibration_ids"] != base["calibration_ids"]
    assert _job_key(net, ids, "cuda:0")["device"] == "cuda" != base["device"]
    net.config.max_position_embeddings += 1
    assert _job_key(net, ids, "cpu")["model_config"] != base["model_config"]
    with torch.no_grad():
        net.model.embed_tokens.weight[3, 1] += 1e-3
    assert _job_key(net, ids, "cpu")["weights"] != base["weights"]


def test_the_job_key_sees_an_installed_dynamic_skip_threshold():
    """The threshold an input artifact's prune-dynamic stage installs changes the routing the calibration sees,
    and is neither in the weights nor in the config: an input re-made with another --rate resumed stale layers."""
    import torch

    from llmcomp.api import _job_key
    from llmcomp.prune import moe
    from tests.test_experts import tiny_moe

    net = tiny_moe("mixtral")
    ids = torch.arange(12).reshape(2, 6)
    plain = _job_key(net, ids, "cpu")
    moe.install_skip(net, 0.3)
    low = _job_key(net, ids, "cpu")
    moe.install_skip(net, 0.5)
    assert len({str(plain), str(low), str(_job_key(net, ids, "cpu"))}) == 3
    moe.remove_skip(net)
    assert _job_key(net, ids, "cpu") == plain


def test_the_fingerprint_covers_the_code(monkeypatch):
    """A resume after a code change mixed two versions' layers (__version__ stays 0.1.0 between commits)."""
    from llmcomp.core import resume

    before = resume.fingerprint(method="gptq")
    monkeypatch.setattr(resume, "_source_digest", lambda: "another commit")
    assert resume.fingerprint(method="gptq") != before


def test_any_job_on_an_output_another_job_writes_stops_at_once(char_model, tmp_path):
    """Only calibrated jobs took the output's lock: an RTN quantize wrote over a running GPTQ job's output, which
    failed after all its layers. Every writer holds it now."""
    from llmcomp import api
    from llmcomp.errors import UserError
    from llmcomp.formats import Uniform
    from llmcomp.prune.kv.kivi import KIVIConfig
    from llmcomp.quant import RTNConfig

    d = tmp_path / ".o.resume"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from llmcomp.core.resume import Checkpoint; from pathlib import Path; "
        f"c = Checkpoint(Path({str(d)!r}), 'a', output=Path({str(tmp_path / 'o')!r})); print('held', flush=True); "
        "time.sleep(60)")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        for call in (lambda: api.quantize(RTNConfig(format=Uniform(4, 32)), tmp_path / "o", str(char_model)),
                     lambda: api.prune_kv(KIVIConfig(bits=4, group=16), tmp_path / "o", str(char_model))):
            with pytest.raises(UserError, match="Another llmcomp job is writing .*o "):
                call()
        assert not (tmp_path / "o").exists()
    finally:
        holder.kill()
        holder.wait()
    api.quantize(RTNConfig(format=Uniform(4, 32)), tmp_path / "o", str(char_model))
    assert sorted(p.name for p in tmp_path.iterdir()) == [".o.resume", "o"]  # (the lock file went with the job)


def test_an_interrupted_job_names_the_work_it_kept(char_model, tmp_path, monkeypatch):
    """Ctrl-C said only "interrupted; nothing was written": the finished layers waited in a hidden folder for
    good, unnamed."""
    from typer.testing import CliRunner

    from llmcomp.cli.app import app
    from llmcomp.core import resume

    def interrupt(tag):
        if tag == "after-layer-0":
            raise KeyboardInterrupt

    monkeypatch.setattr(resume, "_kill_point", interrupt)
    r = CliRunner().invoke(app, ["quantize", str(char_model), "-o", str(tmp_path / "g"), "--method", "gptq",
                                 "--bits", "3", "--group-size", "32", "--calib-samples", "8", "--seq-len", "64",
                                 "--device", "cpu"])
    assert r.exit_code == 130
    assert "the work done so far is kept in" in r.output and ".g.resume" in r.output, r.output


def test_a_job_on_a_new_folders_output_is_locked_and_leaves_no_folder_when_it_fails(char_model, tmp_path,
                                                                                     monkeypatch):
    """The lock was skipped where the output's folder did not exist yet: two jobs on runs/new/x both ran to the
    end. A job that fails leaves no folder it made."""
    from llmcomp import api
    from llmcomp.errors import UserError
    from llmcomp.formats import Uniform
    from llmcomp.quant import RTNConfig

    seen, real = [], api.open_model

    def spying(*a, **k):
        seen.append((tmp_path / "new" / "sub" / ".o.resume.lock").exists())
        return real(*a, **k)

    monkeypatch.setattr(api, "open_model", spying)
    api.quantize(RTNConfig(format=Uniform(4, 32)), tmp_path / "new" / "sub" / "o", str(char_model))
    assert seen == [True] and sorted(p.name for p in (tmp_path / "new" / "sub").iterdir()) == ["o"]
    with pytest.raises(UserError, match="does not exist"):
        api.quantize(RTNConfig(format=Uniform(4, 32)), tmp_path / "new2" / "sub" / "o", str(tmp_path / "nope"))
    assert not (tmp_path / "new2").exists()


def test_a_cpu_job_resumed_under_another_thread_count_says_so(tmp_path):
    """GPTQ's CPU sums round differently under another thread count: a resume mixed the two silently, though the
    README promises an uninterrupted run's bytes."""
    import json

    from safetensors.torch import save_file

    from llmcomp.core import resume

    out = tmp_path / "o"
    first = resume.for_output(out, "k", device="cpu")
    save_file({"w": torch.zeros(1)}, str(first.dir / "layer-0000.safetensors"))
    first._lock.close()
    stamp = first.dir / resume.FINGERPRINT_FILE
    assert json.loads(stamp.read_text())["threads"] == torch.get_num_threads()
    stamp.write_text(json.dumps({"fingerprint": "k", "threads": torch.get_num_threads() + 1}))
    said = []
    second = resume.for_output(out, "k", said.append, device="cpu")
    assert second.resumed == ["layer-0000"]
    assert any(f"ran under {torch.get_num_threads() + 1} CPU threads and this run has" in s for s in said), said
    second._lock.close()
    said.clear()
    resume.for_output(out, "k", said.append, device="cuda")._lock.close()  # (GPU sums: no CPU threads involved)
    assert not any("CPU threads" in s for s in said), said

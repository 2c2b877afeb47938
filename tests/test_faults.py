"""Fault injection (issue 17): kill -9 at random points and inside file writes, a full disk, a
read-only folder, damaged files — the final state must equal an uninterrupted run's, bit for bit,
with no stray files.

Runs are forked from this process (imports done once), killed with SIGKILL, and run again on the
same folder until one finishes. The fast subset runs in CI; ``-m slow`` adds many random kills of
probe training and of a whole ``report --fast``. ``FAULT_COUNTS`` collects what happened; the
slow report test prints it (the numbers in docs/reliability.md come from such a run).
"""

from __future__ import annotations

import errno
import hashlib
import json
import multiprocessing
import os
import random
import shutil
import subprocess
import sys
import time
import warnings
from collections import Counter
from pathlib import Path

import pytest
import torch

import fault_driver
from mv_interp.probes.train import CHECKPOINT, LOG, truncate_log
from mv_interp.report.steps import Steps

FAULT_COUNTS: Counter = Counter()
ROOT = str(Path(__file__).resolve().parents[1])
_FORK = multiprocessing.get_context("fork")
# files whose content holds timings or dates; they are compared without them (or not at all: the
# page and its summary, the manifest, and rerun recordings, which carry a fresh recording id and times)
_TIMED = {"report.html", "summary.json", "manifest.json"}
_TIMED_SUFFIXES = {".rrd"}
_TIMING_KEYS = {"seconds", "time_s", "data_stall_s", "created", "finished"}


def _untimed(obj):
    if isinstance(obj, dict):
        return {k: _untimed(v) for k, v in obj.items() if k not in _TIMING_KEYS}
    if isinstance(obj, list):
        return [_untimed(v) for v in obj]
    return obj


def _child(what: str, out: str, env: dict[str, str], steps: int) -> None:
    os.environ.update(env)
    fault_driver._install_faults()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if what == "probes":
            fault_driver.probes(out, steps)
        else:
            fault_driver.report(out)
    os._exit(0)  # skip pytest's atexit machinery in the child


STEPS = 6  # probe steps of a run (a checkpoint every 2)


def _start(what: str, out: Path, env: dict[str, str] | None = None, steps: int = STEPS):
    p = _FORK.Process(target=_child, args=(what, str(out), env or {}, steps))
    p.start()
    return p


def run_to_completion(what: str, out: Path, events: list = (), steps: int = STEPS) -> dict[str, int]:
    """Run ``what`` in ``out`` once per event, then to the end; returns what happened.

    An event is a delay in seconds (SIGKILL then, if the run is still going) or a fault dict for the
    environment (``{"MV_FAULT_KILL": "checkpoint.pt:2"}``: killed inside that write, if the run
    still makes it). Each run resumes from what the previous one left."""
    counts = Counter(kills=0, kills_in_writes=0, runs=0)
    for event in events:
        env = event if isinstance(event, dict) else {}
        p = _start(what, out, env, steps)
        p.join(900 if env else event)
        if p.exitcode is None:
            p.kill()
            p.join()
        if p.exitcode == -9:
            counts["kills"] += 1
            counts["kills_in_writes"] += bool(env)
        else:
            assert p.exitcode == 0, f"run exited with {p.exitcode}"
        counts["runs"] += 1
    p = _start(what, out, steps=steps)
    p.join(900)
    assert p.exitcode == 0, f"the last run failed (exit code {p.exitcode})"
    counts["runs"] += 1
    counts["resumes"] = counts["runs"] - 1
    return dict(counts)


def snapshot(out: Path) -> dict[str, str]:
    """``{relative path: sha256}`` of every file, with timings stripped where files hold them."""
    result = {}
    for p in sorted(out.rglob("*")):
        if not p.is_file():
            continue
        rel = p.relative_to(out).as_posix()
        if p.name in _TIMED or p.suffix in _TIMED_SUFFIXES:
            result[rel] = "(timed)"
            continue
        data = p.read_bytes()
        if p.suffix == ".json":
            data = json.dumps(_untimed(json.loads(data)), sort_keys=True).encode()
        if p.suffix == ".pt":  # torch.save writes a fresh serialization id into every file: compare the contents
            data = _contents(torch.load(p, map_location="cpu", weights_only=True)).encode()
        if p.name == LOG:
            lines = [json.loads(line) for line in data.decode().splitlines()]
            data = json.dumps([_untimed(d) for d in lines]).encode()
        result[rel] = hashlib.sha256(data).hexdigest()
    return result


def _contents(obj) -> str:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().reshape(-1).contiguous()
        return f"T{t.dtype}{list(t.shape)}:" + hashlib.sha256(t.view(torch.uint8).numpy().tobytes()
                                                              if t.numel() else b"").hexdigest()
    if isinstance(obj, dict):
        return "{" + ",".join(f"{k!r}:{_contents(v)}" for k, v in obj.items()) + "}"
    if isinstance(obj, (list, tuple)):
        return "[" + ",".join(_contents(v) for v in obj) + "]"
    return repr(obj)


def stray(out: Path) -> list[str]:
    return [p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file() and p.name.endswith(".tmp")]


def _compare(ref: dict[str, str], got: dict[str, str]) -> None:
    assert set(got) == set(ref), f"files differ: extra {sorted(set(got) - set(ref))}, missing {sorted(set(ref) - set(got))}"
    different = sorted(k for k in ref if ref[k] != got[k])
    assert not different, f"not bit-identical to the uninterrupted run: {different}"


@pytest.fixture(scope="module")
def probes_reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "probes"
    t0 = time.perf_counter()
    run_to_completion("probes", out)
    return snapshot(out), time.perf_counter() - t0


# --------------------------------------------------------------------------------------
# fast subset (CI)
# --------------------------------------------------------------------------------------

def test_probe_training_killed_inside_checkpoint_writes_and_at_random(tmp_path, probes_reference):
    ref, seconds = probes_reference
    out = tmp_path / "probes"
    rng = random.Random(17)
    counts = run_to_completion("probes", out, [{"MV_FAULT_KILL": "checkpoint.pt:2"}, rng.uniform(0.05, 0.3) * seconds,
                                               {"MV_FAULT_KILL": "probes.safetensors:1"}])
    assert counts["kills_in_writes"] >= 1 and counts["kills"] >= 2, counts
    assert stray(out) == []
    _compare(ref, snapshot(out))
    FAULT_COUNTS.update(counts, identical=1)


def test_full_disk_during_a_checkpoint_then_a_rerun(tmp_path, probes_reference):
    ref, _ = probes_reference
    out = tmp_path / "probes"
    p = _start("probes", out, {"MV_FAULT_ENOSPC": "checkpoint.pt:2"})
    p.join(600)
    assert p.exitcode not in (0, None)  # the error ended the run
    assert stray(out) == []  # the failed write removed its temporary file
    log_steps = [json.loads(line)["step"] for line in (out / LOG).read_text().splitlines()]
    assert log_steps == list(range(1, 5))  # flushed before the checkpoint that failed
    run_to_completion("probes", out)
    _compare(ref, snapshot(out))  # no duplicated log lines
    FAULT_COUNTS.update(full_disk=1, identical=1)


def test_enospc_from_torch_save_is_reported_as_a_full_disk(tmp_path, monkeypatch):
    from mv_interp.errors import describe_os_error
    from mv_interp.loading import atomic_write

    def torch_full_disk(path):
        raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 64 vs 0")

    monkeypatch.setattr(os, "statvfs", lambda p: os.statvfs_result((4096, 4096, 100, 0, 0, 100, 0, 0, 0, 255)))
    with pytest.raises(OSError) as info:
        atomic_write(tmp_path / "checkpoint.pt", torch_full_disk)
    assert info.value.errno == errno.ENOSPC and "checkpoint.pt" in describe_os_error(info.value)
    assert "No space left on device" in describe_os_error(info.value) and "(ENOSPC)" in describe_os_error(info.value)
    assert stray(tmp_path) == []


def _small_tmpfs(path: Path, size: str, ro: bool = False) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    opts = f"size={size}" + (",ro" if ro else "")
    return subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True).returncode == 0


def test_a_really_full_disk(tmp_path):
    """On a full 64 KiB tmpfs (where mounting is allowed): the report's --out probe fails at once, with the path."""
    mnt = tmp_path / "small"
    if not _small_tmpfs(mnt, "64k"):
        pytest.skip("cannot mount a small tmpfs here (needs root); the patched-writer tests cover ENOSPC")
    try:
        fd = os.open(mnt / "filler", os.O_WRONLY | os.O_CREAT)
        try:  # fill it
            while os.write(fd, b"\0" * 4096):
                pass
        except OSError:
            pass
        finally:
            os.close(fd)
        r = subprocess.run([sys.executable, "-m", "mv_interp.cli", "report", "--fast", "--out", str(mnt / "out")],
                           capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ROOT})
        assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
        assert "No space left on device (ENOSPC)" in r.stderr and str(mnt / "out") in r.stderr
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


def test_a_read_only_folder(tmp_path):
    mnt = tmp_path / "ro"
    if not _small_tmpfs(mnt, "64k", ro=True):
        if os.geteuid() == 0:
            pytest.skip("cannot mount a read-only tmpfs, and root writes through chmod 555")
        mnt.mkdir(exist_ok=True)
        mnt.chmod(0o555)
    try:
        r = subprocess.run([sys.executable, "-m", "mv_interp.cli", "probes", "train", "--out", str(mnt / "run")],
                           capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ROOT})
        assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
        assert str(mnt / "run") in r.stderr and ("Read-only file system (EROFS)" in r.stderr
                                                  or "Permission denied (EACCES)" in r.stderr)
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)
        mnt.chmod(0o755)


def test_log_is_cut_back_to_the_checkpoint(tmp_path):
    log = tmp_path / LOG
    lines = [json.dumps({"step": s, "loss": 1.0}) for s in (1, 2, 3, 4, 3, 4, 5, 6)]
    log.write_text("\n".join(lines) + "\n" + '{"step": 7, "lo')  # duplicated steps and a half-written line
    truncate_log(log, 4)
    assert [json.loads(x)["step"] for x in log.read_text().splitlines()] == [1, 2, 3, 4]
    truncate_log(log, 0)
    assert not log.exists()


def test_damaged_checkpoint_is_retrained_with_a_message(tmp_path, probes_reference):
    ref, _ = probes_reference
    out = tmp_path / "probes"
    run_to_completion("probes", out, steps=4)  # a finished 4-step run: its checkpoint is at step 4
    data = (out / CHECKPOINT).read_bytes()
    (out / CHECKPOINT).write_bytes(data[: len(data) // 3])  # truncated by something else
    with pytest.warns(RuntimeWarning, match=r"checkpoint\.pt is damaged .*training these probes again from step 0"):
        fault_driver.probes(str(out), STEPS)
    _compare(ref, snapshot(out))


def test_damaged_step_file_is_recomputed_never_reused(tmp_path):
    logs: list[str] = []
    calls = Counter()

    def compute():
        calls["n"] += 1
        path = tmp_path / "eval" / "metrics.json"
        path.parent.mkdir(exist_ok=True)
        path.write_text(json.dumps({"rows": [1, 2, 3], "run": calls["n"]}))
        return [path], {}

    Steps(tmp_path, log=logs.append).run("evaluate", {"a": 1}, compute)
    Steps(tmp_path, log=logs.append).run("evaluate", {"a": 1}, compute)
    assert calls["n"] == 1 and "reused" in logs[-1]
    metrics = tmp_path / "eval" / "metrics.json"
    metrics.write_text(metrics.read_text()[:10])  # truncated externally
    Steps(tmp_path, log=logs.append).run("evaluate", {"a": 1}, compute)
    assert calls["n"] == 2
    assert any("metrics.json is damaged or was changed since the step wrote it (checksum differs); recomputing" in s
               for s in logs), logs
    assert json.loads(metrics.read_text())["run"] == 2


def test_stale_temporary_files_are_removed_on_start(tmp_path):
    (tmp_path / "heads").mkdir()
    stale = [tmp_path / "heads" / ".heatmap_self.png.k2j3x_9q.tmp", tmp_path / ".manifest.json.abcd1234.tmp"]
    for p in stale:
        p.write_bytes(b"half")
    keep = [tmp_path / "heads" / "heatmap_self.png", tmp_path / ".my_notes.tmp"]  # not an atomic write's name
    for p in keep:
        p.write_bytes(b"keep")
    logs: list[str] = []
    Steps(tmp_path, log=logs.append)
    assert not any(p.exists() for p in stale) and all(p.exists() for p in keep)
    assert logs == ["removed 2 temporary file(s) left by an interrupted run"]


# --------------------------------------------------------------------------------------
# full suite (-m slow)
# --------------------------------------------------------------------------------------

def _kills_then_random(what: str, tmp_path: Path, ref: dict[str, str], writes: list[dict], delays: list[float]) -> None:
    """Kills inside the given writes (in the order the run makes them; each must land) in one
    folder, random kills in another; both end bit-identical to the uninterrupted run."""
    for name, events in (("writes", writes), ("random", delays)):
        out = tmp_path / name
        counts = run_to_completion(what, out, events)
        if name == "writes":
            assert counts["kills_in_writes"] == len(writes), counts
        assert stray(out) == []
        _compare(ref, snapshot(out))
        FAULT_COUNTS.update(counts, identical=1)


@pytest.mark.slow
def test_probe_training_many_random_kills(tmp_path, probes_reference):
    ref, seconds = probes_reference
    rng = random.Random(1717)
    writes = [{"MV_FAULT_KILL": "checkpoint.pt:1"}, {"MV_FAULT_KILL": "checkpoint.pt:2"},
              {"MV_FAULT_KILL": "probes.safetensors:1"}, {"MV_FAULT_KILL": "probes.json:1"}]
    _kills_then_random("probes", tmp_path, ref, writes, [rng.uniform(0.05, 0.3) * seconds for _ in range(9)])


@pytest.fixture(scope="module")
def report_reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "report"
    t0 = time.perf_counter()
    run_to_completion("report", out)
    return snapshot(out), time.perf_counter() - t0


@pytest.mark.slow
def test_report_killed_at_random_points_and_inside_checkpoint_and_figure_writes(tmp_path, report_reference):
    ref, seconds = report_reference
    rng = random.Random(170)
    # in the order the report makes them: each run resumes after the previous one's kill
    writes = [{"MV_FAULT_KILL": "checkpoint.pt:2"}, {"MV_FAULT_KILL": "metrics.json:1"}, {"MV_FAULT_KILL": "heatmap_:1"},
              {"MV_FAULT_KILL": ".png:3"}, {"MV_FAULT_KILL": "manifest.json:2"}]
    _kills_then_random("report", tmp_path, ref, writes, [rng.uniform(0.05, 0.3) * seconds for _ in range(8)])
    FAULT_COUNTS.update(stray_files=len(stray(tmp_path / "writes")) + len(stray(tmp_path / "random")))
    print("\nfault-injection counts:", dict(FAULT_COUNTS))
    if os.environ.get("FAULT_COUNTS_FILE"):  # docs/reliability.md's numbers
        Path(os.environ["FAULT_COUNTS_FILE"]).write_text(json.dumps(dict(FAULT_COUNTS), indent=1) + "\n")

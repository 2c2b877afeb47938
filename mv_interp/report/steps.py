"""Resumable steps: each step of a report writes its files atomically, then its entry in ``manifest.json``.

A step's *key* is a digest of everything its result depends on (the model's weights, the data,
the step's settings and the runs of the steps it reads). A later run with the same key finds the
step done and reuses its files; a different key — or ``force`` — recomputes it. Each computation
gets a fresh *run id*, and a step's key includes the run ids of the steps it reads, so
recomputing a step recomputes everything downstream of it. A step interrupted before its entry
was written simply runs again (probe training resumes from its own checkpoint). The entry holds
each file's SHA-256: a file damaged or changed since (a truncated ``metrics.json``) makes the
step run again, with a message, instead of being reused.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..loading import atomic_write, remove_stale_tmp

MANIFEST = "manifest.json"
FORMAT = "mv_interp.report/1"


def file_digest(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes (hex)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def digest(obj: Any) -> str:
    """A short stable digest of JSON-able data."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class StepRecord:
    """One step's entry in the manifest."""

    name: str
    key: str
    run_id: str
    seconds: float
    finished: str
    files: list[str] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    reused: bool = False
    """Set at load time for this process: the files come from an earlier run."""
    sha256: dict[str, str] = field(default_factory=dict)
    """Each file's SHA-256 when the step finished."""

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "run_id": self.run_id, "seconds": round(self.seconds, 3), "finished": self.finished,
                "files": self.files, "info": self.info, "sha256": self.sha256}


class Manifest:
    """The record of finished steps in an output folder (``manifest.json``, rewritten atomically)."""

    def __init__(self, out: str | os.PathLike):
        self.out = Path(out)
        self.path = self.out / MANIFEST
        self.steps: dict[str, StepRecord] = {}
        self.meta: dict[str, Any] = {}
        self.problem = ""  # why done() last refused a finished step
        if self.path.is_file():
            try:
                data = json.loads(self.path.read_text())
            except json.JSONDecodeError:
                data = {}  # a manifest is only ever replaced whole; an unreadable one means start afresh
            if data.get("format") == FORMAT:
                self.meta = data.get("meta", {})
                for name, d in data.get("steps", {}).items():
                    self.steps[name] = StepRecord(name, d["key"], d["run_id"], float(d["seconds"]), d["finished"],
                                                  list(d.get("files", [])), dict(d.get("info", {})), reused=True,
                                                  sha256=dict(d.get("sha256", {})))

    def done(self, name: str, key: str) -> StepRecord | None:
        """The step's record if it finished with this key and its files are all still there, intact."""
        self.problem = ""
        rec = self.steps.get(name)
        if rec is None or rec.key != key:
            return None
        for f in rec.files:
            path = self.out / f
            if not path.exists():
                self.problem = f"{path} is missing"
                return None
            if path.is_file() and f in rec.sha256 and file_digest(path) != rec.sha256[f]:
                self.problem = f"{path} is damaged or was changed since the step wrote it (checksum differs)"
                return None
            if path.is_file() and f not in rec.sha256 and path.suffix == ".json":  # entries of older versions
                try:
                    json.loads(path.read_text())
                except (json.JSONDecodeError, UnicodeDecodeError):
                    self.problem = f"{path} is not valid JSON (truncated?)"
                    return None
        return rec

    def record(self, rec: StepRecord) -> None:
        self.steps[rec.name] = rec
        self.save()

    def save(self) -> None:
        data = {"format": FORMAT, "meta": self.meta, "steps": {n: r.to_dict() for n, r in self.steps.items()}}
        text = json.dumps(data, indent=1, default=str)
        atomic_write(self.path, lambda p: Path(p).write_text(text))


class Steps:
    """Runs named steps once, reusing finished ones.

    >>> steps = Steps("mv_interp_out", force=False)
    >>> rec = steps.run("heads", {"pairs": 64}, compute, reads=["data"])   # compute() -> (files, info)
    """

    def __init__(self, out: str | os.PathLike, force: bool | Iterable[str] = False, log: Callable[[str], None] = print,
                 total: int | None = None):
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        stale = remove_stale_tmp(self.out)
        if stale:
            log(f"removed {len(stale)} temporary file(s) left by an interrupted run")
        self.manifest = Manifest(self.out)
        self.force_all = force is True
        self.force = set() if isinstance(force, bool) else set(force)
        self.log = log
        self.total = total
        self.count = 0
        self.records: dict[str, StepRecord] = {}

    def key(self, name: str, settings: Mapping[str, Any], reads: Iterable[str] = ()) -> str:
        upstream = {r: self.records[r].run_id for r in reads if r in self.records}
        return digest({"step": name, "settings": settings, "upstream": upstream})

    def run(self, name: str, settings: Mapping[str, Any], compute: Callable[[], tuple[list[str], dict[str, Any]]],
            reads: Iterable[str] = (), title: str = "") -> StepRecord:
        """Reuse step ``name`` if it is done with the same key, else call ``compute()``.

        ``compute`` returns ``(files, info)``: the files it wrote (relative to the output folder;
        all must exist for the step to count as done later) and JSON-able facts for the report.
        """
        self.count += 1
        head = f"[{self.count}/{self.total}] " if self.total else ""
        key = self.key(name, settings, reads)
        rec = None if (self.force_all or name in self.force) else self.manifest.done(name, key)
        if rec is not None:
            self.log(f"{head}{title or name}: reused (computed in {rec.seconds:.1f} s on {rec.finished[:19]})")
            rec.reused = True
        else:
            why = ""
            old = self.manifest.steps.get(name)
            if self.force_all or name in self.force:
                why = " (forced)"
            elif old is not None and old.key != key:
                why = " (settings, model or an earlier step changed)"
            elif self.manifest.problem:
                why = f" ({self.manifest.problem}; recomputing)"
            self.log(f"{head}{title or name}{why}…")
            t0 = time.perf_counter()
            files, info = compute()
            seconds = time.perf_counter() - t0
            files = [self._rel(f) for f in files]
            sums = {f: file_digest(self.out / f) for f in files if (self.out / f).is_file()}
            rec = StepRecord(name, key, uuid.uuid4().hex[:12], seconds,
                             datetime.now(timezone.utc).isoformat(timespec="seconds"), files, info, sha256=sums)
            self.manifest.record(rec)
            self.log(f"{head}{title or name}: done in {seconds:.1f} s")
        self.records[name] = rec
        return rec

    def _rel(self, f: str | os.PathLike) -> str:
        p = Path(f)
        try:
            return p.resolve().relative_to(self.out.resolve()).as_posix()
        except ValueError:
            return p.as_posix()

"""Resumable steps of the report: :class:`~mv_interp.resume.Steps`, with checksummed files.

The machinery lives in :mod:`mv_interp.resume`, shared with probe training, head scoring and
model training; this module keeps the report's historical import path and adds the report's
crash consistency on top of it. A step's *key* is a digest of everything its result depends on
(the model's weights, the data, the step's settings and the runs of the steps it reads). A later
run with the same key finds the step done and reuses its files; a different key — or ``force`` —
recomputes it. Each computation gets a fresh *run id*, and a step's key includes the run ids of
the steps it reads, so recomputing a step recomputes everything downstream of it. A step
interrupted before its entry was written simply runs again (probe training resumes from its own
checkpoint). The entry holds each file's SHA-256: a file damaged or changed since (a truncated
``metrics.json``) makes the step run again, with a message, instead of being reused. Temporary
files of writes a kill interrupted are removed when the steps start.
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

from .. import resume as _resume
from ..io import remove_stale_tmp
from ..resume import FORMAT, MANIFEST, digest

__all__ = ["FORMAT", "MANIFEST", "Manifest", "StepRecord", "Steps", "digest", "file_digest"]


def file_digest(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes (hex)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass
class StepRecord(_resume.StepRecord):
    """One step's entry in the manifest, with its files' checksums."""

    sha256: dict[str, str] = field(default_factory=dict)
    """Each file's SHA-256 when the step finished."""

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "sha256": self.sha256}


class Manifest(_resume.Manifest):
    """The record of finished steps (``manifest.json``, rewritten atomically); a step counts as
    done only while its files are there and unchanged (their SHA-256 as recorded)."""

    def __init__(self, out: str | os.PathLike):
        super().__init__(out)
        self.problem = ""  # why done() last refused a finished step
        sums: dict[str, Any] = {}
        if self.steps:
            try:
                sums = {n: d.get("sha256", {}) for n, d in json.loads(self.path.read_text()).get("steps", {}).items()}
            except (OSError, ValueError, AttributeError):
                sums = {}
        self.steps = {n: StepRecord(r.name, r.key, r.run_id, r.seconds, r.finished, r.files, r.info, r.reused,
                                    sha256=dict(sums.get(n) or {}))
                      for n, r in self.steps.items()}

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
            sha = getattr(rec, "sha256", {})
            if path.is_file() and f in sha and file_digest(path) != sha[f]:
                self.problem = f"{path} is damaged or was changed since the step wrote it (checksum differs)"
                return None
            if path.is_file() and f not in sha and path.suffix == ".json":  # entries of older versions
                try:
                    json.loads(path.read_text())
                except (json.JSONDecodeError, UnicodeDecodeError):
                    self.problem = f"{path} is not valid JSON (truncated?)"
                    return None
        return rec


class Steps(_resume.Steps):
    """Runs named steps once, reusing finished ones whose files are intact.

    >>> steps = Steps("mv_interp_out", force=False)
    >>> rec = steps.run("heads", {"pairs": 64}, compute, reads=["data"])   # compute() -> (files, info)
    """

    def __init__(self, out: str | os.PathLike, force: bool | Iterable[str] = False, log: Callable[[str], None] = print,
                 total: int | None = None):
        Path(out).mkdir(parents=True, exist_ok=True)
        stale = remove_stale_tmp(out)
        if stale:
            log(f"removed {len(stale)} temporary file(s) left by an interrupted run")
        super().__init__(out, force, log, total)
        self.manifest = Manifest(self.out)

    def run(self, name: str, settings: Mapping[str, Any], compute: Callable[[], tuple[list[str], dict[str, Any]]],
            reads: Iterable[str] = (), title: str = "") -> StepRecord:
        """Reuse step ``name`` if it is done with the same key and intact files, else call ``compute()``.

        ``compute`` returns ``(files, info)``: the files it wrote (relative to the output folder;
        all must exist, unchanged, for the step to count as done later) and JSON-able facts for the report.
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

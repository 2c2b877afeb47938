"""Resuming long jobs: one helper for every package.

Three pieces, from small to large:

* :func:`digest` and :func:`check_identity` — a run's *identity* is a JSON-able dict of
  everything its result depends on (settings, model config and weight fingerprint, data
  description). Resuming with a different identity is an error that names the fields that differ
  and the fix (same settings, or another output directory).
* :class:`StateFile` — one ``torch.save`` file holding a computation's state and its identity,
  written atomically after each unit of work. ``load()`` gives the state back when the identity
  matches. Probe training (``probes/train.py``), head scoring (:func:`~mv_interp.heads.score_heads`
  with ``checkpoint=``, and ``mv-interp heads classify``) resume through it; model training
  (``training/trainer.py``) checks its identity with :func:`check_identity` before resuming from
  its checkpoint directories.
* :class:`Steps` — named steps, each writing its files atomically and then its entry in
  ``manifest.json``. A step's *key* is a digest of its settings and of the runs of the steps it
  reads; a later run with the same key reuses the step's files, a different key (or ``force``)
  recomputes it and everything downstream. The report is a sequence of such steps.

>>> state = StateFile(out / "progress.pt", identity={"config": cfg.to_dict(), "data": desc})
>>> saved = state.load(on_mismatch="restart")     # None: nothing to resume
>>> for i in range(saved["done"] if saved else 0, n): ...; state.save({"done": i + 1, ...})
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
from typing import TYPE_CHECKING, Any, Literal

from .io import atomic_write, remove_stale_tmp, write_text

if TYPE_CHECKING:
    import torch

__all__ = ["digest", "fingerprint", "tensor_digest", "identity_diff", "check_identity", "StateFile", "StepRecord", "Manifest", "Steps",
           "file_digest"]


def digest(obj: Any) -> str:
    """A short stable digest of JSON-able data (keys sorted; other objects by ``str``)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def fingerprint(module: torch.nn.Module) -> str:
    """A short digest of a module's weights (first 4096 values of every parameter, position-weighted):
    tells a run on one backbone from a run on another without hashing gigabytes."""
    import torch

    acc = torch.zeros(2, dtype=torch.float64)
    for i, p in enumerate(module.parameters()):
        flat = p.detach().reshape(-1)[:4096].double().cpu()
        acc[0] += flat.sum() * (i + 1)
        acc[1] += flat.abs().sum() + p.numel()
    return f"{acc[0].item():.9e}/{acc[1].item():.9e}"


def tensor_digest(tensors: Iterable[Any]) -> str:
    """A short digest of some tensors' shapes and contents (sums and a strided sample), e.g. to
    identify the data of a run by its first batch."""
    parts = []
    for t in tensors:
        t = t.detach().float().cpu().flatten()
        sample = t[:: max(1, t.numel() // 256)]
        parts.append([list(t.shape), round(float(t.sum()), 4), round(float(t.abs().sum()), 4),
                      [round(float(x), 4) for x in sample[:256]]])
    return digest(parts)


def identity_diff(saved: Mapping[str, Any], current: Mapping[str, Any], prefix: str = "") -> list[str]:
    """The dotted keys on which two identities differ (nested dicts compared key by key)."""
    out = []
    for k in sorted(set(saved) | set(current), key=str):
        a, b = saved.get(k), current.get(k)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out += identity_diff(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}")
    return out


def check_identity(saved: Mapping[str, Any], current: Mapping[str, Any], where: str | os.PathLike,
                   what: str = "run") -> None:
    """Raise a ``ValueError`` naming the differing fields unless ``saved == current``."""
    if saved != current:
        raise ValueError(f"{where} holds a {what} that differs in {identity_diff(saved, current)}; resume with the "
                         "same settings, or give a new output directory")


def _canonical(identity: Mapping[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(identity, sort_keys=True, default=str))


class StateFile:
    """A computation's resumable state: ``torch.save`` of the state dict plus its identity
    (as a JSON string under ``"identity"``), replaced atomically on every :meth:`save`."""

    def __init__(self, path: str | os.PathLike, identity: Mapping[str, Any], what: str = "run"):
        self.path = Path(path)
        self.identity = _canonical(identity)
        self.what = what

    def load(self, on_mismatch: Literal["error", "restart"] = "error") -> dict[str, Any] | None:
        """The saved state (without ``"identity"``), or ``None`` when there is none — or, with
        ``on_mismatch="restart"``, when it belongs to another run (``"error"``: a ``ValueError``)."""
        if not self.path.is_file():
            return None
        import torch

        state = dict(torch.load(self.path, map_location="cpu", weights_only=True))
        saved = state.pop("identity", None)
        saved = json.loads(saved) if isinstance(saved, str) else saved
        if saved != self.identity:
            if on_mismatch == "restart":
                return None
            check_identity(saved or {}, self.identity, self.path.parent, self.what)
        return state

    def matches(self) -> bool:
        """Whether a state of this identity is saved."""
        return self.load(on_mismatch="restart") is not None

    def save(self, state: Mapping[str, Any]) -> Path:
        """Write ``state`` (tensors, numbers, strings, lists, dicts) with the identity, atomically."""
        import torch

        payload = {**state, "identity": json.dumps(self.identity, sort_keys=True)}
        return atomic_write(self.path, lambda p: torch.save(payload, p))

    def clear(self) -> None:
        """Remove the state file (a finished computation that should not be resumed again)."""
        self.path.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------
# Named steps with a manifest
# --------------------------------------------------------------------------------------

MANIFEST = "manifest.json"
FORMAT = "mv_interp.report/1"


def file_digest(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes (hex)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass
class StepRecord:
    """One step's entry in the manifest, with its files' checksums."""

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
    """The record of finished steps in an output folder (``manifest.json``, rewritten atomically); a
    step counts as done only while its files are there and unchanged (their SHA-256 as recorded)."""

    def __init__(self, out: str | os.PathLike):
        self.out = Path(out)
        self.path = self.out / MANIFEST
        self.steps: dict[str, StepRecord] = {}
        self.meta: dict[str, Any] = {}
        self.problem = ""  # why done() last refused a finished step
        if self.path.is_file():
            try:
                data = json.loads(self.path.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError):
                data = {}  # a manifest is only ever replaced whole; an unreadable one means start afresh
            if isinstance(data, dict) and data.get("format") == FORMAT:
                self.meta = data.get("meta", {})
                for name, d in data.get("steps", {}).items():
                    self.steps[name] = StepRecord(name, d["key"], d["run_id"], float(d["seconds"]), d["finished"],
                                                  list(d.get("files", [])), dict(d.get("info", {})), reused=True,
                                                  sha256=dict(d.get("sha256") or {}))

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
        write_text(self.path, json.dumps(data, indent=1, default=str))


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

    def _rel(self, f: str | os.PathLike) -> str:
        p = Path(f)
        try:
            return p.resolve().relative_to(self.out.resolve()).as_posix()
        except ValueError:
            return p.as_posix()

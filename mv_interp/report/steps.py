"""Resumable steps of the report: :class:`~mv_interp.resume.Steps`, with checksummed files.

The machinery lives in :mod:`mv_interp.resume` (shared with probe training, head scoring and
model training); this module keeps the report's historical import path. A step's *key* is a digest of everything its result depends on
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

from ..resume import FORMAT, MANIFEST, Manifest, StepRecord, Steps, digest, file_digest

__all__ = ["FORMAT", "MANIFEST", "Manifest", "StepRecord", "Steps", "digest", "file_digest"]

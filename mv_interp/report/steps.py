"""Resumable steps of the report: :class:`~mv_interp.resume.Steps` (re-exported here).

The machinery lives in :mod:`mv_interp.resume`, shared with probe training, head scoring and
model training; this module keeps the report's historical import path.
"""

from __future__ import annotations

from ..resume import FORMAT, MANIFEST, Manifest, StepRecord, Steps, digest

__all__ = ["FORMAT", "MANIFEST", "Manifest", "StepRecord", "Steps", "digest"]

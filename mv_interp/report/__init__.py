"""``mv-interp report``: the paper's whole analysis of one model as one self-contained HTML page.

>>> from mv_interp.report import ReportConfig, run_report
>>> files = run_report("dust3r-toy", ReportConfig.preset("fast"), "runs/report")
>>> files["html"]                      # runs/report/report.html (opens from disk, no network)

Steps (each reused on a re-run unless forced; see ``docs/report.md``): probes at every site, the
random-backbone control, their evaluation with the pointmap lens, head scores, the register-token
knockout, activation-patching sweeps and the 4D views of an easy and a hard pair.
"""

from .config import PRESETS, ReportConfig
from .runner import STEP_NAMES, run_report
from .steps import Manifest, Steps

__all__ = ["PRESETS", "STEP_NAMES", "Manifest", "ReportConfig", "Steps", "run_report"]

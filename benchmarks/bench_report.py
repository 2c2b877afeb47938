"""End-to-end time of ``mv-interp report`` per step (target: the default run in about 10 minutes on a
2-core CPU for the bundled dust3r-toy), and of a re-run that reuses every step.

    python benchmarks/bench_report.py                       # default preset, CPU, fresh output folder
    python benchmarks/bench_report.py --preset fast
    python benchmarks/bench_report.py --device cuda --model dust3r-toy
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import markdown_table, record  # noqa: E402

from mv_interp.report import ReportConfig, run_report  # noqa: E402
from mv_interp.report.runner import TITLES  # noqa: E402
from mv_interp.report.steps import Manifest  # noqa: E402

TARGET_S = 600.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="dust3r-toy")
    ap.add_argument("--preset", default="default", choices=["default", "fast"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--no-record", action="store_true", help="print only; leave RESULTS.md alone")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = ReportConfig.preset(args.preset)

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "report"
        t = time.perf_counter()
        files = run_report(args.model, cfg, out, device=args.device, progress=False, log=lambda s: None)
        first = time.perf_counter() - t
        steps = Manifest(out).steps
        size_mb = files["html"].stat().st_size / 1e6
        t = time.perf_counter()
        run_report(args.model, cfg, out, device=args.device, progress=False, log=lambda s: None)
        again = time.perf_counter() - t

    rows = [[name, TITLES.get(name, ""), round(rec.seconds, 1)] for name, rec in steps.items()]
    rows.append(["total", "first run, end to end (load, pairs, every step, page)", round(first, 1)])
    rows.append(["re-run", "same command again: every step reused, page rebuilt", round(again, 1)])
    body = (f"`mv-interp report` on `{args.model}`, preset `{args.preset}` ({cfg.pairs} held-out pairs, "
            f"{cfg.probe_steps} probe steps, {cfg.n_control_steps} control steps, batch {cfg.batch_size}), "
            f"device {args.device}, {torch.get_num_threads()} CPU thread(s); page {size_mb:.1f} MB. "
            f"Target for the default preset on a 2-core CPU: about {TARGET_S / 60:.0f} minutes.\n\n"
            + markdown_table(["step", "what", "seconds"], rows))
    print(body)
    if not args.no_record:
        record(f"Report end to end, preset {args.preset} ({args.device})", body)


if __name__ == "__main__":
    main()

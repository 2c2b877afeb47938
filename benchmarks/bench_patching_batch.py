"""Activation-patching sweeps: one forward per cell vs several cells per forward.

:func:`mv_interp.interventions.patching_sweep` with ``cells_per_forward=K`` runs K cells in one
forward of the corrupted pairs repeated K times, each cell's hooks patching only its copy. Both
ways run here side by side on the same clean/corrupted pairs (the report's: view 1 kept, the other
views from another scene), per site and per head; the table gives each time, the ratio and the
largest difference of the normalised values.

    OMP_NUM_THREADS=2 PYTHONPATH=$PWD python3 benchmarks/bench_patching_batch.py
    python3 benchmarks/bench_patching_batch.py --device cuda
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _results import markdown_table, record  # noqa: E402
from bench_head_intervals import bench_models  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    from mv_interp.data import SceneConfig, render_views
    from mv_interp.interventions import distance_to, patching_sweep

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--pairs", type=int, default=4, help="clean/corrupted pairs per cell (the report's patch_pairs)")
    p.add_argument("--cells", type=int, default=8, help="cells per forward of the batched run")
    p.add_argument("--no-record", action="store_true")
    args = p.parse_args(argv)
    rows = []
    for name, model, n_views in bench_models(args.device):
        H, W = model.module.config.img_size
        v = render_views(args.pairs + 1, SceneConfig(image_size=(H, W), n_views=n_views), seed=3, device=args.device)
        clean = tuple(view["img"][: args.pairs] for view in v)
        corrupted = (clean[0],) + tuple(view["img"][1:] for view in v[1:])
        with torch.no_grad():
            metric = distance_to(model.module.view_outputs(model.module(*clean)), scale_invariant=True)
        for per in ("site", "head"):
            patching_sweep(model, clean, corrupted, per=per, metric=metric, layers=[0])  # warm-up
            t0 = time.perf_counter()
            one = patching_sweep(model, clean, corrupted, per=per, metric=metric)
            t_one = time.perf_counter() - t0
            t0 = time.perf_counter()
            many = patching_sweep(model, clean, corrupted, per=per, metric=metric, cells_per_forward=args.cells)
            t_many = time.perf_counter() - t0
            diff = float((one.values - many.values).abs().nan_to_num(0).max())
            rows.append([name, per, one.extra["n_forwards"], f"{t_one:.2f}", many.extra["n_forwards"], f"{t_many:.2f}",
                         f"{t_one / t_many:.1f}×", f"{diff:.1e}"])
            print(rows[-1], flush=True)
    table = markdown_table(["model", "per", "forwards, 1 cell each", "s", f"forwards, {args.cells} cells each", "s",
                            "speed-up", "max |Δ| values"], rows)
    print(table)
    if not args.no_record:
        record(f"Patching sweeps, cells per forward ({args.device})",
               f"Both ways side by side in one run, {args.pairs} clean/corrupted pairs per cell (view 1 kept, the "
               "other views from another scene), the scale-invariant pointmap distance to the clean run.\n\n" + table)


if __name__ == "__main__":
    main()

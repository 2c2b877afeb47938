"""Attribution patching vs activation patching on ``dust3r-toy`` (CPU): agreement and cost.

Clean pairs are synthetic scenes; the corrupted pair keeps view 1 and takes view 2 from
another scene (as the report's patching step does). For each granularity (per site, per head,
per position) it runs :func:`patching_sweep` (one forward per cell) and
:func:`attribution_patching` (two forwards and one backward), then reports the Spearman rank
correlation and Pearson correlation of the normalised values over the cells, and both wall
times. ``--figure PATH`` writes the scatter plot used in ``docs/interventions.md``.

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD python3 benchmarks/bench_attribution.py \
        --figure docs/images/attribution_patching.png
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from _results import markdown_table, record  # noqa: E402


#: the per-position sweep patches one token at a time (64 per site): keep it to view 2's
#: cross-attention residuals so the real sweep stays near a minute on a CPU core
POSITION_SUBSET = dict(kinds=["cross"], views=[2])


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    """Spearman's rank correlation (average ranks for ties) of two 1-D tensors."""
    def ranks(t: torch.Tensor) -> torch.Tensor:
        order = t.argsort()
        r = torch.empty_like(t, dtype=torch.float64)
        r[order] = torch.arange(len(t), dtype=torch.float64)
        for v in t.unique():  # ties share their mean rank
            m = t == v
            if m.sum() > 1:
                r[m] = r[m].mean()
        return r

    return pearson(ranks(x), ranks(y))


def pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.double() - x.double().mean(), y.double() - y.double().mean()
    return float((x * y).sum() / (x.norm() * y.norm()).clamp_min(1e-300))


def pairs(n: int, size: int, seed: int):
    from mv_interp.data import SceneConfig, render_views

    v1, v2 = render_views(n + 1, SceneConfig(image_size=(size, size)), seed=seed)
    clean = (v1["img"][:n], v2["img"][:n])
    corrupted = (v1["img"][:n], v2["img"][1 : n + 1])
    return clean, corrupted


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pairs", type=int, default=4, help="clean pairs in the batch")
    ap.add_argument("--seed", type=int, default=1000)
    ap.add_argument("--per", nargs="+", default=["site", "head", "position"])
    ap.add_argument("--figure", type=Path, default=None, help="write the scatter plot here")
    ap.add_argument("--no-record", action="store_true", help="do not update benchmarks/RESULTS.md")
    args = ap.parse_args()
    torch.set_num_threads(1)

    import mv_interp
    from mv_interp.interventions import attribution_patching, distance_to, patching_sweep

    model = mv_interp.load_model("dust3r-toy")
    size = model.config.img_size[0]
    clean, corrupted = pairs(args.pairs, size, args.seed)
    with torch.no_grad():
        ref = model.view_outputs(model.forward(*clean))
    metric = distance_to(ref, scale_invariant=True)
    patching_sweep(model, clean, corrupted, per="site", layers=[0], metric=metric)  # warm-up

    rows, results = [], {}
    for per in args.per:
        subset = POSITION_SUBSET if per == "position" else {}
        t0 = time.perf_counter()
        sweep = patching_sweep(model, clean, corrupted, per=per, metric=metric, **subset)
        t_sweep = time.perf_counter() - t0
        t0 = time.perf_counter()
        approx = attribution_patching(model, clean, corrupted, per=per, metric=metric, **subset)
        t_attr = time.perf_counter() - t0
        ok = ~torch.isnan(sweep.values.flatten())
        x, y = approx.values.flatten()[ok], sweep.values.flatten()[ok]
        results[per] = (x, y, sweep)
        rows.append([per, int(ok.sum()), round(spearman(x, y), 3), round(pearson(x, y), 3),
                     sweep.extra["n_forwards"], round(t_sweep, 2), round(t_attr, 2), round(t_sweep / t_attr, 1)])
    headers = ["per", "cells", "Spearman ρ", "Pearson r", "sweep forwards", "sweep s", "attribution s", "speed-up"]
    table = markdown_table(headers, rows)
    print(table)
    if args.figure is not None:
        write_figure(results, args.figure)
        print(f"figure: {args.figure}")
    if not args.no_record:
        body = (f"`dust3r-toy`, {args.pairs} synthetic pairs at {size}×{size} "
                "(corrupted: view 2 from another scene), "
                "scale-invariant pointmap distance to the clean run, normalised (0 = clean, 1 = corrupted); per position: "
                "view 2's cross-attention residuals only. "
                "Attribution patching = 2 forwards + 1 backward for every cell.\n\n" + table)
        record("Attribution patching vs activation patching", body)


def write_figure(results: dict, path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(3.4 * len(results), 3.3), dpi=120, layout="constrained")
    for i, (per, (x, y, sweep)) in enumerate(results.items()):
        ax = fig.add_subplot(1, len(results), i + 1)
        ax.scatter(y.numpy(), x.numpy(), s=9 if per != "site" else 22, alpha=0.6)
        lo = float(min(x.min(), y.min()))
        hi = float(max(x.max(), y.max()))
        ax.plot([lo, hi], [lo, hi], color="gray", lw=0.8, ls="--")
        ax.set_xlabel("activation patching (normalised)")
        if i == 0:
            ax.set_ylabel("attribution patching (normalised)")
        ax.set_title(f"per {per}: Spearman ρ = {spearman(x, y):.2f}", fontsize=9)
        ax.grid(alpha=0.3)
    fig.suptitle("dust3r-toy: first-order estimate vs real patching, one point per cell", fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", bbox_inches="tight")


if __name__ == "__main__":
    main()

"""Per-example head-score sums for the report's intervals: one pair per forward vs batched.

The report's 95 % intervals of every head score resample the held-out pairs, so the heads step
needs each pair's sums. It used to run the scorer one pair per forward and difference the running
sums; :attr:`mv_interp.heads.HeadScorer.per_sample` keeps them from batched forwards. Both ways run
here side by side on the same pairs with every query scored (at these sizes a view has at most 196
patches, fewer than the report's 256 sampled queries, so the report scores them all too), and the
table gives the time of each, the ratio, and the largest difference between the per-pair sums.

    OMP_NUM_THREADS=2 PYTHONPATH=$PWD python3 benchmarks/bench_head_intervals.py
    python3 benchmarks/bench_head_intervals.py --device cuda --pairs 256
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


def bench_models(device: str):
    """dust3r-toy (the bundled model) and a small random VGGT with 4 frames: (label, model, views)."""
    import mv_interp
    from mv_interp.adapters.vggt import HookedVGGT, VGGTConfig

    torch.manual_seed(0)
    yield "dust3r-toy, 2 views", mv_interp.load_model("dust3r-toy", device=device), 2
    vggt = HookedVGGT(VGGTConfig(img_size=112, enable_track=False, embed_dim=64, depth=4, num_heads=4, dino_depth=2,
                                 dino_num_heads=2, camera_trunk_depth=1, camera_num_heads=4, dpt_features=32,
                                 dpt_out_channels=(16, 32, 64, 64), dpt_layers=(0, 1, 2, 3)))
    yield "VGGT small width, 4 frames", mv_interp.MVModel(vggt.to(device).eval()), 4


def one_pair_at_a_time(model, views, config):
    """The former way: one pair per forward, each pair's sums the difference of the running sums."""
    from mv_interp.data.views import Views
    from mv_interp.heads import HeadScorer

    scorer = HeadScorer(model, config)
    per: dict = {}
    views = Views(views)
    for i in range(views.batch_size):
        before = {k: {s: t.clone() for s, t in v.items()} for k, v in scorer.sums.items()}
        scorer.update(views.slice(i, i + 1))
        for key, sums in scorer.sums.items():
            for stat, t in sums.items():
                prev = before.get(key, {}).get(stat)
                per.setdefault(key, {}).setdefault(stat, []).append((t - prev if prev is not None else t).double().cpu())
    return scorer, per


def main(argv: list[str] | None = None) -> None:
    from mv_interp.data import SceneConfig, render_views
    from mv_interp.heads import ScoreConfig
    from mv_interp.report.analysis import score_heads_per_pair

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--pairs", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--no-record", action="store_true")
    args = p.parse_args(argv)
    rows = []
    for name, model, n_views in bench_models(args.device):
        H, W = model.module.config.img_size
        views = render_views(args.pairs, SceneConfig(image_size=(H, W), n_views=n_views), seed=1, device=args.device)
        for label, cfg in (("every query", ScoreConfig(max_queries=None)),):
            score_heads_per_pair(model, [{k: t[:2] for k, t in v.items()} for v in views], cfg)  # warm-up
            t0 = time.perf_counter()
            old, old_per = one_pair_at_a_time(model, views, cfg)
            t_old = time.perf_counter() - t0
            t0 = time.perf_counter()
            new, new_per = score_heads_per_pair(model, views, cfg, batch_size=args.batch_size)
            t_new = time.perf_counter() - t0
            diff = max(float((torch.cat([x[None] for x in old_per[k][s]]) - torch.from_numpy(v)).abs().max())
                       for k, stats in new_per.items() for s, v in stats.items())
            diff = f"{diff:.1e}"
            rows.append([name, label, args.pairs, f"{t_old:.2f}", f"{t_new:.2f}", f"{t_old / t_new:.1f}×", diff])
            print(rows[-1], flush=True)
    table = markdown_table(["model", "scores", "pairs", "one pair per forward s", f"batches of {args.batch_size} s",
                            "speed-up", "max |Δ| per-pair sums"], rows)
    print(table)
    if not args.no_record:
        record(f"Head-score sums per pair, batched vs one pair per forward ({args.device})",
               "Both ways side by side in one run on the same rendered pairs (the report's heads step keeps "
               "every pair's sums for its bootstrap intervals).\n\n" + table)


if __name__ == "__main__":
    main()

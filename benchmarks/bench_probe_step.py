"""Probe-training step time of this tree vs a baseline tree, side by side in one run.

Every probe kind of the issue (``mlp``, ``linear``, ``depth``) at every default probe site,
trained on in-memory pairs (rendering does not enter), ``amp=off``. A step is timed as
``(time of train_probes with 1 + n steps) − (time with 1 step)`` over the median of
``--repeats`` runs, so imports, set-up and the first step's one-off costs cancel. The baseline
runs the same function from ``--baseline`` (a checkout of an older commit) in a subprocess:

    git archive 94525b6 | tar -x -C /tmp/base      # the tree before the batched probe path
    python benchmarks/bench_probe_step.py --baseline /tmp/base --models tiny small
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def measure(name: str, steps: int, batch: int, repeats: int, width: int) -> dict:
    """Per-step seconds of ``train_probes`` in the tree that ``mv_interp`` is imported from."""
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_probes import build, random_pairs

    import mv_interp
    from mv_interp.probes import ProbeSpec, TrainConfig, train_probes

    model = build(name, "cpu")
    H, W = model.config.img_size
    data = random_pairs((steps + 1) * batch, H, W, "cpu")
    specs = (ProbeSpec("mlp", width=width), ProbeSpec("linear", n_layers=1), ProbeSpec("depth", "depth", width=width))
    cfg = TrainConfig(probes=specs, batch_size=batch, amp="off")
    train_probes(model, cfg.replace(steps=1), data=data, progress=False)  # warm-up
    per_step = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        train_probes(model, cfg.replace(steps=1), data=data, progress=False)
        t1 = time.perf_counter()
        train_probes(model, cfg.replace(steps=1 + steps), data=data, progress=False)
        t2 = time.perf_counter()
        per_step.append(((t2 - t1) - (t1 - t0)) / steps)
    sites = len(model.probe_sites())
    return {"model": name, "tree": str(Path(mv_interp.__file__).parent.parent), "sites": sites,
            "step_s": statistics.median(per_step), "batch": batch}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", default=None, help="checkout of the baseline tree (omit: this tree only)")
    ap.add_argument("--models", nargs="+", default=["tiny", "small"])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args()
    if args.child:
        print(json.dumps([measure(m, args.steps, args.batch_size, args.repeats, args.width) for m in args.models]))
        return
    trees = {"this tree": str(ROOT)} | ({"baseline": str(Path(args.baseline).resolve())} if args.baseline else {})
    results: dict[str, list[dict]] = {}
    for label, tree in trees.items():
        env = {**os.environ, "PYTHONPATH": tree}
        cmd = [sys.executable, __file__, "--child", "--models", *args.models, "--steps", str(args.steps),
               "--batch-size", str(args.batch_size), "--repeats", str(args.repeats), "--width", str(args.width)]
        out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
        results[label] = json.loads(out.strip().splitlines()[-1])
    sys.path.insert(0, str(Path(__file__).parent))
    from _results import markdown_table, record

    rows = []
    for i, name in enumerate(args.models):
        new = results["this tree"][i]
        row = [name, new["sites"], args.batch_size, f"{new['step_s'] * 1e3:.1f}",
               f"{args.batch_size / new['step_s']:.2f}"]
        if "baseline" in results:
            old = results["baseline"][i]
            row[3:3] = [f"{old['step_s'] * 1e3:.1f}"]
            row += [f"{args.batch_size / old['step_s']:.2f}", f"{old['step_s'] / new['step_s']:.2f}×"]
        rows.append(row)
    headers = ["model", "sites", "batch"] + (["baseline ms/step"] if "baseline" in results else []) + \
        ["this tree ms/step", "pairs/s"] + (["baseline pairs/s", "speed-up"] if "baseline" in results else [])
    table = markdown_table(headers, rows)
    print(table)
    if not args.no_record:
        load = f" Load average at the end: {os.getloadavg()[0]:.1f} (other jobs share the machine)." \
            if hasattr(os, "getloadavg") else ""
        body = (f"`train_probes` with probes mlp (5×{args.width}), linear and depth ({args.width}) at every default "
                f"site, in-memory pairs, fp32, {torch.get_num_threads()} thread(s); per-step time = (1+{args.steps} "
                f"steps − 1 step) / {args.steps}, median of {args.repeats}. Baseline: `{args.baseline}`.{load}\n\n"
                + table)
        record("Probe-training step, this tree vs baseline (cpu)", body)


if __name__ == "__main__":
    main()

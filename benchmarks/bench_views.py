"""Attention maps at many views: the cost of reading every pattern, of 256 sampled queries, and of none.

Fast3R's decoder and VGGT's global blocks attend over all ``N·P`` tokens of ``N`` views, so a full
pattern is ``[batch, head, N·P, N·P]`` per layer: reading it forces the explicit softmax and grows with
``N²``. :class:`mv_interp.layers.QueryPatterns` computes the rows of chosen queries from q and k while
the forward stays on SDPA, so memory grows with the queries asked for. For each model and view count
this script runs the transformer trunk (Fast3R: encoder + decoder; VGGT: the aggregator; the DPT /
camera heads run per view and hold no attention over views) three ways:

* ``full``: a hook reads every global attention pattern (as the head scorer does: each pattern is
  reduced and dropped, so one is alive at a time);
* ``sampled``: ``--queries`` query rows of every global attention from q and k (QueryPatterns);
* ``none``: no attention read (fused SDPA everywhere).

Each measurement runs in a fresh subprocess: time is the median of ``--repeats`` forwards after a warm-up,
memory the peak over the loaded model and inputs (CUDA: ``max_memory_allocated``; CPU: peak RSS).
A measurement that runs out of memory is recorded as ``OOM`` (CUDA ``OutOfMemoryError``, or the process
killed), one that outlasts ``--timeout`` as ``timeout``, any other failure as ``error`` (its last line
printed); the run goes on either way. Random weights (the cost does not depend on them).

``--width full``: Fast3R as released (``Fast3R_ViT_Large_512``: CroCo ViT-L encoder 1024 / 24 layers /
16 heads, fast3r decoder 1024 / 24 layers / 16 heads, 512 px), VGGT-1B (``VGGTConfig()`` defaults, 518 px;
tracking head off, which the aggregator does not use).

    python benchmarks/bench_views.py                                  # CPU, small widths (recorded)
    python benchmarks/bench_views.py --device cuda --width full --fast3r-size 512 512 --vggt-size 518 518
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _results import markdown_table, record  # noqa: E402

MODES = ("full", "sampled", "none")


def build(name: str, width: str, size: tuple[int, int]):
    """The model (random weights) and its global attention pattern hooks."""
    if name == "fast3r":
        from mv_interp.adapters.fast3r import Fast3RConfig, HookedFast3R

        dims = (dict(enc_embed_dim=1024, enc_depth=24, enc_num_heads=16, dec_embed_dim=1024, dec_depth=24,
                     dec_num_heads=16) if width == "full" else
                dict(enc_embed_dim=64, enc_depth=2, enc_num_heads=2, dec_embed_dim=96, dec_depth=4, dec_num_heads=3))
        model = HookedFast3R(Fast3RConfig(img_size=size, **dims))
    else:
        from mv_interp.adapters.vggt import HookedVGGT, VGGTConfig

        side = max(size) // 14 * 14
        cfg = VGGTConfig(enable_track=False) if width == "full" else VGGTConfig(
            img_size=side, embed_dim=64, depth=4, num_heads=4, dino_depth=2, dino_num_heads=2, camera_trunk_depth=1,
            camera_num_heads=4, dpt_features=32, dpt_out_channels=(16, 32, 64, 64), dpt_layers=(0, 1, 2, 3))
        model = HookedVGGT(cfg)
    sites = [s for s in model.attention_sites(n_views=2) if s.layout == "global"]
    return model.eval(), sites


def one(args: argparse.Namespace) -> dict:
    """One measurement (run in its own process)."""
    from mv_interp.layers import QueryPatterns

    torch.manual_seed(0)
    size = tuple(args.fast3r_size if args.model == "fast3r" else args.vggt_size)
    dtype = getattr(torch, args.dtype) if args.dtype else (
        torch.bfloat16 if args.device.startswith("cuda") else torch.float32)
    try:  # initialise the random weights on the device (a 1B model's init on the CPU costs seconds per process)
        with torch.device(args.device):
            model, sites = build(args.model, args.width, size)
    except (RuntimeError, TypeError):
        model, sites = build(args.model, args.width, size)
    model = model.to(args.device, dtype)
    views = tuple(v.to(dtype) for v in model.example_inputs(args.batch, size, n_views=args.n))
    n_tok = None
    sink = []

    def consume(_hook: str, pattern: torch.Tensor) -> None:  # what a scorer does: reduce, then drop
        sink.append(float(pattern.amax()))  # in the pattern's dtype: no fp32 copy of a [head, T, T] block

    if args.mode == "full":
        hooks = [(s.pattern_hook, lambda x, hook: consume(hook.name, x)) for s in sites]
    elif args.mode == "sampled":
        P = views[0].shape[-2] // model.patch_size * (views[0].shape[-1] // model.patch_size) + sites[0].n_prefix
        n_tok = args.n * P
        g = torch.Generator().manual_seed(0)
        rows = torch.randperm(n_tok, generator=g)[: args.queries].sort().values
        hooks = QueryPatterns(model, {s.pattern_hook: rows for s in sites}, on_pattern=consume).hooks()
    else:
        hooks = []
    cuda = args.device.startswith("cuda")

    if args.model == "fast3r":  # encoder + global decoder (the DPT heads are per view: no attention)
        from mv_interp.layers import patch_positions

        grid = (size[0] // model.patch_size, size[1] // model.patch_size)
        pos = patch_positions(*grid, device=args.device)
        ids = torch.arange(args.n, device=args.device).repeat_interleave(grid[0] * grid[1])[None].expand(args.batch, -1)

        def trunk():
            enc = model.encoder(torch.cat(views), pos)
            return model.decoder(enc.unflatten(0, (args.n, args.batch)).transpose(0, 1).flatten(1, 2), ids)
    else:  # the aggregator (DINO + frame/global blocks); the heads run per frame
        def trunk():
            return model.aggregator(views, keep=set())

    def forward():
        with torch.no_grad(), model.hooks(hooks):
            trunk()
        if cuda:
            torch.cuda.synchronize()

    total = torch.cuda.get_device_properties(args.device).total_memory if cuda else 0
    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    try:
        forward()
        peak = (torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            forward()
            times.append(time.perf_counter() - t0)
        seconds = sorted(times)[len(times) // 2]
    except torch.OutOfMemoryError as e:
        return {"seconds": math.nan, "mib": math.nan, "oom": True, "error": str(e).splitlines()[0][:200]}
    except RuntimeError as e:  # cuBLAS / cuDNN allocation failures surface as RuntimeError
        if "out of memory" not in str(e).lower() and "alloc" not in str(e).lower():
            raise
        return {"seconds": math.nan, "mib": math.nan, "oom": True, "error": str(e).splitlines()[0][:200]}
    P = views[0].shape[-2] // model.patch_size * (views[0].shape[-1] // model.patch_size) + sites[0].n_prefix
    return {"seconds": seconds, "mib": max(0, peak - base) / 2**20, "model_mib": base / 2**20,
            "peak_total_mib": peak / 2**20, "device_mib": total / 2**20, "tokens": args.n * P,
            "heads": sites[0].n_heads, "layers": len(sites), "oom": False}


def run_one(args: argparse.Namespace, name: str, n: int, mode: str) -> dict:
    """One measurement in a fresh process; a failure becomes a result (OOM / timeout / error), never a crash."""
    cmd = [sys.executable, __file__, "--one", name, str(n), mode, "--device", args.device,
           "--width", args.width, "--queries", str(args.queries), "--batch", str(args.batch),
           "--repeats", str(args.repeats), "--fast3r-size", *map(str, args.fast3r_size),
           "--vggt-size", *map(str, args.vggt_size)] + (["--dtype", args.dtype] if args.dtype else [])
    t0 = time.perf_counter()
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"seconds": math.nan, "mib": math.nan, "status": "timeout", "wall": time.perf_counter() - t0}
    wall = time.perf_counter() - t0
    err = done.stderr.strip().splitlines()
    if done.returncode == 0:
        try:
            res = json.loads(done.stdout.strip().splitlines()[-1])
        except (IndexError, json.JSONDecodeError):
            res = {"seconds": math.nan, "mib": math.nan, "status": "error", "error": (err or ["no output"])[-1]}
        res.setdefault("status", "OOM" if res.get("oom") else "ok")
    else:
        text = done.stderr.lower()
        # -9 / 137: the kernel's OOM killer (host memory); otherwise only an allocation failure counts as OOM
        oom = done.returncode in (-9, 137) or "out of memory" in text or "outofmemoryerror" in text
        res = {"seconds": math.nan, "mib": math.nan, "status": "OOM" if oom else "error",
               "error": (err or [f"exit {done.returncode}"])[-1][:300]}
        if not oom:
            print(f"# {name} {n} {mode}: error (exit {done.returncode}):\n" + "\n".join(err[-15:]), flush=True)
    res["wall"] = wall
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--models", nargs="+", default=["fast3r", "vggt"], choices=["fast3r", "vggt"])
    p.add_argument("--views", type=int, nargs="+", default=[2, 8, 32, 64])
    p.add_argument("--width", default="small", choices=["small", "full"],
                   help="small: a few blocks of width 64-96; full: Fast3R ViT-L/ViT-B, VGGT-1B")
    p.add_argument("--fast3r-size", type=int, nargs=2, default=[128, 128], metavar=("H", "W"))
    p.add_argument("--vggt-size", type=int, nargs=2, default=[112, 112], metavar=("H", "W"))
    p.add_argument("--queries", type=int, default=256, help="sampled query rows per global attention")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="model dtype (default: bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--timeout", type=float, default=300, help="seconds one measurement (one process) may take")
    p.add_argument("--json", type=Path, default=None, help="also write every measurement here, after each one")
    p.add_argument("--no-record", action="store_true", help="print only; do not write benchmarks/RESULTS.md")
    p.add_argument("--one", nargs=3, metavar=("MODEL", "VIEWS", "MODE"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        args.model, args.n, args.mode = args.one[0], int(args.one[1]), args.one[2]
        print(json.dumps(one(args)))
        return

    rows, raw = [], []
    cuda_run = args.device.startswith("cuda")
    dtype_name = args.dtype or ("bfloat16" if cuda_run else "float32")
    for name in args.models:
        for n in args.views:
            res = {}
            for mode in MODES:
                res[mode] = run_one(args, name, n, mode)
                print(f"# {name} {n} {mode}: {json.dumps(res[mode])}", flush=True)
                raw.append({"model": name, "views": n, "mode": mode, **res[mode]})
                if args.json:
                    args.json.write_text(json.dumps(raw, indent=1))
            meta = next((r for r in res.values() if "tokens" in r), {})
            device_mib = max((r.get("device_mib", 0) for r in res.values()), default=0)
            tokens, heads, layers = meta.get("tokens", 0), meta.get("heads", 0), meta.get("layers", 0)
            # one full pattern (model dtype: the explicit softmax's output) vs one sampled block (fp32)
            full_mib = args.batch * heads * tokens * tokens * getattr(torch, dtype_name).itemsize / 2**20
            samp_mib = args.batch * heads * min(args.queries, tokens) * tokens * 4 / 2**20
            if not tokens:  # every mode failed: the token count from the geometry
                side = args.fast3r_size if name == "fast3r" else args.vggt_size
                p = 16 if name == "fast3r" else 14
                tokens = n * ((side[0] // p) * (side[1] // p) + (0 if name == "fast3r" else 5))
            row = [name, n, tokens, layers]
            for mode in MODES:
                r = res[mode]
                ok = r["status"] == "ok"
                row += [r["seconds"] if ok else r["status"], r["mib"] if ok else r["status"]]
            row += [full_mib, samp_mib]
            if cuda_run:  # the largest peak of the row (model included) against the card's memory
                peaks = [r["peak_total_mib"] for r in res.values() if r["status"] == "ok"]
                row += [f"{100 * max(peaks) / device_mib:.1f}%" if peaks and device_mib else "-"]
            rows.append(row)
            print(row, flush=True)
    headers = ["model", "views", "tokens", "global layers", "full s", "full MiB", "sampled s", "sampled MiB",
               "none s", "none MiB", "one pattern MiB", "one sampled MiB"] + (["max peak / GPU"] if cuda_run else [])
    dev = ""
    if cuda_run:
        cap = max((r.get("device_mib", 0) for r in raw), default=0)
        model_mib = {r["model"]: r["model_mib"] for r in raw if "model_mib" in r}
        dev = (f" GPU {torch.cuda.get_device_name(0)}, {cap / 1024:.1f} GiB (`total_memory`); the loaded models "
               + ", ".join(f"{k} {v / 1024:.2f} GiB" for k, v in model_mib.items())
               + " (counted in *max peak / GPU*, the largest peak of the modes that ran, not in the MiB columns).")
    body = (
        f"One trunk forward (Fast3R encoder + decoder, VGGT aggregator; no heads) at batch {args.batch}, width {args.width}, Fast3R {args.fast3r_size[0]}x"
        f"{args.fast3r_size[1]}, VGGT {args.vggt_size[0]}x{args.vggt_size[1]}, {args.device}, {dtype_name}.{dev}"
        + (" Full width: Fast3R as released (ViT-L encoder 1024/24/16, decoder 1024/24/16), VGGT-1B (`VGGTConfig()`)."
           if args.width == "full" else "") + f" *full*: every global "
        f"attention pattern read by a hook (explicit softmax, one pattern alive at a time); *sampled*: "
        f"{args.queries} query rows of each from q and k (`mv_interp.layers.QueryPatterns`, SDPA forward); "
        "*none*: no pattern read. s = median seconds per forward; MiB = peak memory over the loaded model "
        "(CPU: peak RSS of a fresh process, so allocator reuse blurs small differences; CUDA: "
        "max_memory_allocated). *one pattern* / *one sampled*: size of one layer's pattern "
        f"`[batch, head, tokens, tokens]` ({dtype_name}) / `[batch, head, queries, tokens]` (fp32). *OOM*: out of device memory; "
        f"*timeout*: over {args.timeout:g} s for one process.\n\n"
        + markdown_table(headers, rows))
    print(body)
    if not args.no_record:
        record(f"Attention patterns vs number of views ({args.device}, {args.width})", body,
               command="python benchmarks/bench_views.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()

"""Everything issue 15 asks of a GPU run, measured in ONE run, as percentages of a ceiling measured in the same run.

Sections (``--sections`` picks a subset):

* ``ceiling``  — the bf16 matmul ceiling (TFLOP/s of a large square ``torch.mm``);
* ``forward``  — DUSt3R forward at batch 1/32/128: hooked eager, stripped eager (hook points
  removed), hooked compiled (:func:`mv_interp.model.enable_compile`), stripped compiled; pairs/s,
  % of the ceiling (FLOPs per pair counted by ``torch.utils.flop_counter``), first-call compile time;
* ``capture``  — at batch 32: bare forward vs ``capture`` / ``run_with_cache`` of the probe sites
  and of every decoder residual, and an nnsight trace saving the decoder residuals (eager and compiled);
* ``probes``   — ``train_probes`` with all default sites × (mlp, linear, depth) at batch 32:
  pairs/s, the share of a step spent in probes (step minus its backbone capture), the data stall;
* ``report``   — ``mv-interp report`` per step with ``--report-preset`` (default ``paper``) on a
  timed fraction ``--report-fraction`` of its work, each step projected to the full preset
  (labelled *projected*), unless the fraction is 1;
* ``fast3r``   — Fast3R forward at 2/8/32 views (views/s, % of the ceiling).

``--distributed`` (under ``torchrun --nproc-per-node N``, issue 20) runs the ``probes`` section
data-parallel: each rank makes its shard of every batch; it reports the total pairs/s and, from
``benchmarks/gpu_scaling.json`` (written by every distributed run), the scaling efficiency
against the N = 1 run.

    python benchmarks/bench_gpu.py --device cuda                          # the full table (H100/H200)
    torchrun --nproc-per-node 8 benchmarks/bench_gpu.py --device cuda --distributed
    python benchmarks/bench_gpu.py --device cpu --smoke                   # tiny sizes, checks the script

Compiling full-size DUSt3R takes a minute or more per variant and input shape, so the whole run
may not fit a 10-minute call; split it then (each part records its own section):
``--sections forward capture`` and ``--sections probes report fast3r``; or bound it:
``--no-compile`` skips the compiled variants (rows say *not run*), ``--batches 32`` times the
forward at one batch only (one compile per compiled variant).

``--smoke`` shrinks every size (tiny models, batches 1/2, a few steps) so the script runs on a CPU
in about a minute; its numbers only show that every section runs, and they are recorded
(labelled smoke) only with ``--record``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
from _results import markdown_table, record  # noqa: E402
from bench_hooks import strip_hooks  # noqa: E402

import mv_interp  # noqa: E402
from mv_interp import distributed as D  # noqa: E402
from mv_interp.adapters.dust3r import NAMED_CONFIGS, DUSt3RConfig, HookedDUSt3R  # noqa: E402
from mv_interp.model import enable_compile  # noqa: E402

SECTIONS = ("ceiling", "forward", "capture", "probes", "report", "fast3r")
SCALING = HERE / "gpu_scaling.json"

HEADERS = {
    "ceiling": ["what", "size", "time", "rate", "of ceiling"],
    "forward": ["variant", "batch", "ms", "pairs/s", "of ceiling", "first call s"],
    "capture": ["path", "what", "batch", "ms", "vs bare forward"],
    "probes": ["ranks", "sites", "kinds", "pairs/step", "ms/step", "pairs/s", "probe share", "amp"],
    "report": ["step", "timed s", "scale", "full preset s"],
    "fast3r": ["views", "ms", "views/s", "GFLOP / forward", "of ceiling"],
}


def headers_of(name: str, rows: list[list]) -> list[str]:
    """A section's table headers (the probes table gains a scaling column in distributed runs)."""
    extra = ["scaling efficiency"] if name == "probes" and any(len(r) > 8 for r in rows) else []
    return HEADERS[name] + extra


SMOKE_DUST3R = DUSt3RConfig(img_size=(32, 48), enc_embed_dim=32, enc_depth=2, enc_num_heads=2, dec_embed_dim=32,
                            dec_depth=2, dec_num_heads=2)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int = 1) -> float:
    """Median seconds of ``fn()`` after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def first_call(fn: Callable[[], Any], device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def amp(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def count_flops(fn: Callable[[], Any]) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


# --------------------------------------------------------------------------------------
# sections
# --------------------------------------------------------------------------------------


def ceiling(args, device) -> tuple[float, list[list]]:
    n = 512 if args.smoke else 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    t = timed(lambda: torch.mm(a, b), device, 3 if args.smoke else 20, warmup=2)
    tflops = 2 * n**3 / t / 1e12
    return tflops, [["bf16 matmul ceiling", f"{n}×{n}×{n}", f"{t * 1e3:.2f} ms", f"{tflops:.2f} TFLOP/s", "100 %"]]


def dust3r(args, device) -> mv_interp.MVModel:
    torch.manual_seed(0)
    cfg = SMOKE_DUST3R if args.smoke else NAMED_CONFIGS[args.config]
    return mv_interp.MVModel(HookedDUSt3R(cfg).eval().requires_grad_(False).to(device))


def forward(args, device, ceil: float, model) -> list[list]:
    module = model.module
    stripped = strip_hooks(copy.deepcopy(module))
    compiled_stripped = torch.compile(stripped)
    hooked_compiled = copy.deepcopy(module)
    fast = enable_compile(hooked_compiled)
    dt = args.amp_dtype
    flops = None
    rows = []
    for batch in args.batches:
        imgs = module.example_inputs(batch)
        with torch.inference_mode(), amp(device, dt):
            if flops is None:
                flops = count_flops(lambda: module(*module.example_inputs(1))) / 1
            variants = {"hooked eager": lambda: module(*imgs), "stripped eager": lambda: stripped(*imgs),
                        "hooked compiled": lambda: fast(*imgs), "stripped compiled": lambda: compiled_stripped(*imgs)}
            for name, fn in variants.items():
                if "compiled" in name and not args.compile_variants:
                    rows.append([name, batch, "–", "–", "–", args.compile_skipped])
                    continue
                first = first_call(fn, device) if "compiled" in name else float("nan")
                t = timed(fn, device, args.repeats)
                rate = batch / t
                rows.append([name, batch, f"{t * 1e3:.1f}", f"{rate:.1f}", f"{100 * rate * flops / 1e12 / ceil:.1f} %",
                             f"{first:.1f}" if first == first else "–"])
                _row(rows[-1])
    rows.append(["(FLOPs per pair)", "", "", "", f"{flops / 1e9:.4g} GFLOP", ""])
    return rows


def _decoder_residuals(module) -> list[str]:
    """Every decoder residual hook, in execution order (nnsight reads must follow it)."""
    return [n for n in module.hook_names() if n.startswith("dec_blocks") and ".hook_resid_" in n]


def capture(args, device, model) -> list[list]:
    module = model.module
    batch = args.capture_batch
    imgs = module.example_inputs(batch)
    probe_hooks = sorted({s.hook for s in module.probe_sites()})
    resid = _decoder_residuals(module)
    compiled = copy.deepcopy(module)
    enable_compile(compiled)
    rows = []
    with torch.inference_mode(), amp(device, args.amp_dtype):
        for label, m in (("eager", module), ("compiled", compiled))[: 2 if args.compile_variants else 1]:
            bare_fn = (lambda m=m: m.capture(*imgs, names=[]))
            bare = timed(bare_fn, device, args.repeats, warmup=2)
            cases = {
                f"capture, {len(probe_hooks)} probe hooks": lambda m=m: m.capture(*imgs, names=probe_hooks),
                f"run_with_cache, {len(probe_hooks)} probe hooks":
                    lambda m=m: m.run_with_cache(*imgs, names_filter=probe_hooks),
                f"run_with_cache, {len(resid)} decoder residuals":
                    lambda m=m: m.run_with_cache(*imgs, names_filter=resid),
            }
            rows.append([label, "bare forward", batch, f"{bare * 1e3:.1f}", "1.00×"])
            _row(rows[-1])
            for name, fn in cases.items():
                t = timed(fn, device, args.repeats, warmup=2)
                rows.append([label, name, batch, f"{t * 1e3:.1f}", f"{t / bare:.2f}×"])
                _row(rows[-1])
            if label == "eager":
                def trace():
                    saved = []
                    with model.trace(*imgs):
                        for name in resid:
                            saved.append(model.get(name).output.save() if hasattr(model, "get")
                                         else _envoy(model, name).output.save())
                    return saved
                try:
                    t = timed(trace, device, args.repeats, warmup=1)
                    rows.append([label, f"nnsight trace, {len(resid)} decoder residuals", batch, f"{t * 1e3:.1f}",
                                 f"{t / bare:.2f}×"])
                except Exception as exc:  # noqa: BLE001 - a row saying why beats a missing table
                    rows.append([label, f"nnsight trace failed: {type(exc).__name__}: {exc}"[:120], batch, "–", "–"])
                _row(rows[-1])
    if not args.compile_variants:
        rows.append(["compiled", args.compile_skipped, batch, "–", "–"])
    return rows


def _row(row: list) -> None:
    """Print one finished row at once (a call cut off inside a slow section keeps its rows)."""
    if D.is_main():
        print("  row: | " + " | ".join(map(str, row)) + " |", flush=True)


def _envoy(model, name: str):
    obj = model
    for part in name.split("."):
        obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
    return obj


def _pairs(n: int, H: int, W: int, device):
    sys.path.insert(0, str(HERE))
    from bench_probes import random_pairs

    return random_pairs(n, H, W, device)


def probes(args, device, model) -> tuple[list[list], dict]:
    from mv_interp.probes import TrainConfig, train_probes

    B = args.probe_batch
    steps = args.probe_steps
    H, W = model.config.img_size
    data = _pairs(B * (steps + 2), H, W, device)
    amp_mode = "bf16" if args.amp_dtype is not None else "off"
    cfg = TrainConfig(probes=("mlp", "linear", "depth"), steps=1, batch_size=B, amp=amp_mode,
                      checkpoint_every=10**6)
    train_probes(model, cfg, data=data, progress=False)  # warm-up (kernels, autotuning)
    D.barrier()
    stamps: list[float] = []

    def stamp(done: int, total: int) -> None:  # after every optimiser step, synchronised
        sync(device)
        stamps.append(time.perf_counter())

    run = train_probes(model, cfg.replace(steps=steps + 1), data=data, progress=stamp)
    step = statistics.median(b - a for a, b in zip(stamps, stamps[1:]))  # the first step's one-offs drop out
    # the backbone part of a step: one capture of the probe hooks on this rank's shard
    shard = B // D.world_size()
    imgs = model.module.example_inputs(shard)
    with torch.no_grad(), amp(device, args.amp_dtype):
        backbone = timed(lambda: run.capture(model, *imgs), device, args.repeats)
    total_rate = B / step
    info = {"world_size": D.world_size(), "pairs_per_s": total_rate, "step_s": step, "batch": B,
            "sites": len(run.sites)}
    rows = [[D.world_size(), len(run.sites), "mlp, linear, depth", B, f"{step * 1e3:.1f}", f"{total_rate:.1f}",
             f"{100 * max(0.0, step - backbone) / step:.0f} %", amp_mode]]
    return rows, info


def report(args, device, model) -> list[list]:
    from mv_interp.report.config import ReportConfig
    from mv_interp.report.runner import run_report

    full = ReportConfig.preset(args.report_preset)
    f = args.report_fraction
    part = full.changed(pairs=max(2, round(full.pairs * f)), probe_steps=max(1, round(full.probe_steps * f)),
                        control_steps=max(1, round(full.n_control_steps * f)),
                        patch_pairs=max(1, min(round(full.patch_pairs * f), max(2, round(full.pairs * f)))))
    if args.smoke:
        part = part.changed(batch_size=2, probe_width=16, probe_layers=2, max_points=200, overlay_queries=1,
                            patch_per=("site",))
    out = Path(args.out) / "report"
    files = run_report(model, part, out, device=device, force=True, progress=False, log=lambda s: None,
                       compile=args.compile_report)
    summary = json.loads(Path(files["summary"]).read_text())
    scale = {"probes": full.probe_steps / part.probe_steps, "control": full.n_control_steps / part.n_control_steps,
             "evaluate": full.pairs / part.pairs, "heads": full.pairs / part.pairs,
             "knockout": full.pairs / part.pairs, "patching": full.patch_pairs / part.patch_pairs, "views": 1.0}
    rows = []
    total = 0.0
    for name, rec in summary["steps"].items():
        s = rec["seconds"] * scale.get(name, 1.0)
        total += s
        rows.append([name, f"{rec['seconds']:.1f}", f"{scale.get(name, 1.0):.1f}×", f"{s:.1f}"])
    label = "measured" if f >= 1 else f"projected from a {f:g} fraction"
    rows.append([f"total ({label})", f"{sum(r['seconds'] for r in summary['steps'].values()):.1f}", "",
                 f"{total:.1f} s = {total / 60:.1f} min"])
    return rows


def fast3r(args, device, ceil: float) -> list[list]:
    from mv_interp.adapters.fast3r import Fast3RConfig, HookedFast3R

    if args.smoke:
        cfg = Fast3RConfig(img_size=(32, 32), enc_embed_dim=32, enc_depth=1, enc_num_heads=2, dec_embed_dim=32,
                           dec_depth=1, dec_num_heads=2)
    else:
        cfg = Fast3RConfig(img_size=(224, 224), enc_embed_dim=1024, enc_depth=24, enc_num_heads=16,
                           dec_embed_dim=768, dec_depth=12, dec_num_heads=12)
    torch.manual_seed(0)
    model = HookedFast3R(cfg).eval().requires_grad_(False).to(device)
    rows = []
    for n in args.views:
        views = model.example_inputs(1, n_views=n)
        with torch.inference_mode(), amp(device, args.amp_dtype):
            flops = count_flops(lambda: model(*views))
            t = timed(lambda: model(*views), device, args.repeats)
        rows.append([n, f"{t * 1e3:.1f}", f"{n / t:.1f}", f"{flops / 1e9:.4g}", f"{100 * flops / t / 1e12 / ceil:.1f} %"])
    return rows


# --------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict[str, list[list]]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes: check that every section runs (CPU, ~1 min)")
    ap.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS)
    ap.add_argument("--config", default="224_linear", help="DUSt3R named config (full size)")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--amp", default=None, choices=["bf16", "off"], help="default: bf16 on CUDA, off on CPU")
    ap.add_argument("--report-preset", default="paper")
    ap.add_argument("--report-fraction", type=float, default=None,
                    help="share of the preset's steps and pairs to time (default 0.05; smoke: a tiny run)")
    ap.add_argument("--compile-report", action="store_true", help="run the report with the compiled fast path")
    ap.add_argument("--distributed", action="store_true", help="under torchrun: data-parallel probe training")
    ap.add_argument("--out", default=None, help="scratch folder (default: a temporary one)")
    ap.add_argument("--smoke-compile", action="store_true", help="with --smoke: time the compiled variants too")
    ap.add_argument("--no-compile", action="store_true",
                    help="skip the compiled variants of forward and capture (each compile of full-size DUSt3R takes "
                         "a minute or more); their rows say 'not run'")
    ap.add_argument("--batches", type=int, nargs="+", default=None,
                    help="forward-section batch sizes (default 1 32 128; smoke: 1 2)")
    ap.add_argument("--record", action="store_true", help="write benchmarks/RESULTS.md even in smoke mode")
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args(argv)
    if args.distributed:
        D.init_from_env(args.device)
        args.sections = ["ceiling", "probes"]
    device = D.local_device(args.device)
    args.amp_dtype = (torch.bfloat16 if device.type == "cuda" else None) if args.amp is None else \
        (torch.bfloat16 if args.amp == "bf16" else None)
    s = args.smoke
    args.repeats = args.repeats or (2 if s else 10)
    args.batches = args.batches or ([1, 2] if s else [1, 32, 128])
    args.capture_batch = 2 if s else 32
    args.probe_batch = 2 * D.world_size() if s else 32 * D.world_size()
    args.probe_steps = 2 if s else 20
    args.views = [2, 3] if s else [2, 8, 32]
    args.compile_variants = (not s or args.smoke_compile) and not args.no_compile
    args.compile_skipped = ("not run (--no-compile)" if args.no_compile
                            else "skipped (--smoke: compiling takes minutes on a CPU)")
    if args.report_fraction is None:
        args.report_fraction = 0.002 if s else 0.05
    if args.out is None:
        import tempfile

        args.out = tempfile.mkdtemp(prefix="bench_gpu_")
    torch.manual_seed(0)

    tables: dict[str, list[list]] = {}
    ceil, tables["ceiling"] = ceiling(args, device)
    if D.is_main():
        print(f"[ceiling]\n{markdown_table(HEADERS['ceiling'], tables['ceiling'])}", flush=True)
    model = dust3r(args, device) if set(args.sections) & {"forward", "capture", "probes", "report"} else None
    for name in args.sections:
        t0 = time.perf_counter()
        if name == "forward":
            tables[name] = forward(args, device, ceil, model)
        elif name == "capture":
            tables[name] = capture(args, device, model)
        elif name == "probes":
            tables[name], info = probes(args, device, model)
            if args.distributed and D.is_main() and not s:
                _scaling(info, tables[name])
        elif name == "report":
            tables[name] = report(args, device, model)
        elif name == "fast3r":
            tables[name] = fast3r(args, device, ceil)
        if D.is_main():  # each table as soon as it exists: a call cut off at its limit keeps what ran
            print(f"[{name}: {time.perf_counter() - t0:.1f} s]\n{markdown_table(headers_of(name, tables[name]), tables[name])}",
                  flush=True)
    if D.is_main():
        text = []
        for name, rows in tables.items():
            table = markdown_table(headers_of(name, rows), rows)
            print(f"\n### {name}\n{table}")
            text.append(f"### {name}\n\n{table}")
        if not args.no_record and (not s or args.record):
            kind = "smoke, tiny sizes — not a measurement" if s else device.type
            gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
            nccl = f", NCCL {'.'.join(map(str, torch.cuda.nccl.version()))}" if device.type == "cuda" else ""
            body = (f"{gpu}, torch {torch.__version__}{nccl}, amp {args.amp_dtype}, DUSt3R "
                    f"{'tiny' if s else args.config}, ranks {D.world_size()}; percentages are of the bf16 matmul "
                    "ceiling measured in this run. Report rows with a scale ≠ 1 are projections from a timed "
                    "fraction.\n\n" + "\n\n".join(text))
            part = "" if args.distributed or set(args.sections) == set(SECTIONS) else f": {', '.join(args.sections)}"
            section = "GPU benchmark (bench_gpu.py" + (", distributed" if args.distributed else "") + f", {kind}{part})"
            record(section, body)
    D.barrier()
    return tables


def _scaling(info: dict, rows: list[list]) -> None:
    data = json.loads(SCALING.read_text()) if SCALING.is_file() else {}
    data[str(info["world_size"])] = info
    tmp = SCALING.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, SCALING)
    if "1" in data:
        eff = info["pairs_per_s"] / (info["world_size"] * data["1"]["pairs_per_s"])
        rows[0].append(f"{100 * eff:.0f} %")


if __name__ == "__main__":
    main()

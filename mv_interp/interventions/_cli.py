"""``mv-interp intervene``, ``mv-interp patch`` and ``mv-interp means``.

``intervene`` runs one pair with and without an intervention spec (JSON) and writes both
outputs and a summary of the change; ``patch`` runs an activation-patching sweep from a clean
pair into a corrupted pair and writes the tensor, a JSON table and a heatmap; ``means`` writes
the per-head mean activations that a mean ablation reads.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from .._cli import add_long_side_arg, add_model_args, load_from_args
from ..io import atomic_write
from ..types import ModelLike


def _load_pairs(model: ModelLike, pairs: list[list[str]], size: int | None) -> list[tuple[Any, ...]]:
    """Load image pairs at the model's input size, all cropped to one common shape (the user-image
    pair source, :class:`mv_interp.data.sources.ImageSource`)."""
    from ..data.sources import ImageSource

    side = size or max(model.config.img_size)
    views = ImageSource(pairs, size=side, patch=model.module.patch_size).take(0, len(pairs))
    return [tuple(v["img"][i : i + 1] for v in views) for i in range(len(pairs))]


def _outputs_to_tensors(model: ModelLike, out: Any) -> dict[str, Any]:
    views = model.view_outputs(out)
    return {f"view{v}.{k}": views[v - 1][k].detach().cpu().float().contiguous()
            for v in range(1, len(views) + 1) for k in ("pts3d", "conf") if k in views[v - 1]}


def change_summary(model: ModelLike, before: Any, after: Any) -> dict[str, Any]:
    """How much an intervention moved the outputs, per view (units: the model's output units)."""
    from .metrics import pointmap_distance, scale_invariant_pointmap_distance

    vb, va = model.view_outputs(before), model.view_outputs(after)
    per_view = []
    for v, (b, a) in enumerate(zip(vb, va), start=1):
        d = (a["pts3d"] - b["pts3d"]).float().norm(dim=-1)
        norm = b["pts3d"].float().norm(dim=-1).mean().clamp(min=1e-12)
        entry = {"view": v, "pts3d_change_mean": float(d.mean()), "pts3d_change_max": float(d.max()),
                 "pts3d_change_relative": float(d.mean() / norm)}
        if "conf" in b and "conf" in a:
            entry.update(conf_before_mean=float(b["conf"].float().mean()),
                         conf_after_mean=float(a["conf"].float().mean()),
                         conf_change_mean_abs=float((a["conf"] - b["conf"]).float().abs().mean()))
        per_view.append(entry)
    return {"per_view": per_view,
            "pointmap_distance": float(pointmap_distance(va, vb).mean()),
            "scale_invariant_pointmap_distance": float(scale_invariant_pointmap_distance(va, vb).mean())}


def _intervene(args: argparse.Namespace) -> int:
    import torch
    from safetensors.torch import save_file

    from .means import MeanActivations
    from .specs import load_spec

    spec = load_spec(args.spec)
    model = load_from_args(args)
    spec.validate(model)
    pairs = [args.pair] + ([args.source] if args.source else [])
    loaded = _load_pairs(model, pairs, args.size)
    views = tuple(v.to(args.device) for v in loaded[0])
    needs = spec.source_hooks(model)
    source: Any = None
    if args.means:
        source = MeanActivations.load(args.means)
    elif needs:
        if not args.source:
            more = " …" if len(needs) > 1 else ""
            raise ValueError(f"this spec replaces activations from another run ({needs[0]}{more}): "
                             "give --source IMG1 IMG2 (the clean / other pair) or --means FILE for a mean ablation")
        src_views = tuple(v.to(args.device) for v in loaded[1])
        with torch.no_grad():
            _, source = model.run_with_cache(*src_views, names_filter=needs)
    t0 = time.perf_counter()
    with torch.no_grad():
        before = model.forward(*views)
        if args.method == "hooks":
            after = model.run_with_hooks(*views, fwd_hooks=spec.fwd_hooks(model, source=source))
        else:
            with model.trace(*views):
                spec.apply_nnsight(model, source=source)
                after = model.output.save()
    seconds = time.perf_counter() - t0
    out = Path(args.out)
    atomic_write(out / "before.safetensors", lambda p: save_file(_outputs_to_tensors(model, before), str(p)))
    atomic_write(out / "after.safetensors", lambda p: save_file(_outputs_to_tensors(model, after), str(p)))
    summary = {"spec": spec.to_dict(), "model": str(args.model), "pair": args.pair, "source": args.source,
               "means": args.means, "method": args.method, "input_shape": list(views[0].shape),
               "seconds": seconds, **change_summary(model, before, after)}
    atomic_write(out / "summary.json", lambda p: Path(p).write_text(json.dumps(summary, indent=2) + "\n"))
    print(f"{spec.type}: wrote {out}/before.safetensors, after.safetensors, summary.json")
    for e in summary["per_view"]:
        print(f"  view {e['view']}: mean point change {e['pts3d_change_mean']:.4g} "
              f"({100 * e['pts3d_change_relative']:.2f}% of the mean point norm), max {e['pts3d_change_max']:.4g}")
    return 0


def _patch(args: argparse.Namespace) -> int:
    from .metrics import BUILTIN_METRICS
    from .patching import patching_sweep

    model = load_from_args(args)
    clean, corrupted = (tuple(v.to(args.device) for v in p) for p in _load_pairs(model, [args.clean, args.corrupted],
                                                                                  args.size))
    import torch

    with torch.no_grad():
        clean_out = model.forward(*clean)
    metric = BUILTIN_METRICS[args.metric](model.view_outputs(clean_out), args.metric_views)
    sweep = patching_sweep(model, clean, corrupted, per=args.per, metric=metric, stack=args.stack, kinds=args.kinds,
                           views=args.views, layers=args.layers, sublayers=not args.no_sublayers, method=args.method,
                           progress=True)
    files = sweep.save(args.out)
    print(f"patching per {sweep.per}: {len(sweep.sites)} sites x {len(sweep.layers)} layers"
          + (f" x {len(sweep.inner)} {sweep.per}s" if sweep.inner is not None else "")
          + f" in {sweep.seconds:.1f} s; metric {sweep.metric}: clean {sweep.clean_value:.4g}, "
          f"corrupted {sweep.corrupted_value:.4g}")
    flat = [(float(v), i) for i, v in enumerate(sweep.values.flatten().tolist()) if v == v]
    for v, i in sorted(flat)[:5]:
        idx = list(torch.unravel_index(torch.tensor(i), sweep.values.shape))
        where = f"{sweep.sites[int(idx[0])]} layer {sweep.layers[int(idx[1])]}"
        if sweep.inner is not None:
            where += f" {sweep.per} {sweep.inner[int(idx[2])]}"
        print(f"  {where}: {v:.3f}")
    print("wrote " + ", ".join(str(p) for p in files.values()))
    return 0


def _means(args: argparse.Namespace) -> int:
    from .means import head_means

    model = load_from_args(args)
    batches = [tuple(v.to(args.device) for v in p) for p in _load_pairs(model, args.pair, args.size)]
    means = head_means(model, batches, stack=args.stack, per_position=not args.per_head, progress=True)
    path = means.save(args.out)
    print(f"wrote {path}: {means!r}")
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("intervene", help="run a pair with and without an intervention spec (JSON); write both outputs",
                       description="Run one pair of images with and without an intervention spec (knockout, "
                                   "ablation or patching, as JSON: docs/interventions.md) and write both outputs "
                                   "(safetensors) and a summary of how much the pointmaps moved.")
    p.add_argument("spec", help="intervention spec JSON ({'type': 'attention_knockout', ...}; "
                                "see docs/interventions.md)")
    add_model_args(p)
    p.add_argument("--pair", nargs=2, required=True, metavar=("IMG1", "IMG2"), help="the two views")
    p.add_argument("--source", nargs=2, metavar=("IMG1", "IMG2"),
                   help="pair whose activations patching / resample ablation copy in, the clean run "
                        "(default: none)")
    p.add_argument("--means", default=None, help="mean activations file for mode='mean' specs without a 'means' "
                                                 "path (from `mv-interp means`)")
    p.add_argument("--method", choices=("hooks", "nnsight"), default="hooks",
                   help="run through TransformerLens-style hooks or an nnsight trace, same result "
                        "(default: %(default)s)")
    add_long_side_arg(p)
    p.add_argument("--out", default="mv_interp_out/intervene", help="output folder (default: %(default)s)")
    p.set_defaults(func=_intervene)

    p = sub.add_parser("patch", help="activation-patching sweep (clean -> corrupted) with a heatmap",
                       description="Patch activations of the clean pair into the corrupted pair at every site "
                                   "(or head, or token) of a stack and measure how far the output returns to the "
                                   "clean one: 0 = restored, 1 = as corrupted. Writes the tensor, a JSON table and "
                                   "a heatmap.")
    add_model_args(p)
    p.add_argument("--clean", nargs=2, required=True, metavar=("IMG1", "IMG2"), help="the clean pair")
    p.add_argument("--corrupted", nargs=2, required=True, metavar=("IMG1", "IMG2"), help="the corrupted pair")
    p.add_argument("--per", choices=("site", "head", "position"), default="site",
                   help="patch whole sites, single heads (hook_z) or single tokens (default: %(default)s)")
    p.add_argument("--stack", default="dec", help="which stack to sweep (default: %(default)s)")
    p.add_argument("--kinds", nargs="+", default=None,
                   help="only these site kinds, e.g. self cross mlp (default: every kind)")
    p.add_argument("--views", nargs="+", type=int, default=None, help="only these views' sites (default: all views)")
    p.add_argument("--layers", nargs="+", type=int, default=None, help="only these layers (default: all layers)")
    p.add_argument("--no-sublayers", action="store_true", help="residual sites only (no sublayer outputs)")
    p.add_argument("--metric", choices=("distance", "scale_invariant"), default="distance",
                   help="pointmap distance to the clean run, normalised clean=0 / corrupted=1 (default: %(default)s)")
    p.add_argument("--metric-views", nargs="+", type=int, default=None, help="views the metric reads (default: all)")
    p.add_argument("--method", choices=("hooks", "traces", "invokes", "attribution"), default="hooks",
                   help="cache + hooks, two nnsight traces, one trace with two invokes, or the first-order "
                        "estimate from two forwards and one backward (default: %(default)s)")
    add_long_side_arg(p)
    p.add_argument("--out", default="mv_interp_out/patch", help="output folder (default: %(default)s)")
    p.set_defaults(func=_patch)

    p = sub.add_parser("means", help="per-head mean activations over pairs, for mean ablation",
                       description="Average every head's output (hook_z) over the given pairs and save it; a "
                                   "mode='mean' ablation spec reads the file.")
    add_model_args(p)
    p.add_argument("--pair", nargs=2, action="append", required=True, metavar=("IMG1", "IMG2"),
                   help="a pair of views (repeat for more)")
    p.add_argument("--stack", default="dec", help="attention stack (default: %(default)s)")
    p.add_argument("--per-head", action="store_true", help="average over positions too (fits any input size)")
    add_long_side_arg(p)
    p.add_argument("--out", required=True, help="output .safetensors file")
    p.set_defaults(func=_means)

"""``mv-interp probes train | eval | show``.

    mv-interp probes train --model M.pth --out runs/p --steps 2000 --control
    mv-interp probes eval  --model M.pth --probes runs/p --out runs/p/eval --pairs 256
    mv-interp probes show  --model M.pth --probes runs/p --out runs/p/show --table runs/p/eval
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .._cli import add_model_args, load_from_args


def _specs(args: argparse.Namespace) -> list | None:
    from .config import PRESETS

    specs = []
    if args.probes is None and not (args.layers or args.width):
        return None  # TrainConfig's (or the --config file's) probes
    for name in args.probes or ("mlp", "linear", "depth"):
        if name not in PRESETS:
            raise ValueError(f"unknown probe kind {name!r}; choose from {sorted(PRESETS)}")
        spec = PRESETS[name]
        if spec.n_layers > 1:
            spec = spec.replace(n_layers=args.layers or spec.n_layers, width=args.width or spec.width)
        specs.append(spec)
    return specs


def _data(args: argparse.Namespace, model, seed: int):
    """``None`` for synthetic pairs, else the pairs of a capture directory or pairs file."""
    if args.data in (None, "synthetic"):
        return None
    from .data import open_pairs

    return open_pairs(args.data, tuple(model.config.img_size), seed)


def _join_ranks(args: argparse.Namespace) -> None:
    """Under ``torchrun``: join the process group, each rank on its own GPU (docs/scale.md)."""
    from .. import distributed as D

    if D.init_from_env(args.device):
        args.device = str(D.local_device(args.device))


def _train(args: argparse.Namespace) -> int:
    from .. import distributed as D
    from ..configs import config_from_args
    from .config import TrainConfig
    from .train import train_probes

    _join_ranks(args)
    model = load_from_args(args)
    out = Path(args.out)
    cfg = config_from_args(args, args.train_options, TrainConfig(), extra={"probes": _specs(args)})
    runs = [("probes", cfg)]
    if args.control:
        runs.append(("control", cfg.replace(backbone="random")))
    say = print if D.is_main() else (lambda *a: None)
    for name, c in runs:
        say(f"training {name}: {', '.join(s.name for s in c.probes)} probes, {c.steps} steps → {out / name}"
            + (f" on {D.world_size()} ranks" if D.world_size() > 1 else ""))
        probes = train_probes(model, c, out / name, data=_data(args, model, c.data_seed), progress=not args.quiet)
        say(f"  {len(probes.sites)} sites, {len(probes.locations)} locations; saved {out / name}")
    return 0


def _resolve_runs(path: str, control: str | None) -> tuple[Path, Path | None]:
    p = Path(path)
    probes_dir = p / "probes" if (p / "probes" / "probes.json").is_file() else p
    if control:
        return probes_dir, Path(control)
    auto = p / "control"
    return probes_dir, (auto if (auto / "probes.json").is_file() else None)


def _eval(args: argparse.Namespace) -> int:
    from .evaluate import eval_pairs, evaluate_probes
    from .probeset import ProbeSet
    from .views import plot_contributions, plot_curves

    _join_ranks(args)
    model = load_from_args(args)
    probes_dir, control_dir = _resolve_runs(args.probes, args.control) if args.probes else (None, None)
    probes = ProbeSet.load(probes_dir, device=args.device) if probes_dir else None
    control = ProbeSet.load(control_dir, device=args.device) if control_dir and not args.no_control else None
    data = _data(args, model, args.eval_seed)
    views = eval_pairs(model, args.pairs, seed=args.eval_seed) if data is None else data.pairs(args.pairs)
    table = evaluate_probes(model, probes, views, control=control, lens=not args.no_lens, batch_size=args.batch_size,
                            progress=not args.quiet)
    from .. import distributed as D

    if not D.is_main():  # every rank holds the whole table; rank 0 writes it
        return 0
    files = table.write(args.out)
    files["curves"] = plot_curves(table, Path(args.out) / "curves.png")
    if table.contributions:
        files["contributions_png"] = plot_contributions(table, Path(args.out) / "contributions.png")
    _print_summary(table)
    for k, v in files.items():
        print(f"  {k}: {v}")
    return 0


def _print_summary(table) -> None:
    import math

    print(f"{table.meta['n_pairs']} pairs; last location {table.locations[-1]!r}:")
    for m in table.methods:
        cols = ["e1_v1", "e1_v2", "e2_aligned_v2", "absrel_v1", "delta1_v1"]
        vals = {c: table.series(m, c)[-1] for c in cols}
        print(f"  {m:<16} " + "  ".join(f"{c}={v:.4f}" for c, v in vals.items() if not math.isnan(v)))
    for m, c in table.contributions.items():
        parts = ", ".join(f"{k} {100 * v['total_rel_to_input']:+.0f}%" for k, v in c.by_kind.items())
        print(f"  Figure 4 ({m}): change of the aligned view-2 error vs decoder input: {parts}")


def _show(args: argparse.Namespace) -> int:
    from .evaluate import ProbeTable, eval_pairs
    from .probeset import ProbeSet
    from .views import pick_pairs, plot_contributions, plot_curves, write_4d

    model = load_from_args(args)
    probes = None
    if args.probes:
        probes_dir, _ = _resolve_runs(args.probes, None)
        probes = ProbeSet.load(probes_dir, device=args.device)
        probes.check_backbone(model)
    out = Path(args.out)
    files = {}
    if args.table:
        table = ProbeTable.load(args.table)
        files["curves"] = plot_curves(table, out / "curves.png")
        if table.contributions:
            files["contributions"] = plot_contributions(table, out / "contributions.png")
    data = _data(args, model, args.eval_seed)
    candidates = (eval_pairs(model, args.n_candidates, seed=args.eval_seed) if data is None
                  else data.pairs(args.n_candidates))
    pairs = pick_pairs(candidates)
    files.update(write_4d(out, model, probes, pairs, kind=args.kind, lens=not args.no_lens, rerun=not args.no_rerun))
    for k, v in files.items():
        print(f"  {k}: {v}")
    from ..viz.recording import RERUN_HINT, rerun_available

    if not args.no_rerun and not rerun_available():
        print(f"  (no .rrd recordings: rerun-sdk is not installed; {RERUN_HINT})")
    return 0


DATA_HELP = "'synthetic', a capture directory (docs/data.md) or a pairs file (default: synthetic)"


def register(sub) -> None:
    from ..configs import add_config_options, deprecated_alias
    from .config import AMP_MODES, TrainConfig
    from .data import EVAL_SEED

    p = sub.add_parser("probes", help="pointmap probes at every skip connection: train, evaluate, show",
                       description="Pointmap probes at every skip connection of a model: train them (jointly, from "
                                   "one frozen backbone pass per step), evaluate them against the pointmap lens and "
                                   "a random-backbone control, and show their pointmaps site by site in 4D.")
    psub = p.add_subparsers(dest="probes_command", metavar="ACTION")

    t = psub.add_parser("train", help="train every probe at every site jointly (resumes an existing run)",
                        description="Train every probe kind at every site jointly and save OUT/probes (and "
                                    "OUT/control with --control). Re-running the same command resumes; a larger "
                                    "--steps extends a finished run. Settings: --config FILE.json (TrainConfig "
                                    "fields), then --set FIELD=VALUE, then the options.")
    add_model_args(t, config_alias=False)
    t.add_argument("--out", required=True, help="run directory (probes in OUT/probes, control in OUT/control)")
    t.add_argument("--probes", nargs="+", default=None,
                   help="probe kinds: mlp, linear, depth (default: mlp linear depth)")
    t.add_argument("--layers", type=int, default=None, help="MLP depth of the mlp/depth probes (default: 5)")
    t.add_argument("--width", type=int, default=None, help="hidden width of the mlp/depth probes (default: 512)")
    t.add_argument("--data", default="synthetic", help=DATA_HELP)
    t.add_argument("--control", action="store_true", help="also train the same probes on a random backbone")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    opts = add_config_options(t, TrainConfig, exclude=("probes", "backbone"), choices={"amp": AMP_MODES},
                              title="training (TrainConfig fields)")
    t.set_defaults(func=_train, train_options=opts)

    e = psub.add_parser("eval", help="per-site metrics of probes, lens and control on held-out pairs",
                        description="Evaluate probes (and the pointmap lens and the control) at every site on "
                                    "held-out pairs; write metrics.csv/json, curves.png and Figure 4 to OUT.")
    add_model_args(e)
    e.add_argument("--probes", default=None, help="run or probe directory (default: none, the lens only)")
    e.add_argument("--control", default=None, help="control probe directory (default: RUN/control if present)")
    e.add_argument("--no-control", action="store_true", help="skip the control even if RUN/control exists")
    e.add_argument("--out", required=True, help="output directory for metrics.csv/json and PNGs")
    e.add_argument("--pairs", type=int, default=64, help="held-out pairs (default: %(default)s)")
    deprecated_alias(e, "--n-pairs", "--pairs")
    e.add_argument("--eval-seed", type=int, default=EVAL_SEED,
                   help="held-out pair i is synthetic scene EVAL_SEED + i (default: %(default)s)")
    e.add_argument("--data", default="synthetic", help=DATA_HELP)
    e.add_argument("--batch-size", type=int, default=8, help="pairs per forward (default: %(default)s)")
    e.add_argument("--no-lens", action="store_true", help="skip the pointmap lens (the model's own head per site)")
    e.add_argument("--quiet", action="store_true", help="no progress bar")
    e.set_defaults(func=_eval)

    s = psub.add_parser("show", help="4D views (HTML + rerun) of probed pointmaps; plots from a metrics table",
                        description="Write probes_4d.html (a slider viewer per pair, works offline) for the easiest "
                                    "and hardest of --n-candidates held-out pairs, rerun .rrd recordings when the "
                                    "rerun extra is installed, and curves / Figure 4 from a saved metrics table.")
    add_model_args(s)
    s.add_argument("--probes", default=None, help="run or probe directory (default: none, the lens only)")
    s.add_argument("--out", required=True, help="output directory")
    s.add_argument("--kind", default="mlp", help="pointmap probe kind to show (default: %(default)s)")
    s.add_argument("--table", default=None,
                   help="metrics.json (or its directory) to draw curves/Figure 4 from (default: none)")
    s.add_argument("--n-candidates", type=int, default=16,
                   help="held-out pairs to pick easy/hard from by overlap (default: %(default)s)")
    s.add_argument("--eval-seed", type=int, default=EVAL_SEED,
                   help="held-out pair i is synthetic scene EVAL_SEED + i (default: %(default)s)")
    s.add_argument("--data", default="synthetic", help=DATA_HELP)
    s.add_argument("--no-lens", action="store_true", help="skip the pointmap-lens viewers")
    s.add_argument("--no-rerun", action="store_true", help="write no .rrd recordings even if rerun is installed")
    s.set_defaults(func=_show)

    p.set_defaults(func=lambda a: (p.print_help(), 2)[1])

"""``mv-interp report``: the paper's whole analysis of a model as one self-contained HTML page.

    mv-interp report                                   # bundled dust3r-toy, synthetic pairs → mv_interp_out/
    mv-interp report --checkpoint DUSt3R_ViTLarge_BaseDecoder_224_linear.pth --device cuda --out runs/dust3r
    mv-interp report --data my_capture/ --pairs 128    # a capture directory (docs/data.md)
    mv-interp report --fast --out /tmp/smoke           # a smoke run of every step (< 1 min on a CPU)
    mv-interp report --checkpoint DUSt3R_ViTLarge_BaseDecoder_224_linear.pth --device cuda --preset paper --compile
    mv-interp report --images a.png b.png --out photos # two plain photos: what needs no ground truth
"""

from __future__ import annotations

import argparse
import shlex

from .._cli import add_model_args


def config_from_args(args: argparse.Namespace):
    """The :class:`ReportConfig` the options ask for: ``--preset`` (or ``--fast``) and the overrides."""
    from .config import ReportConfig

    if args.fast and args.preset not in (None, "fast"):
        raise SystemExit(f"mv-interp report: --fast and --preset {args.preset} disagree; give one of them")
    cfg = ReportConfig.preset("fast" if args.fast else args.preset or "default").changed(
        pairs=args.pairs, probe_steps=args.probe_steps, batch_size=args.batch_size, probe_width=args.probe_width,
        control_steps=args.control_steps,
        control=False if args.no_control else None, seed=args.seed)
    if args.query_patches:
        cfg = cfg.changed(query_patches=tuple(args.query_patches))
    return cfg


def _run(args: argparse.Namespace) -> int:
    from .runner import run_report

    cfg = config_from_args(args)
    force: bool | list[str] = False
    if args.force is not None:
        force = True if not args.force else list(args.force)
    files = run_report(args.model, cfg, args.out, data=args.data, images=args.images, probes=args.probes,
                       device=args.device, model_config=args.config, family=args.family, force=force,
                       progress=not args.quiet, command=command_line(args), compile=args.compile)
    print(f"open {files['html'].resolve().as_uri()}")
    return 0


def command_line(args: argparse.Namespace) -> str:
    """The command that reproduces this run, rebuilt from the parsed options (whatever way the
    CLI was entered: the ``mv-interp`` script, ``python -m``, or ``main([...])``): every option
    that differs from its default, with the subcommand, shell-quoted so it can be pasted back."""
    parts = ["mv-interp", "report"]
    for action in _ACTIONS:
        if not action.option_strings or action.dest in ("help", "quiet") or action.default == argparse.SUPPRESS:
            continue
        value = getattr(args, action.dest, action.default)
        if value == action.default:
            continue
        flag = action.option_strings[-1] if action.option_strings[-1].startswith("--") else action.option_strings[0]
        if isinstance(action, argparse._StoreTrueAction):
            parts.append(flag)
        elif isinstance(value, (list, tuple)):
            parts += [flag] + [str(v) for v in value]
        else:
            parts += [flag, str(value)]
    return " ".join(shlex.quote(p) for p in parts)


_ACTIONS: list[argparse.Action] = []  # the report parser's options (set by register)


def register(sub) -> None:
    from .config import PRESETS
    from .runner import STEP_NAMES

    p = sub.add_parser(
        "report", help="the whole analysis (probes, heads, knockout, patching) as one HTML page",
        description="Train probes at every site (and a random-backbone control), score and classify every attention "
                    "head, knock out the register tokens, run activation-patching sweeps, and write one "
                    "self-contained HTML page (OUT/report.html) with the 4D view, figures and tables; PNG, CSV, "
                    "JSON and rerun files go to OUT as well. Re-running reuses finished steps; an interrupted run "
                    "resumes. The defaults take about ten minutes on a 2-core CPU for the bundled dust3r-toy.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--checkpoint", dest="model", default=argparse.SUPPRESS,
                   help="same as --model (an official DUSt3R .pth, an HF-style directory, a state dict ...)")
    p.add_argument("--data", default=None, help="capture directory (docs/data.md); default: synthetic rooms")
    p.add_argument("--images", nargs="+", default=None, metavar="IMAGE",
                   help="plain photos as pairs (a.png b.png [c.png d.png ...]), no depth or cameras: the report runs "
                        "everything that needs no ground truth and says which sections need it")
    p.add_argument("--probes", default=None, metavar="DIR",
                   help="with --images: a probe set trained on this model (e.g. a report's OUT/probes/model) to "
                        "apply to the photos")
    p.add_argument("--query-patches", type=int, nargs="+", default=None, metavar="TOKEN",
                   help="query patches of the attention maps (token index = row * w + column)")
    p.add_argument("--pairs", type=int, default=None,
                   help="held-out pairs for every measurement (default 64; --fast 8)")
    p.add_argument("--out", default="mv_interp_out", help="output folder (default: %(default)s)")
    p.add_argument("--preset", default=None, choices=sorted(PRESETS),
                   help="how hard to work: default (about ten minutes on a 2-core CPU for dust3r-toy), fast (a smoke "
                        "run) or paper (the paper's protocol: 100,032 probe training pairs, 1,000 held-out pairs, "
                        "MLP probes 512 x 5, AdamW lr 1e-4; sized for a ViT-L on one GPU)")
    p.add_argument("--fast", action="store_true", help="same as --preset fast")
    p.add_argument("--compile", action="store_true",
                   help="run the model's hook-free forwards compiled (torch.compile; minutes of compilation first, "
                        "worth it on a GPU for long presets)")
    p.add_argument("--force", nargs="*", default=None, metavar="STEP",
                   help=f"recompute finished steps: all, or the named ones ({', '.join(STEP_NAMES)})")
    p.add_argument("--probe-steps", type=int, default=None, help="probe training steps (default 300; --fast 12)")
    p.add_argument("--batch-size", type=int, default=None, help="pairs per probe step and per batch (default 8)")
    p.add_argument("--probe-width", type=int, default=None, help="hidden width of the MLP probes (default 256)")
    p.add_argument("--control-steps", type=int, default=None,
                   help="steps of the random-backbone control probes (default 80; --fast 6)")
    p.add_argument("--no-control", action="store_true", help="skip the random-backbone control probes")
    p.add_argument("--seed", type=int, default=None, help="probe initialisation and training-data seed (default 0)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_run)
    _ACTIONS[:] = p._actions

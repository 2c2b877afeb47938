"""``mv-interp report``: the paper's whole analysis of a model as one self-contained HTML page.

    mv-interp report                                   # bundled dust3r-toy, synthetic pairs → mv_interp_out/
    mv-interp report --checkpoint DUSt3R_ViTLarge_BaseDecoder_224_linear.pth --device cuda --out runs/dust3r
    mv-interp report --data my_capture/ --pairs 128    # a capture directory (docs/data.md)
    mv-interp report --fast --out /tmp/smoke           # a smoke run of every step (< 1 min on a CPU)
    mv-interp report --checkpoint DUSt3R_ViTLarge_BaseDecoder_224_linear.pth --device cuda --preset paper --compile
    mv-interp report --images a.png b.png --out photos # two plain photos: what needs no ground truth
    mv-interp report --set knockout_k=3 --config my_report.json   # any ReportConfig field

Every :class:`ReportConfig` field is an option (generated from the dataclass: its docstring is the
help), so a new field appears here by itself.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from .._cli import add_model_args

DESCRIPTION = """\
Train pointmap probes at every site (and the same probes on a random-weight copy as a control),
score and classify every attention head, knock out the register tokens, run activation-patching
sweeps, and write one self-contained HTML page, OUT/report.html, with the 4D view, the figures and
the tables. PNG, CSV and JSON files (and rerun .rrd recordings with the rerun extra) go to OUT too.

Re-running reuses finished steps, a changed setting recomputes only what depends on it, and an
interrupted run resumes. The default preset takes about seven minutes on a 2-core CPU for the
bundled dust3r-toy; --fast (the fast preset) is a smoke run of every step.

Settings: a preset (--preset), then a JSON file of ReportConfig fields (--config), then --set
FIELD=VALUE, then the options below; docs/report.md explains each step.

examples:
  mv-interp report --checkpoint DUSt3R_ViTLarge_BaseDecoder_224_linear.pth --device cuda --out runs/dust3r
  mv-interp report --model naver/DUSt3R_ViTLarge_BaseDecoder_512_dpt --device cuda --pairs 256
  mv-interp report --data my_capture/ --set knockout_k=3
"""


def config_from_args(args: argparse.Namespace, opts=None):
    """The :class:`ReportConfig` the options ask for: ``--preset`` (or ``--fast``), then ``--config``
    FILE.json, ``--set`` and the generated field options (``opts``: default ``args.report_options``)."""
    from .. import configs
    from .config import ReportConfig

    if args.fast and args.preset not in (None, "fast"):
        raise SystemExit(f"mv-interp report: --fast and --preset {args.preset} disagree; give one of them")
    base = ReportConfig.preset("fast" if args.fast else args.preset or "default")
    return configs.config_from_args(args, opts or args.report_options, base)


def _model_config_alias(args: argparse.Namespace) -> None:
    """``--config NAME`` used to name the model config of a bare state dict; it now takes a report
    config file. A value that is no file but a known model config name keeps working (deprecated)."""
    value = args.cfg_file
    if value is None or Path(value).exists() or value.endswith(".json"):
        return
    from ..adapters import adapters

    names = {n for a in adapters() for n in a.named_configs} | {f"{a.name}:{n}" for a in adapters()
                                                               for n in a.named_configs}
    if value in names:
        print(f"mv-interp report: warning: --config {value} for a model config is deprecated; use --model-config",
              file=sys.stderr)
        args.model_config, args.cfg_file = args.model_config or value, None


def _run(args: argparse.Namespace) -> int:
    from .runner import run_report

    _model_config_alias(args)
    cfg = config_from_args(args)
    force: bool | list[str] = False
    if args.force is not None:
        force = True if not args.force else list(args.force)
    files = run_report(args.model, cfg, args.out, data=args.data, images=args.images, probes=args.probes,
                       device=args.device, model_config=args.model_config, family=args.family, force=force,
                       progress=not args.quiet, command=command_line(args), compile=args.compile)
    print(f"open {files['html'].resolve().as_uri()}")
    return 0


def command_line(args: argparse.Namespace) -> str:
    """The command that reproduces this run, rebuilt from the parsed options (whatever way the
    CLI was entered: the ``mv-interp`` script, ``python -m``, or ``main([...])``): every option
    that differs from its default, with the subcommand, shell-quoted so it can be pasted back."""
    parts = ["mv-interp", "report"]
    for action in _ACTIONS:
        if (not action.option_strings or action.dest in ("help", "quiet") or action.default == argparse.SUPPRESS
                or action.help == argparse.SUPPRESS):
            continue
        value = getattr(args, action.dest, action.default)
        if value == action.default:
            continue
        longs = [o for o in action.option_strings if o.startswith("--")] or action.option_strings
        if isinstance(action, argparse.BooleanOptionalAction):  # --control / --no-control
            parts.append(longs[0] if value else next(o for o in longs if o.startswith("--no-")))
        elif isinstance(action, argparse._StoreTrueAction):
            parts.append(longs[-1])
        elif isinstance(action, argparse._AppendAction):  # --set a=1 --set b=2
            for v in value:
                parts += [longs[-1], str(v)]
        elif isinstance(value, (list, tuple)):
            parts += [longs[-1]] + [str(v) for v in value]
        else:
            parts += [longs[-1], str(value)]
    return " ".join(shlex.quote(p) for p in parts)


_ACTIONS: list[argparse.Action] = []  # the report parser's options (set by register)


def register(sub) -> None:
    from ..configs import add_config_options
    from .config import PRESETS, ReportConfig
    from .runner import STEP_NAMES

    p = sub.add_parser("report", help="the whole analysis (probes, heads, knockout, patching) as one HTML page",
                       description=DESCRIPTION)
    add_model_args(p, config_alias=False)
    p.add_argument("--checkpoint", dest="model", default=argparse.SUPPRESS,
                   help="same as --model (an official DUSt3R .pth, an HF-style directory, a hub id …) "
                        "(default: --model's)")
    p.add_argument("--data", default=None,
                   help="capture directory (docs/data.md) (default: synthetic rooms, exact geometry)")
    p.add_argument("--images", nargs="+", default=None, metavar="IMAGE",
                   help="plain photos as pairs (a.png b.png [c.png d.png ...]), no depth or cameras: the report runs "
                        "everything that needs no ground truth and says which sections need it (default: none)")
    p.add_argument("--probes", default=None, metavar="DIR",
                   help="with --images: a probe set trained on this model (e.g. a report's OUT/probes/model) to "
                        "apply to the photos (default: none)")
    p.add_argument("--out", default="mv_interp_out", help="output folder (default: %(default)s)")
    p.add_argument("--preset", default=None, choices=sorted(PRESETS),
                   help="how hard to work: default (about ten minutes on a 2-core CPU for dust3r-toy), fast (a smoke "
                        "run) or paper (the paper's protocol: 100,032 probe training pairs, 1,000 held-out pairs, "
                        "MLP probes 512 x 5, AdamW lr 1e-4; sized for a ViT-L on one GPU); every ReportConfig "
                        "option below shows each preset's value (default: default)")
    p.add_argument("--fast", action="store_true", help="same as --preset fast")
    p.add_argument("--compile", action="store_true",
                   help="run the model's hook-free forwards compiled (torch.compile; minutes of compilation first, "
                        "worth it on a GPU for long presets)")
    p.add_argument("--force", nargs="*", default=None, metavar="STEP",
                   help=f"recompute finished steps: all, or the named ones ({', '.join(STEP_NAMES)}) "
                        "(default: reuse every finished step)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    opts = add_config_options(p, ReportConfig, presets=PRESETS, title="report settings (ReportConfig fields)")
    p.set_defaults(func=_run, report_options=opts)
    _ACTIONS[:] = p._actions

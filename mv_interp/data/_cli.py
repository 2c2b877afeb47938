"""``mv-interp data ...``: render synthetic scenes to disk, convert Habitat renders, check captures."""

from __future__ import annotations

import argparse


def _render(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from .capture import INDEX, read_index, write_capture
    from .synthetic import SceneConfig, render_views

    from pathlib import Path

    from ..configs import config_from_args

    config = config_from_args(args, args.scene_options, SceneConfig())

    out = Path(args.out)
    done = {t[0].split("/")[0] for t in read_index(out)} if (out / INDEX).is_file() else set()
    todo = [i for i in range(args.n) if f"scene_{args.seed + i:06d}" not in done]
    if len(todo) < args.n:
        print(f"{args.n - len(todo)} of {args.n} scenes already in {out}; rendering the other {len(todo)}")
    bar = tqdm(total=len(todo), unit="scene", disable=args.quiet)
    for start in range(0, len(todo), args.batch_size):
        chunk = todo[start:start + args.batch_size]
        seeds = torch.tensor([args.seed + i for i in chunk], dtype=torch.int64)
        views = render_views(len(chunk), config, device=args.device, seeds=seeds, compile=args.compile)
        write_capture(views, out, names=[f"scene_{int(s):06d}" for s in seeds])
        bar.update(len(chunk))
    bar.close()
    print(f"wrote {args.n} scenes ({config.n_views} views each, {config.image_size[0]}x{config.image_size[1]}) "
          f"to {out}")
    return 0


def _convert(args: argparse.Namespace) -> int:
    import sys

    from .habitat import convert_habitat

    try:
        counts = convert_habitat(args.src, args.dst, shift_half_pixel=not args.no_half_pixel_shift,
                                 progress=not args.quiet)
    except ImportError as e:  # no EXR reader: say what to install, no traceback
        print(f"mv-interp data convert-habitat: error: {e}", file=sys.stderr)
        return 1
    print(f"{args.dst}: {counts['tuples']} tuples; {counts['views_written']} views written, "
          f"{counts['views_skipped']} already there")
    return 0


def _check(args: argparse.Namespace) -> int:
    from .capture import check_capture

    counts = check_capture(args.dir)
    print(f"{args.dir}: OK — {counts['tuples']} tuples, {counts['views']} views")
    return 0


def register(sub) -> None:
    from ..configs import add_config_options, deprecated_alias
    from .synthetic import SceneConfig

    p = sub.add_parser("data", help="synthetic scenes and capture directories (render, convert-habitat, check)",
                       description="Synthetic scenes and capture directories: render rooms to disk, convert "
                                   "DUSt3R's Habitat renders, check a capture directory.")
    dsub = p.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)

    r = dsub.add_parser("render", help="render synthetic multi-view scenes into the capture format",
                        description="Render synthetic rooms with exact geometry into a capture directory "
                                    "(docs/data.md); scene i uses seed + i, and re-running resumes. Every "
                                    "SceneConfig field is an option (also --set FIELD=VALUE or --config FILE.json).")
    r.add_argument("--n", type=int, required=True, help="number of scenes")
    r.add_argument("--out", required=True, help="output capture directory (re-running resumes)")
    r.add_argument("--seed", type=int, default=0, help="scene i uses seed + i (default: %(default)s)")
    r.add_argument("--device", default="cpu", help="torch device (default: %(default)s)")
    r.add_argument("--batch-size", type=int, default=32, help="scenes rendered per call (default: %(default)s)")
    deprecated_alias(r, "--batch", "--batch-size")
    r.add_argument("--compile", action="store_true",
                   help="render through torch.compile: several times faster after a one-off compile of minutes")
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    scene = add_config_options(r, SceneConfig, rename={"image_size": "--size", "n_views": "--views"},
                               title="scenes (SceneConfig fields)")
    r.set_defaults(func=_render, scene_options=scene)

    c = dsub.add_parser("convert-habitat", help="convert DUSt3R's Habitat renders (needs an EXR reader)",
                        description="Convert DUSt3R's Habitat renders into the capture format (docs/data.md); "
                                    "re-running resumes.")
    c.add_argument("src", help="directory holding {key}_{i}.jpeg, _depth.exr, _camera_params.json (searched recursively)")
    c.add_argument("dst", help="output capture directory (re-running resumes)")
    c.add_argument("--no-half-pixel-shift", action="store_true",
                   help="keep the principal point as stored (default: move it by -0.5 px to pixel-centre indices)")
    c.add_argument("--quiet", action="store_true", help="no progress bar")
    c.set_defaults(func=_convert)

    k = dsub.add_parser("check", help="validate every view of a capture directory",
                        description="Read every view of a capture directory and report the first problem.")
    k.add_argument("dir", help="capture directory with index.json")
    k.set_defaults(func=_check)

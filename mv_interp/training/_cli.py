"""``mv-interp train`` (train / resume / export) and ``mv-interp validate``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _config(args: argparse.Namespace):
    from ..configs import config_from_args
    from . import PRESETS

    if args.preset not in PRESETS:
        raise ValueError(f"unknown preset {args.preset!r}; presets: {sorted(PRESETS)}")
    return config_from_args(args, args.train_options, PRESETS[args.preset])


def _train(args: argparse.Namespace) -> int:
    from .trainer import export_model, train

    out = Path(args.out)
    if args.export:
        path = export_model(out, args.export)
        print(f"exported {path}")
        return 0
    cfg = _config(args)
    state = train(cfg, out, device=args.device, minutes=args.minutes, max_steps=args.max_steps)
    print(json.dumps({"step": state["step"], "elapsed_s": round(state["elapsed_s"], 1), "val": state["val"]}, indent=2))
    return 0


def _validate(args: argparse.Namespace) -> int:
    from .._cli import load_from_args, size_from_args
    from ..data import SceneConfig
    from .trainer import evaluate, validation_views

    model = load_from_args(args)
    size = size_from_args(args, tuple(model.config.img_size))
    views = validation_views(args.pairs, SceneConfig(image_size=size), device=args.device, seed=args.seed)
    res = evaluate(model, views, batch=args.batch_size)
    print(json.dumps(res, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    return 0


def register(sub) -> None:
    from .._cli import add_model_args, add_size_arg
    from ..configs import add_config_options, deprecated_alias
    from . import PRESETS
    from .trainer import VAL_SEED, TrainConfig

    p = sub.add_parser("train", help="train a DUSt3R-family model on synthetic scenes (resumes from --out)",
                       description="Train a DUSt3R-family model from scratch on synthetic rooms (sharded "
                                   "checkpoints in OUT; the same command resumes). Settings: --preset, then "
                                   "--config FILE.json (TrainConfig fields), then --set FIELD=VALUE, then the "
                                   "options. --export DIR writes the latest weights as an HF-style model directory.")
    p.add_argument("--out", required=True, help="run directory (checkpoints, log.jsonl); re-run to resume")
    p.add_argument("--preset", default="toy", choices=sorted(PRESETS),
                   help="named TrainConfig the settings start from (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="torch device: cpu, cuda … (default: %(default)s)")
    p.add_argument("--minutes", type=float, default=None,
                   help="stop (with a checkpoint) after this wall time (default: no limit)")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps in this run "
                                                                 "(default: no limit)")
    p.add_argument("--export", default=None, metavar="DIR",
                   help="write the latest weights as an HF-style model dir and stop (default: train)")
    opts = add_config_options(p, TrainConfig, presets=PRESETS, title="training (TrainConfig fields)")
    p.set_defaults(func=_train, train_options=opts)

    p = sub.add_parser("validate", help="validation metrics on held-out synthetic pairs (reproduces the model card)",
                       description="Pointmap and pose metrics of a model on held-out synthetic pairs (scene seeds "
                                   "from --seed), as JSON on stdout; the model card's numbers come from this.")
    add_model_args(p)
    p.add_argument("--pairs", type=int, default=256, help="held-out pairs (default: %(default)s)")
    p.add_argument("--seed", type=int, default=VAL_SEED, help="first scene seed of the validation set "
                                                              "(default: %(default)s)")
    add_size_arg(p, "rendered image size")
    p.add_argument("--batch-size", type=int, default=32, help="pairs per forward (default: %(default)s)")
    deprecated_alias(p, "--batch", "--batch-size")
    p.add_argument("--json", default=None, help="also write the metrics to this file (default: stdout only)")
    p.set_defaults(func=_validate)

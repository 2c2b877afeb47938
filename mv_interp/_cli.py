"""Model-level subcommands: ``mv-interp hooks`` (the hook table) and ``mv-interp models``."""

from __future__ import annotations

import argparse

DEFAULT_MODEL = "dust3r-toy"


def add_model_args(p: argparse.ArgumentParser) -> None:
    """The options every command that loads a model shares."""
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="bundled model name, official .pth, HF-style dir, or state dict file (default: %(default)s)")
    p.add_argument("--config", default=None, help="config for a bare state dict, e.g. 224_linear, 512_dpt")
    p.add_argument("--family", default=None, help="model family if it cannot be inferred (dust3r, mast3r, fast3r)")
    p.add_argument("--device", default="cpu", help="torch device (default: %(default)s)")


def load_from_args(args: argparse.Namespace):
    from .api import load_model

    return load_model(args.model, device=args.device, config=args.config, family=args.family)


def _hooks(args: argparse.Namespace) -> int:
    model = load_from_args(args)
    size = tuple(args.size) if args.size else tuple(model.config.img_size)
    table = model.hook_table(batch=1, size=size)
    width = max(len(n) for n, _ in table)
    shown = f"{size[0]}x{size[1]}" if size else "one patch"
    print(f"{len(table)} hook points of {type(model.module).__name__} in execution order "
          f"(shapes for batch 1, input {shown}; view-stacked encoder hooks have the views first):")
    for name, shape in table:
        if args.filter and args.filter not in name:
            continue
        print(f"  {name:<{width}}  {list(shape)}")
    return 0


def _models(args: argparse.Namespace) -> int:
    from .adapters import adapters
    from .api import list_models

    print("bundled models:", ", ".join(list_models()) or "(none)")
    for a in adapters():
        names = ", ".join(a.named_configs) or "-"
        print(f"family {a.name}: classes {', '.join(a.constructor_names) or '-'}; named configs: {names}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("hooks", help="print every hook point with its shape, in execution order")
    add_model_args(p)
    p.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), help="input size (default: the model's)")
    p.add_argument("--filter", default=None, help="only names containing this text")
    p.set_defaults(func=_hooks)
    p = sub.add_parser("models", help="list bundled models and known families")
    p.set_defaults(func=_models)

"""Model-level subcommands: ``mv-interp hooks`` (the hook table) and ``mv-interp models``."""

from __future__ import annotations

import argparse

DEFAULT_MODEL = "dust3r-toy"


def add_model_args(p: argparse.ArgumentParser, config_alias: bool = True) -> None:
    """The options every command that loads a model shares. ``--config`` is the old spelling of
    ``--model-config`` (deprecated) unless the command uses ``--config`` for its own config file."""
    from .configs import deprecated_alias

    g = p.add_argument_group("model")
    g.add_argument("--model", default=DEFAULT_MODEL,
                   help="bundled model name, hub id (org/name[@revision], read from the HF_HOME cache; offline "
                        "with HF_HUB_OFFLINE=1), official .pth, HF-style dir (config.json + model.safetensors) or "
                        "state dict file (default: %(default)s)")
    g.add_argument("--model-config", default=None, metavar="NAME",
                   help="model config of a bare state dict, e.g. 224_linear, 512_dpt (default: read from the "
                        "checkpoint)")
    g.add_argument("--family", default=None,
                   help="model family if it cannot be inferred: dust3r, mast3r, fast3r … (default: inferred)")
    g.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1 … (default: %(default)s)")
    if config_alias:
        deprecated_alias(p, "--config", "--model-config")


def load_from_args(args: argparse.Namespace):
    from .api import load_model

    return load_model(args.model, device=args.device, config=args.model_config, family=args.family)


def add_size_arg(p: argparse.ArgumentParser, what: str = "input size") -> None:
    """``--size H W`` (one value: a square), the same spelling wherever an input size is chosen."""
    p.add_argument("--size", type=int, nargs="+", metavar="PX", default=None,
                   help=f"{what}: H W, or one value for a square (default: the model's)")


def size_from_args(args: argparse.Namespace, fallback: tuple[int, ...] | None) -> tuple[int, int] | None:
    if not args.size:
        return tuple(fallback) if fallback else None  # type: ignore[return-value]
    if len(args.size) > 2:
        raise ValueError(f"--size takes H W or one value, got {len(args.size)} values")
    return (args.size[0], args.size[-1])


def add_long_side_arg(p: argparse.ArgumentParser) -> None:
    """``--long-side N`` for commands that load image files (``--size N`` is its deprecated spelling)."""
    from .configs import deprecated_alias

    p.add_argument("--long-side", type=int, default=None, metavar="PX", dest="size",
                   help="load images with their long side at this many pixels, cropped to the patch grid "
                        "(default: the model's input size)")
    deprecated_alias(p, "--size", "--long-side")


def _hooks(args: argparse.Namespace) -> int:
    model = load_from_args(args)
    size = size_from_args(args, tuple(model.config.img_size))
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
    add_size_arg(p, "input size the shapes are shown for")
    p.add_argument("--filter", default=None, help="only names containing this text (default: every hook)")
    p.set_defaults(func=_hooks)
    p = sub.add_parser("models", help="list bundled models and known families",
                       description="List the bundled models and every registered model family with its checkpoint "
                                   "class names and named configs.")
    p.set_defaults(func=_models)

"""The ``mv-interp`` command.

Each feature package contributes its subcommands through a ``_cli`` module exposing
``register(subparsers)``; this file only lists where to look, so adding a command
never touches another feature's code.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

# feature packages that may contribute subcommands (in help order)
COMMAND_MODULES = (
    "mv_interp._cli",
    "mv_interp.data._cli",
    "mv_interp.probes._cli",
    "mv_interp.heads._cli",
    "mv_interp.interventions._cli",
    "mv_interp.training._cli",
    "mv_interp.report._cli",
)


class Parser(argparse.ArgumentParser):
    """Every (sub)command's parser: paragraph-wrapped descriptions, every option's default shown
    (:class:`mv_interp.configs.HelpFormatter`). Subparsers inherit the class."""

    def __init__(self, *args, **kwargs):
        from .configs import HelpFormatter

        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = Parser(
        prog="mv-interp",
        description="Mechanistic interpretability for multi-view 3D transformers (DUSt3R, MASt3R, Fast3R).",
    )
    parser.add_argument("--version", action="version", version=f"mv-interp {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            found = importlib.util.find_spec(name) is not None
        except ModuleNotFoundError:  # the feature package itself is absent
            found = False
        if found:
            importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (FileNotFoundError, ValueError, KeyError) as e:
        # user errors: one clear line, no traceback
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"mv-interp {args.command}: error: {msg}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

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
import traceback
from pathlib import Path

from .errors import UserError, check_writable, describe_os_error

_PACKAGE = Path(__file__).resolve().parent

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


def _raised_here(e: BaseException) -> bool:
    """Whether ``e`` was raised by mv_interp's own code (a validation) rather than inside a library."""
    frames = traceback.extract_tb(e.__traceback__)
    return bool(frames) and Path(frames[-1].filename).resolve().is_relative_to(_PACKAGE)


def probe_output(args: argparse.Namespace) -> None:
    """Prove ``--out`` writable before a command loads a model or computes anything: a read-only
    folder, a full disk or a file in the way then fails in a second, not after the expensive steps.
    An ``--out`` with a file suffix (``means.safetensors``) is probed in its folder; an output folder
    also loses the temporary files of writes a killed run left there."""
    out = getattr(args, "out", None)
    if isinstance(out, str) and out:
        path = Path(out)
        if path.suffix and not path.is_dir():
            check_writable(path.parent)
        else:
            from .io import remove_stale_tmp

            check_writable(path)
            remove_stale_tmp(path)  # of a run of this command killed inside a write


def main(argv: list[str] | None = None) -> int:
    """Run one command. The error policy (docs/reliability.md): a user error — a
    :class:`~mv_interp.errors.UserError`, or a ``ValueError`` raised by mv_interp's own checks —
    and an ``OSError`` (missing file, read-only folder, full disk) print one line naming the
    file or argument and exit 1; anything else is a bug and keeps its traceback."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    prefix = f"mv-interp {args.command}: error:"
    try:
        probe_output(args)
        return int(args.func(args) or 0)
    except UserError as e:
        print(f"{prefix} {e}", file=sys.stderr)
    except OSError as e:
        print(f"{prefix} {describe_os_error(e)}", file=sys.stderr)
    except ValueError as e:
        if not _raised_here(e):
            raise
        print(f"{prefix} {e}", file=sys.stderr)
    except KeyboardInterrupt:
        print(f"mv-interp {args.command}: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    return 1


if __name__ == "__main__":
    sys.exit(main())

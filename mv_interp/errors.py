"""The errors a user can fix, and how the command line reports them.

Every validation in mv_interp raises a :class:`UserError` (a ``ValueError``) or one of its
subclasses that are *also* the built-in type a caller may already catch (``KeyError`` for an
unknown name, ``IndexError`` for an index out of range, ``TypeError`` for a wrong kind of
object). Their message says what is wrong, which file or argument, and how to fix it.

The ``mv-interp`` command prints a user error — and an ``OSError`` (missing folder, read-only
folder, full disk), with its path and the system's reason — as one line; anything else is a
bug in mv_interp or a library, and keeps its traceback.
"""

from __future__ import annotations

import difflib
import errno
import os
import uuid
from collections.abc import Iterable
from pathlib import Path


class UserError(ValueError):
    """Bad input: the message names the problem, the file or argument, and the fix."""

    def __str__(self) -> str:  # KeyError subclasses would otherwise print the message quoted
        return str(self.args[0]) if self.args else ""


class UnknownNameError(UserError, KeyError):
    """A name (hook, site, family, step …) that does not exist."""


class OutOfRangeError(UserError, IndexError):
    """An index (layer, head, view …) outside its valid range."""


class WrongTypeError(UserError, TypeError):
    """An argument of the wrong kind (a numpy array where a tensor is needed, …)."""


class ConfigError(UserError):
    """A config field of the wrong type or outside its range."""


class CheckpointError(UserError):
    """A checkpoint that cannot be loaded as asked; the message says why and what to do."""


def suggest(name: str, choices: Iterable[str], n: int = 3) -> str:
    """``" Did you mean 'x'?"`` for the closest of ``choices`` (empty when none is close)."""
    close = difflib.get_close_matches(str(name), list(choices), n=n, cutoff=0.6)
    if not close:
        return ""
    return " Did you mean " + " or ".join(repr(c) for c in close) + "?"


def describe_os_error(e: OSError) -> str:
    """One line for an ``OSError``: the path, what the system said, and the errno name."""
    path = e.filename if e.filename is not None else ""
    if e.filename2 is not None:
        path = f"{path} -> {e.filename2}"
    code = errno.errorcode.get(e.errno, "") if e.errno is not None else ""
    reason = e.strerror or (str(e.args[0]) if e.args else type(e).__name__)
    hint = {
        errno.ENOSPC: "free some space or give another --out",
        errno.EDQUOT: "free some space or give another --out",
        errno.EROFS: "the file system is read-only: give a writable --out",
        errno.EACCES: "no permission: give a folder you can write, or fix its permissions",
        errno.EPERM: "no permission: give a folder you can write, or fix its permissions",
        errno.ENOTDIR: "a path component is a file, not a folder: give a folder for --out",
        errno.EEXIST: "a file is in the way: give a folder for --out",
        errno.ENOENT: "check the path",
    }.get(e.errno or -1, "")
    where = f"{path}: " if path else ""
    return f"{where}{reason}" + (f" ({code})" if code else "") + (f"; {hint}" if hint else "")


def check_writable(folder: str | os.PathLike, what: str = "--out") -> Path:
    """Create ``folder`` if needed and prove a file can be written there, before any expensive step.

    Raises an ``OSError`` naming the folder (a file in the way, read-only, no permission, full disk).
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, f"{what} names an existing file, not a folder", str(folder))
    folder.mkdir(parents=True, exist_ok=True)
    probe = folder / f".mv_interp_write_probe.{uuid.uuid4().hex[:8]}.tmp"
    try:
        with open(probe, "wb") as f:
            f.write(b"\0" * 4096)  # a little data, so a full disk shows now rather than mid-run
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise type(e)(e.errno, e.strerror or str(e), str(folder)) from None  # name the folder, not the probe
    finally:
        try:
            probe.unlink()
        except OSError:
            pass
    return folder


__all__ = ["ConfigError", "OutOfRangeError", "UnknownNameError", "UserError", "WrongTypeError", "check_writable",
           "describe_os_error", "suggest"]

"""Writing files: atomically, and JSON/CSV with one policy for non-finite numbers.

Every file mv_interp writes goes through :func:`atomic_write` (write a temporary file next to
the target, then rename it over the target), so a reader or a crashed run never sees half a
file. JSON goes through :func:`jsonable` first, which fixes **the one NaN policy**:

* ``NaN`` is written as ``null`` (valid JSON for browsers and ``jq``; a missing number);
* ``±inf`` is written as the strings ``"inf"`` / ``"-inf"`` (configs hold real infinities, e.g.
  ``depth_mode = ("exp", -inf, inf)``, and must round-trip); :func:`from_jsonable` turns them back;
* numpy / torch scalars become Python numbers, tuples become lists, paths become strings.

:func:`read_json` reads the result back as plain JSON values; the reader that knows a field is a
number turns ``"inf"`` back with :func:`from_jsonable` (configs do, in
:func:`mv_interp.adapters.base.config_value`) and ``null`` into NaN with :func:`nan_if_none`.
Files written by older versions with bare ``NaN`` / ``Infinity`` tokens still load.

This module imports nothing from mv_interp: data, viz, probes and the report all use it
without pulling in the model loader.
"""

from __future__ import annotations

import csv
import errno
import io as _stdio
import json
import math
import os
import re
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["atomic_write", "remove_stale_tmp", "write_text", "write_bytes", "jsonable", "from_jsonable", "config_value", "dumps_json", "write_json",
           "read_json", "nan_if_none", "csv_text", "write_csv"]


def atomic_write(target: str | os.PathLike, write: Callable[[str], Any]) -> Path:
    """Call ``write(tmp_path)`` then rename onto ``target``, so readers never see half a file.

    The temporary file sits in the target's folder (same file system, so the rename is atomic)
    and is removed if ``write`` raises. The result has the usual permissions (``0666 & ~umask``).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        try:
            write(tmp)
        except RuntimeError as e:
            err = _as_os_error(e, target)
            if err is e:
                raise
            raise err from e
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return target


#: names :func:`atomic_write` gives its temporary files (``.{target}.{8 random characters}.tmp``)
TMP_GLOB = ".*.tmp"
_TMP_NAME = re.compile(r"\..+\.[A-Za-z0-9_]{8}\.tmp")


def remove_stale_tmp(folder: str | os.PathLike, recursive: bool = True) -> list[Path]:
    """Remove the temporary files that writes interrupted by a kill left in ``folder``; returns them.

    Call it when a run starts in a folder it owns (two runs writing one folder at once are not
    supported anyway).
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = sorted((folder.rglob if recursive else folder.glob)(TMP_GLOB))
    removed = []
    for p in found:
        if _TMP_NAME.fullmatch(p.name) and p.is_file() and not p.is_symlink():
            try:
                p.unlink()
                removed.append(p)
            except FileNotFoundError:
                pass
    return removed


def _as_os_error(e: RuntimeError, target: Path) -> BaseException:
    """torch's writer reports a full disk as ``basic_ios::clear`` / ``inline_container.cc`` errors:
    give them back as the ``OSError`` they are (ENOSPC when the disk is full), naming the file."""
    text = str(e)
    if not any(s in text for s in ("basic_ios", "inline_container", "PytorchStreamWriter", "file write failed")):
        return e
    try:
        st = os.statvfs(target.parent)
        full = st.f_bavail * st.f_frsize < (1 << 20)
    except OSError:
        full = False
    code = errno.ENOSPC if full else errno.EIO
    return OSError(code, os.strerror(code) + f" while writing (torch: {text.splitlines()[0][:120]})", str(target))


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically."""
    return atomic_write(path, lambda p: Path(p).write_text(text))


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    return atomic_write(path, lambda p: Path(p).write_bytes(data))


def jsonable(obj: Any) -> Any:
    """``obj`` made JSON-safe under the one policy (module docstring): NaN → ``None``, ±inf →
    ``"inf"``/``"-inf"``, numpy/torch scalars → numbers, tuples → lists, paths → strings."""
    if isinstance(obj, bool) or obj is None or isinstance(obj, str):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        if math.isnan(obj):
            return None
        if math.isinf(obj):
            return "inf" if obj > 0 else "-inf"
        return float(obj)
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if _is_scalar(obj):  # numpy / torch scalars and one-element tensors
        return jsonable(obj.item())
    return obj


def _is_scalar(obj: Any) -> bool:
    if not callable(getattr(obj, "item", None)):
        return False
    numel = getattr(obj, "numel", None)
    return numel() == 1 if callable(numel) else getattr(obj, "ndim", None) == 0


def from_jsonable(obj: Any) -> Any:
    """The inverse of :func:`jsonable` for infinities: ``"inf"``/``"Infinity"`` → ``inf`` (also
    ``-``), recursively through dicts and lists. ``None`` stays ``None``."""
    if isinstance(obj, str):
        if obj in ("inf", "Infinity"):
            return math.inf
        if obj in ("-inf", "-Infinity"):
            return -math.inf
        return obj
    if isinstance(obj, list):
        return [from_jsonable(v) for v in obj]
    if isinstance(obj, dict):
        return {k: from_jsonable(v) for k, v in obj.items()}
    return obj


# The NaN object ``json`` itself decodes ``NaN`` to: containers compare NaN by identity, so rows
# read back from a new file equal rows decoded from an old one (or from ``json.loads``).
_NAN = json.loads("NaN")


def config_value(value: Any) -> Any:
    """A config field's value read back from JSON: ``"inf"``/``"-inf"`` → ``±inf`` and lists →
    tuples (config fields are immutable), recursively."""
    value = from_jsonable(value)
    if isinstance(value, list):
        return tuple(config_value(v) for v in value)
    return value


def nan_if_none(value: Any) -> float:
    """``float(value)``, or NaN for ``None`` (how :func:`jsonable` writes NaN)."""
    return _NAN if value is None else float(value)


def dumps_json(obj: Any, indent: int | None = 1, **kwargs: Any) -> str:
    """``obj`` as JSON text under the one NaN policy (never a bare ``NaN`` token)."""
    return json.dumps(jsonable(obj), indent=indent, allow_nan=False, **kwargs)


def write_json(path: str | os.PathLike, obj: Any, indent: int | None = 1, **kwargs: Any) -> Path:
    """Write ``obj`` as JSON (one NaN policy, trailing newline) to ``path`` atomically."""
    return write_text(path, dumps_json(obj, indent=indent, **kwargs) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    """Read a JSON file written by :func:`write_json` (values as written: see the module docstring)."""
    return json.loads(Path(path).read_text())


def _cell(v: Any) -> Any:
    return f"{v:.6g}" if isinstance(v, float) else v


def csv_text(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
    """Rows as CSV text: a header, floats with 6 significant digits, columns in ``columns``
    order (default: the first row's keys); keys outside ``columns`` are dropped."""
    cols = list(columns or (rows[0].keys() if rows else []))
    buf = _stdio.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: _cell(v) for k, v in r.items()})
    return buf.getvalue()


def write_csv(path: str | os.PathLike, rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> Path:
    """Write :func:`csv_text` of ``rows`` to ``path`` atomically."""
    return write_text(path, csv_text(rows, columns))

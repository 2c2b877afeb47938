"""Config dataclasses as typed files and as command-line options.

Every config in mv_interp is a frozen dataclass whose fields carry a docstring (the string literal
right after the field). This module reads those docstrings and the field types, and turns them into

* typed validation of user-written config files (:func:`check_fields`, used by every
  ``Config.from_dict``): ``ReportConfig.from_dict({"pairs": "64"})`` raises
  ``ConfigTypeError: ReportConfig.pairs: expected int, got '64' (str)``;
* command-line options (:func:`add_config_options`): one ``--field-name`` per field, its docstring
  as help, its default (and each preset's) shown, its type checked by argparse; plus
  ``--set key=value`` and ``--config FILE.json`` for any field, so a new field appears in the CLI
  without touching it (:func:`config_from_args` layers preset → file → ``--set`` → options).

>>> parser = argparse.ArgumentParser()
>>> opts = add_config_options(parser, ReportConfig, presets=PRESETS)
>>> cfg = config_from_args(parser.parse_args(["--pairs", "32"]), opts, ReportConfig.preset("default"))
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import json
import math
import numbers
import sys
import textwrap
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigError


class ConfigTypeError(ConfigError, TypeError):
    """A config value of the wrong type: names the field, the expected type and the value given.
    (A :class:`~mv_interp.errors.ConfigError`, so the command line reports it as a user error in one line.)"""


# --------------------------------------------------------------------------------------
# Field docstrings and types
# --------------------------------------------------------------------------------------


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """``{field: docstring}`` from the class source (the string literal after each field), base
    classes first; whitespace-normalised. Fields without one are absent."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass) or klass is object:
            continue
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):  # no source (e.g. built in a REPL): no docstrings
            continue
        body = ast.parse(source).body[0].body  # type: ignore[attr-defined]
        for node, nxt in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(nxt, ast.Expr)
                    and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
                docs[node.target.id] = " ".join(inspect.cleandoc(nxt.value.value).split())
    return docs


@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    """Resolved type hints of a dataclass's fields (``from __future__ import annotations`` strings
    evaluated in the defining module)."""
    hints: dict[str, Any] = {}
    for klass in reversed(cls.__mro__):  # each annotation in the module of the class that declares it
        module = sys.modules.get(klass.__module__)
        for name, ann in vars(klass).get("__annotations__", {}).items():
            try:
                hints[name] = typing._eval_type(typing.ForwardRef(ann) if isinstance(ann, str) else ann,
                                                vars(module) if module else {}, dict(vars(klass)))
            except Exception:  # noqa: BLE001 - an annotation we cannot resolve is checked as Any
                hints[name] = Any
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls)}


def type_name(tp: Any) -> str:
    """A short readable name: ``int``, ``float``, ``int or None``, ``list of str``, ``[int, int]``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any or tp is inspect.Parameter.empty:
        return "any value"
    if tp is type(None):
        return "None"
    if tp is numbers.Real:
        return "number"
    if origin in (typing.Union, types.UnionType):
        names = [type_name(a) for a in args if a is not type(None)]
        merged = "number" if set(names) <= {"int", "float", "number"} and len(names) > 1 else " or ".join(names)
        return merged + (" or None" if type(None) in args else "")
    if origin is typing.Literal:
        return " or ".join(repr(a) for a in args)
    if origin in (tuple,) and args and args[-1] is not Ellipsis:
        return "[" + ", ".join(type_name(a) for a in args) + "]"
    if origin in (tuple, list, Sequence, set, frozenset) or tp in (tuple, list):
        inner = args[0] if args else Any
        return "list" + (f" of {type_name(inner)}" if inner is not Any else "")
    if origin in (dict, Mapping) or tp in (dict,):
        return "object (mapping)"
    return getattr(tp, "__name__", str(tp))


def _matches(tp: Any, value: Any) -> bool:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any or tp is inspect.Parameter.empty or isinstance(tp, typing.TypeVar):
        return True
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp in (float, numbers.Real):  # JSON writes 1.0 as 1; inf comes as float('inf')
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(a, value) for a in args)
    if origin is typing.Literal:
        return value in args
    if origin is tuple or tp is tuple or origin in (list, Sequence, set, frozenset) or tp is list:
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            # a bare string is accepted where the config itself normalises it to a one-element tuple
            return isinstance(value, str) and bool(args) and args[0] is str and origin is not tuple
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(_matches(a, v) for a, v in zip(args, value))
        inner = args[0] if args else Any
        return all(_matches(inner, v) for v in value)
    if origin in (dict, Mapping) or tp is dict:
        return isinstance(value, Mapping)
    if dataclasses.is_dataclass(tp):
        return isinstance(value, (tp, Mapping))
    if isinstance(tp, type):
        return isinstance(value, tp)
    return True  # an annotation this checker does not model: the config's own __post_init__ decides


def check_fields(cls: type, data: Mapping[str, Any], source: str = "",
                 given: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``data`` with JSON's integers made floats where a field is a ``float``; raises
    :class:`ConfigTypeError` for the first value whose type does not match its field (unknown
    names raise ``ValueError`` listing the valid ones). ``source`` (a file name)
    prefixes the message; ``given`` holds the values as the user wrote them (before JSON decoding
    of ``"inf"`` and lists), for the message."""
    types_ = field_types(cls)
    where = f"{source}: " if source else ""
    unknown = sorted(set(data) - set(types_))
    if unknown:
        raise ConfigError(f"{where}{cls.__name__}: unknown field(s) {unknown}; valid fields: {sorted(types_)}")
    for name, value in data.items():
        if not _matches(types_[name], value):
            shown = (given or {}).get(name, value)
            raise ConfigTypeError(f"{where}{cls.__name__}.{name}: expected {type_name(types_[name])}, "
                                  f"got {shown!r} ({type(shown).__name__})")
    return {k: float(v) if types_[k] is float and isinstance(v, int) else v for k, v in data.items()}


def read_config_file(cls: type, path: str | Path) -> dict[str, Any]:
    """The fields in a JSON config file (a subset of ``cls``'s fields), type-checked."""
    from .io import config_value

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object of {cls.__name__} fields, got {type(data).__name__}")
    return check_fields(cls, {k: config_value(v) for k, v in data.items()}, source=str(path), given=data)


# --------------------------------------------------------------------------------------
# Command-line options
# --------------------------------------------------------------------------------------


def plain(doc: str) -> str:
    """A docstring as terminal text: ``:role:`x``` → x, ````code```` → code."""
    import re

    doc = re.sub(r":[a-z]+:`~?([^`]+)`", lambda m: m.group(1).rsplit(".", 1)[-1] if m.group(1).startswith(
        ("mv_interp.", "~")) else m.group(1), doc)
    return doc.replace("``", "")


def option_name(field: str) -> str:
    return "--" + field.replace("_", "-")


def _scalar_parser(tp: Any) -> Callable[[str], Any] | None:
    """argparse ``type=`` for one value of ``tp`` (``None`` when it is not a plain scalar)."""
    if tp is int:
        return int
    if tp in (float, numbers.Real):
        return float
    if tp is str:
        return str
    return None


def _cli_shape(tp: Any) -> tuple[Callable[[str], Any], Any, bool] | None:
    """``(type, nargs, optional)`` for an option of field type ``tp``, or ``None`` when the field only
    takes ``--set`` / ``--config`` (mappings, nested configs, objects)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    optional = False
    if origin in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        optional = len(rest) < len(args)
        if all(a in (int, float, numbers.Real) for a in rest) and rest:
            tp = float if any(a is not int for a in rest) else int
        elif len(rest) == 1:
            tp = rest[0]
        else:
            return None
        origin, args = typing.get_origin(tp), typing.get_args(tp)
    scalar = _scalar_parser(tp)
    if scalar is not None:
        return scalar, None, optional
    if origin is tuple and args and args[-1] is not Ellipsis:
        inner = {_scalar_parser(a) for a in args}
        if len(inner) == 1 and None not in inner:
            return inner.pop(), len(args), optional
        if inner <= {int, float}:
            return float, len(args), optional
        return None
    if origin in (tuple, list, Sequence) or tp in (tuple, list):
        inner_tp = args[0] if args else str
        if typing.get_origin(inner_tp) in (typing.Union, types.UnionType):
            inner_tp = float if all(a in (int, float) for a in typing.get_args(inner_tp)) else None
        inner = _scalar_parser(inner_tp) if inner_tp is not None else None
        return (inner, "+", optional) if inner is not None else None
    return None


def _none_or(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        return None if text.strip().lower() in ("none", "null") else parse(text)

    convert.__name__ = getattr(parse, "__name__", "value")  # argparse names it in "invalid int value"
    return convert


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if value is None:
        return "none"
    if isinstance(value, (list, tuple)):
        return " ".join(_show(v) for v in value) if value else "(empty)"
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return str(value)


@dataclass
class ConfigOptions:
    """What :func:`add_config_options` added: the config class and option dest of every field."""

    cls: type
    dests: dict[str, str]
    set_dest: str | None
    file_dest: str | None


class _Deprecated(argparse.Action):
    """An old option spelling: warns on stderr, then behaves as the new option."""

    def __init__(self, option_strings, dest, target: argparse.Action, **kw):
        for k in ("nargs", "type", "choices", "metavar"):
            kw.pop(k, None)
        super().__init__(option_strings, dest, nargs=target.nargs, type=target.type, choices=target.choices,
                         metavar=target.metavar, help=argparse.SUPPRESS, **kw)
        self.target = target

    def __call__(self, parser, namespace, values, option_string=None):
        new = self.target.option_strings[0]
        print(f"{parser.prog}: warning: {option_string} is deprecated; use {new}", file=sys.stderr)
        self.target(parser, namespace, values, new)


def deprecated_alias(parser: argparse.ArgumentParser, old: str, new: str) -> None:
    """Accept ``old`` as a hidden, deprecated spelling of the existing option ``new``."""
    target = next((a for a in parser._actions if new in a.option_strings), None)
    if target is None:
        raise ValueError(f"deprecated_alias: {parser.prog} has no option {new}")
    parser.add_argument(old, dest=target.dest, action=_Deprecated, target=target, default=argparse.SUPPRESS)


def add_config_options(parser: argparse.ArgumentParser, cls: type, *, presets: Mapping[str, Any] | None = None,
                       default: Any = None, only: Iterable[str] | None = None, exclude: Iterable[str] = (),
                       rename: Mapping[str, str] | None = None, help: Mapping[str, str] | None = None,
                       aliases: Mapping[str, Iterable[str]] | None = None, choices: Mapping[str, Sequence] | None = None,
                       prefix: str = "",
                       set_option: bool = True, file_option: str | None = "--config",
                       title: str | None = None) -> ConfigOptions:
    """One option per field of dataclass ``cls`` (docstring → help, default shown, type checked), in a
    group of their own, plus ``--set key=value`` and ``file_option`` (a JSON file of fields).

    ``presets`` (name → instance) shows each preset's value where it differs from the first;
    ``default`` is the instance whose values are shown (default: ``cls()``, or the first preset).
    ``rename`` maps a field to another option name, ``aliases`` a field to old (deprecated) spellings,
    ``help`` replaces a docstring, ``choices`` restricts a field's values. Fields whose type has no command-line spelling (mappings,
    nested configs) are reachable through ``--set`` and the file only. Options default to ``None``
    (unset), so :func:`config_from_args` can tell what was given.
    """
    presets = dict(presets or {})
    base = default if default is not None else (next(iter(presets.values())) if presets else cls())
    docs, types_ = field_docs(cls), field_types(cls)
    base_name = next((n for n, c in presets.items() if c is base), None)
    label = "default" if base_name in (None, "default") else f"default ({base_name})"
    names = [f for f in types_ if (only is None or f in set(only)) and f not in set(exclude)]
    group = parser.add_argument_group(title or f"{cls.__name__} (each also --set FIELD=VALUE or in a JSON file)")
    dests: dict[str, str] = {}
    for name in names:
        shape = (str, 0, False) if types_[name] is bool else _cli_shape(types_[name])
        if shape is None:
            continue
        parse, nargs, optional = shape
        value = getattr(base, name)
        if types_[name] in (tuple, list) and value and all(isinstance(v, (int, float)) for v in value):
            parse = float if any(isinstance(v, float) for v in value) else int  # bare `tuple`: the default's type
        opt = (rename or {}).get(name) or option_name(prefix + name)
        text = (help or {}).get(name) or plain(docs.get(name, "")) or name.replace("_", " ")
        shown = f"{label}: {_show(value)}"
        others = [f"{p}: {_show(getattr(c, name))}" for p, c in presets.items()
                  if c is not base and getattr(c, name) != value]
        text = f"{text} ({'; '.join([shown, *others])})".replace("%", "%%")
        dest = f"cfg_{prefix}{name}"
        if types_[name] is bool:
            group.add_argument(opt, dest=dest, action=argparse.BooleanOptionalAction, default=None, help=text)
        else:
            metavar = name.split("_")[-1].upper()
            allowed = (choices or {}).get(name)
            if allowed and nargs is not None:  # a list: name the choices once, not in every metavar slot
                text = text.replace(" (default", f" Choices: {', '.join(map(str, allowed))}. (default", 1)
                metavar = metavar.rstrip("S")
            elif allowed:
                metavar = "{" + ",".join(map(str, allowed)) + "}"
            group.add_argument(opt, dest=dest, type=_none_or(parse) if optional else parse, nargs=nargs, default=None,
                               help=text, metavar=metavar, choices=allowed)
        dests[name] = dest
        for old in (aliases or {}).get(name, ()):
            deprecated_alias(parser, old, opt)
    set_dest = file_dest = None
    if set_option:
        set_dest = f"cfg_{prefix}set"
        plain_values = base.to_dict() if hasattr(base, "to_dict") else dataclasses.asdict(base)
        listed = [f for f in dests if isinstance(plain_values.get(f), list)] or list(dests) or ["FIELD"]
        example = listed[0]
        shown = json.dumps(plain_values[example]) if example in plain_values else "VALUE"
        group.add_argument("--set", dest=set_dest, action="append", default=[], metavar="FIELD=VALUE",
                           help=f"set any {cls.__name__} field, repeatable; VALUE is JSON or plain text, e.g. "
                                f"--set '{example}={shown}' (default: none)".replace("%", "%%"))
    if file_option:
        file_dest = f"cfg_{prefix}file"
        group.add_argument(file_option, dest=file_dest, default=None, metavar="FILE.json",
                           help=f"a JSON object of {cls.__name__} fields (any subset): applied first, then --set, "
                                "then the options (default: none)")
    return ConfigOptions(cls, dests, set_dest, file_dest)


def parse_set(cls: type, items: Iterable[str]) -> dict[str, Any]:
    """``["pairs=32", "probe_kinds=[\"mlp\"]"]`` → typed field values (JSON values, else plain text)."""
    types_ = field_types(cls)
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise ValueError(f"--set {item!r}: expected FIELD=VALUE, e.g. --set pairs=32")
        if key not in types_:
            raise ValueError(f"--set {item!r}: {cls.__name__} has no field {key!r}; fields: {sorted(types_)}")
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
        if isinstance(value, str) and text.strip().lower() in ("none", "null"):
            value = None
        shape = _cli_shape(types_[key])
        if isinstance(value, (int, float)) and shape is not None and shape[1] is not None and not isinstance(value, bool):
            value = [value]  # a single number for a list field
        if isinstance(value, str) and shape is not None and shape[1] is not None and "," in value:
            value = [shape[0](v.strip()) for v in value.split(",")]
        if isinstance(value, list):
            from .io import config_value

            value = config_value(value)
        try:
            out.update(check_fields(cls, {key: value}))
        except ConfigTypeError as e:
            raise ConfigTypeError(f"--set {item!r}: {e}") from None
    return out


def config_from_args(args: argparse.Namespace, opts: ConfigOptions, base: Any,
                     extra: Mapping[str, Any] | None = None) -> Any:
    """``base`` (a preset) updated by the config file, then ``--set``, then ``extra`` (values of
    other, command-specific options; ``None`` = unset), then the generated options."""
    changes: dict[str, Any] = {}
    if opts.file_dest and getattr(args, opts.file_dest, None):
        changes.update(read_config_file(opts.cls, getattr(args, opts.file_dest)))
    if opts.set_dest:
        changes.update(parse_set(opts.cls, getattr(args, opts.set_dest, None) or []))
    changes.update({k: v for k, v in (extra or {}).items() if v is not None})
    for name, dest in opts.dests.items():
        value = getattr(args, dest, None)
        if value is not None:
            changes[name] = tuple(value) if isinstance(value, list) else value
    return dataclasses.replace(base, **changes) if changes else base


# --------------------------------------------------------------------------------------
# Help formatting shared by every subcommand
# --------------------------------------------------------------------------------------


class HelpFormatter(argparse.HelpFormatter):
    """Wraps descriptions paragraph by paragraph (blank lines separate them; indented lines are kept
    as they are, for examples) and ends every option's help with its default or "(required)"."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        paras, out = textwrap.dedent(text).strip("\n").split("\n\n"), []
        for para in paras:
            if any(line.startswith((" ", "\t")) for line in para.splitlines()):
                out.append("\n".join(indent + line for line in para.splitlines()))
            else:
                out.append(textwrap.fill(" ".join(para.split()), width, initial_indent=indent,
                                         subsequent_indent=indent))
        return "\n\n".join(out)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.help is argparse.SUPPRESS or "default" in text.lower() or "required" in text.lower():
            return text
        if action.required:
            return f"{text} (required)"
        if isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
            return text
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse.BooleanOptionalAction)):
            on = action.default if isinstance(action, argparse.BooleanOptionalAction) else not action.const
            return f"{text} (default: {_show(bool(on)) if on is not None else 'off'})"
        if action.option_strings and action.default is not argparse.SUPPRESS:
            return f"{text} (default: {_show(action.default).replace('%', '%%')})"
        return text

"""Loading models: official ``.pth`` checkpoints, HF-style directories, bare state dicts, bundled models.

Nothing here ``eval``\\ s a string or unpickles arbitrary objects: the constructor string in an
official checkpoint's ``args.model`` is parsed with :mod:`ast` and accepted only when it is a
plain call with literal keyword arguments, and ``torch.load`` runs with ``weights_only=True``
(``argparse.Namespace`` allow-listed).
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import os
import re
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .adapters import base as adapters_base
from .adapters.base import Adapter, MultiViewModel
from . import hub
from .errors import CheckpointError
from .hub import save_pretrained  # noqa: F401 - its home was this module
from .io import TMP_GLOB, atomic_write, remove_stale_tmp  # noqa: F401 - their home was this module

BUNDLED_DIR = Path(__file__).parent / "weights"
_LITERAL_NAMES = {"inf": math.inf, "True": True, "False": False, "None": None}


# --------------------------------------------------------------------------------------
# Constructor strings
# --------------------------------------------------------------------------------------


def parse_constructor(text: str) -> tuple[str, dict[str, Any]]:
    """Parse ``"Cls(a=1, b=('exp', -inf, inf))"`` into ``("Cls", {...})`` without eval.

    Only a call of a bare name with keyword arguments whose values are literals (numbers,
    strings, booleans, None, ``inf``, tuples/lists/dicts of those, ``dict(key=literal, …)``,
    unary minus) is accepted;
    anything else raises :class:`CheckpointError` naming the offending part.
    """
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError as e:
        raise CheckpointError(f"checkpoint args.model is not a constructor call: {text!r} ({e.msg})") from None
    call = tree.body
    if not isinstance(call, ast.Call) or not isinstance(call.func, ast.Name):
        raise CheckpointError(
            f"refusing checkpoint: args.model must be a plain constructor call like 'AsymmetricCroCo3DStereo(...)', "
            f"got {ast.unparse(call)[:120]!r}"
        )
    if call.args:
        raise CheckpointError(
            f"refusing checkpoint: positional arguments in {call.func.id}(...) are not supported; "
            f"found {ast.unparse(call.args[0])[:80]!r}"
        )
    kwargs: dict[str, Any] = {}
    for kw in call.keywords:
        if kw.arg is None:
            raise CheckpointError(f"refusing checkpoint: '**{ast.unparse(kw.value)}' in args.model is not a literal")
        kwargs[kw.arg] = _literal(kw.value, kw.arg)
    return call.func.id, kwargs


def _literal(node: ast.AST, arg: str) -> Any:
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float, str, bool, type(None))):
        return node.value
    if isinstance(node, ast.Name) and node.id in _LITERAL_NAMES:
        return _LITERAL_NAMES[node.id]
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        val = _literal(node.operand, arg)
        if isinstance(val, (int, float)) and not isinstance(val, bool):
            return -val if isinstance(node.op, ast.USub) else val
    if isinstance(node, (ast.Tuple, ast.List)):
        vals = [_literal(e, arg) for e in node.elts]
        return tuple(vals) if isinstance(node, ast.Tuple) else vals
    if isinstance(node, ast.Dict) and all(k is not None for k in node.keys):
        return {_literal(k, arg): _literal(v, arg) for k, v in zip(node.keys, node.values)}
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "dict"
            and not node.args and all(kw.arg is not None for kw in node.keywords)):
        # ``dict(a=1, b='x')`` — how Fast3R strings spell their nested arguments; only literal values
        return {kw.arg: _literal(kw.value, f"{arg}.{kw.arg}") for kw in node.keywords}
    raise CheckpointError(
        f"refusing checkpoint: argument {arg}={ast.unparse(node)[:100]!r} is not a literal "
        "(mv_interp only loads constructor strings with literal arguments, never evaluates code)"
    )


# --------------------------------------------------------------------------------------
# Reading files
# --------------------------------------------------------------------------------------


def _refusal_detail(text: str) -> str:
    # name the offending global, never repeat torch's advice to load with weights_only=False
    m = re.search(r"(Unsupported global: GLOBAL [\w.]+|Unsupported operand \d+|[\w.]+ was not an allowed global)", text)
    return f" (found {m[1]})" if m else ""


def read_torch_file(path: str | os.PathLike) -> Any:
    """``torch.load`` with ``weights_only=True`` and ``argparse.Namespace`` allow-listed.

    A file that pickles anything else is *refused*; a file torch cannot parse (random bytes, a
    truncated download, another format) raises :class:`CheckpointError` naming it.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    zipped = zipfile.is_zipfile(path)  # only zip checkpoints can be memory-mapped
    try:
        with torch.serialization.safe_globals([argparse.Namespace]), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True, mmap=zipped)
    except OSError:
        raise
    except Exception as e:  # noqa: BLE001 - torch raises many types on foreign files
        text = str(e)
        never = ("mv_interp loads with weights_only=True and never unpickles other objects (they can run code); "
                 "if you trust the file, re-save its state dict as safetensors where it was made")
        if "Unsupported global" in text or "allowed global" in text:
            raise CheckpointError(f"refusing {path}: it pickles objects beyond tensors and argparse.Namespace"
                                  f"{_refusal_detail(text)}. {never}") from None
        if "weights_only" in text or "Unsupported operand" in text:
            raise CheckpointError(f"refusing {path}: the weights-only unpickler rejects it{_refusal_detail(text)}: it "
                                  f"is not a plain checkpoint of tensors (a pickle of other objects, a damaged "
                                  f"file, or no checkpoint at all). {never}") from None
        with open(path, "rb") as f:
            zip_magic = f.read(4) == b"PK\x03\x04"
        kind = ("a truncated or damaged zip checkpoint" if zipped or zip_magic
                else "not a PyTorch checkpoint (torch.save output)")
        raise CheckpointError(
            f"cannot read {path}: {kind} ({type(e).__name__}). Re-download or re-save it; mv_interp reads "
            "official .pth checkpoints, .safetensors files and HF-style directories"
        ) from None


def read_safetensors(path: str | os.PathLike) -> dict[str, Tensor]:
    """``safetensors.torch.load_file`` with an error naming the file when it is not valid safetensors."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    try:
        return load_file(str(path))
    except SafetensorError as e:
        raise CheckpointError(
            f"cannot read {path}: not a valid safetensors file ({e}); it is probably truncated or another format. "
            "Re-download it, or re-save the weights with mv_interp.save_pretrained / safetensors.torch.save_file"
        ) from None


def check_finite_weights(state_dict: Mapping[str, Tensor], source: str) -> None:
    """Raise :class:`CheckpointError` naming the tensors that hold NaN or inf."""
    bad = [k for k, v in state_dict.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise CheckpointError(
            f"{source}: {len(bad)} weight tensor(s) hold NaN or inf ({', '.join(bad[:5])}{more}); the model would "
            "output NaN. The checkpoint is damaged or from a diverged training run: use another one"
        )


def read_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    path = Path(path)
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    obj = read_torch_file(path)
    if isinstance(obj, Mapping) and "model" in obj and isinstance(obj["model"], Mapping):
        obj = obj["model"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} does not hold a state dict (a mapping of names to tensors)")
    return dict(obj)


# --------------------------------------------------------------------------------------
# Resolving configs
# --------------------------------------------------------------------------------------


def _adapter_for_constructor(class_name: str) -> Adapter:
    for a in adapters_base.adapters():
        if class_name in a.constructor_names:
            return a
    known = sorted(n for a in adapters_base.adapters() for n in a.constructor_names)
    raise CheckpointError(f"unknown model class {class_name!r} in checkpoint; known classes: {known}")


def config_from_hf(cfg: dict[str, Any], family: str | None = None) -> tuple[Adapter, Any]:
    """(adapter, config) from an HF-style ``config.json`` dict."""
    cfg = {k: adapters_base.config_value(v) for k, v in cfg.items()}
    saved = cfg.pop("mv_interp_family", None)
    if family is not None:
        adapters_base.get_adapter(family)  # an unknown name fails here, with the registered ones
        if saved is not None and saved != family:
            raise CheckpointError(f"family={family!r} contradicts the config.json, which says mv_interp_family="
                                  f"{saved!r}; leave the family out (it is read from the config) or fix the file")
    family = saved or family
    cfg.pop("architecture", None)
    cfg.pop("architectures", None)
    if family is not None:
        adapter = adapters_base.get_adapter(family)
    else:
        matches = [a for a in adapters_base.adapters() if a.matches_hf_config and a.matches_hf_config(cfg)]
        if len(matches) != 1:
            names = [a.name for a in matches] or "none"
            raise CheckpointError(
                f"cannot tell the model family of this config.json (matching adapters: {names}); "
                "pass family='dust3r' (or another registered name) to load_model"
            )
        adapter = matches[0]
    return adapter, adapter.config_from_kwargs(cfg)


def resolve_config(config: Any, family: str | None) -> tuple[Adapter, Any]:
    """A config given as a name (``"224_linear"``, ``"dust3r:512_dpt"``), dict or dataclass."""
    if isinstance(config, str):
        fam, _, name = config.rpartition(":")
        fam = fam or family
        candidates = [adapters_base.get_adapter(fam)] if fam else adapters_base.adapters()
        for a in candidates:
            if name in a.named_configs:
                return a, a.named_configs[name]
        known = sorted(f"{a.name}:{n}" for a in adapters_base.adapters() for n in a.named_configs)
        raise CheckpointError(f"unknown config name {config!r}; known: {known}")
    if isinstance(config, Mapping):
        return config_from_hf(dict(config), family)
    for a in adapters_base.adapters():
        if type(config) is a.config_cls:
            return a, config
    raise CheckpointError(f"cannot use {type(config).__name__} as a config; pass a name, a dict or a config dataclass")


# --------------------------------------------------------------------------------------
# Building and loading
# --------------------------------------------------------------------------------------


def load_state_dict_strict(model: MultiViewModel, state_dict: Mapping[str, Tensor], source: str = "checkpoint") -> None:
    """``load_state_dict(strict=True)`` with one error that lists every difference."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    shapes = sorted(
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
        for k in set(own) & set(state_dict)
        if tuple(own[k].shape) != tuple(state_dict[k].shape)
    )
    if missing or unexpected or shapes:

        def block(title: str, items: list[str]) -> str:
            if not items:
                return ""
            more = f"\n    … and {len(items) - 20} more" if len(items) > 20 else ""
            return f"\n  {title} ({len(items)}):\n    " + "\n    ".join(items[:20]) + more

        raise CheckpointError(
            f"{source} does not match {type(model).__name__}({model.config.__class__.__name__}):"
            + block("missing keys", missing)
            + block("unexpected keys", unexpected)
            + block("shape mismatches", shapes)
            + "\nCheck that the config matches the checkpoint (config=... / the checkpoint's args)."
        )
    model.load_state_dict(dict(state_dict), strict=True)


def build_model(adapter: Adapter, config: Any, state_dict: Mapping[str, Tensor] | None = None,
                source: str = "state dict") -> MultiViewModel:
    model = adapter.build(config)
    if state_dict is not None:
        state_dict = adapter.convert_state_dict(dict(state_dict), config)
        check_finite_weights(state_dict, source)
        load_state_dict_strict(model, state_dict, source)
    return model.eval()


def load_hooked_from_hub(name: str, config: Any = None, family: str | None = None, revision: str | None = None,
                         filename: str | None = None, cache_dir: str | os.PathLike | None = None,
                         token: str | bool | None = None, local_files_only: bool | None = None) -> MultiViewModel:
    """The hooked module of hub id ``name`` (see :func:`mv_interp.load_model`)."""
    parsed = hub.parse_repo_id(name)
    if parsed is None:
        raise hub.HubError(f"{name!r} is not a hub id (expected 'org/name' or 'org/name@revision')")
    repo_id, rev = parsed
    if rev is not None and revision is not None and rev != revision:
        raise ValueError(f"{name!r} names revision {rev!r} but revision={revision!r} was passed; give one")
    paths = hub.resolve(repo_id, revision or rev, config, filename, cache_dir, token, local_files_only)
    if len(paths) == 2:  # config.json + weights
        return load_dir(paths[0], paths[1], config, family)
    return load_hooked(paths[0], config=config, family=family)


def load_hooked(path_or_name: Any, config: Any = None, family: str | None = None, **hub_options: Any) -> MultiViewModel:
    """The hooked torch module (no nnsight wrapper) — see :func:`mv_interp.load_model`. ``hub_options``
    (``revision``, ``filename``, ``cache_dir``, ``token``, ``local_files_only``) apply to hub ids only."""
    if isinstance(path_or_name, Mapping):
        if config is None:
            raise CheckpointError("a bare state dict needs config= (a name such as '224_linear', a dict or a config)")
        adapter, cfg = resolve_config(config, family)
        return build_model(adapter, cfg, path_or_name)

    name = str(path_or_name)
    path = Path(name)
    if not path.exists() and (BUNDLED_DIR / name).is_dir():
        path = BUNDLED_DIR / name
    if path.is_dir():
        return _load_dir(path, config, family)
    if not path.exists():
        if hub.parse_repo_id(name) is not None:
            return load_hooked_from_hub(name, config, family, **hub_options)
        bundled = sorted(p.name for p in BUNDLED_DIR.iterdir() if p.is_dir()) if BUNDLED_DIR.is_dir() else []
        raise FileNotFoundError(
            f"no checkpoint at {name!r} and no bundled model of that name (bundled: {bundled}); "
            "give a .pth file, an HF-style directory (config.json + model.safetensors), a bundled name or a "
            "hub id ('org/name')"
        )
    if path.suffix == ".safetensors":
        if config is None:
            raise CheckpointError(f"{path.name} is a bare state dict: pass config= (e.g. '224_linear')")
        adapter, cfg = resolve_config(config, family)
        return build_model(adapter, cfg, read_state_dict(path), source=str(path))
    obj = read_torch_file(path)
    if isinstance(obj, Mapping) and "model" in obj:
        sd = obj["model"]
        if config is not None:
            adapter, cfg = resolve_config(config, family)
        else:
            args = obj.get("args")
            text = getattr(args, "model", None) if args is not None else None
            if not isinstance(text, str):
                raise CheckpointError(f"{path.name} has no args.model constructor string: pass config=")
            cls_name, kwargs = parse_constructor(text)
            adapter = adapters_base.get_adapter(family) if family else _adapter_for_constructor(cls_name)
            cfg = adapter.config_from_kwargs(kwargs)
        return build_model(adapter, cfg, sd, source=str(path))
    if isinstance(obj, Mapping) and all(isinstance(v, Tensor) for v in obj.values()):
        if config is None:
            raise CheckpointError(f"{path.name} is a bare state dict: pass config= (e.g. '224_linear')")
        adapter, cfg = resolve_config(config, family)
        return build_model(adapter, cfg, obj, source=str(path))
    raise CheckpointError(f"{path} is neither an official checkpoint (dict with 'model' and 'args') nor a state dict")


def _load_dir(path: Path, config: Any, family: str | None) -> MultiViewModel:
    cfg_file, weights = path / "config.json", path / "model.safetensors"
    missing = [p.name for p in (cfg_file, weights) if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{path} is not an HF-style model directory: missing {missing}")
    return load_dir(cfg_file, weights, config, family)


def load_dir(cfg_file: Path, weights: Path, config: Any = None, family: str | None = None) -> MultiViewModel:
    """A model from an HF-style ``config.json`` and its weights (``config=`` overrides the file)."""
    if config is not None:
        adapter, cfg = resolve_config(config, family)
    else:
        try:
            data = json.loads(cfg_file.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{cfg_file} is not valid JSON: {e}") from None
        adapter, cfg = config_from_hf(data, family)
    return build_model(adapter, cfg, read_state_dict(weights), source=str(weights))




"""A local Hugging Face hub cache written by hand, in the hub's own layout, so loading by hub id is
tested offline: ``models--org--name/{blobs/<sha256>, snapshots/<commit>/<file> -> blob, refs/main}``."""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch


def add_repo(cache: Path, repo_id: str, files: Mapping[str, Path | bytes], revision: str = "main") -> Path:
    """Put ``files`` (name -> source file or bytes) into ``cache`` as snapshot ``revision`` of ``repo_id``;
    returns the snapshot folder."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    commit = hashlib.sha1(f"{repo_id}@{revision}:{sorted(files)}".encode()).hexdigest()
    snap = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snap.mkdir(parents=True, exist_ok=True)
    for name, src in files.items():
        data = src if isinstance(src, bytes) else Path(src).read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snap / name
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(blob, link.parent), link)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / revision).write_text(commit)
    return snap


def upstream_config_json(config: Mapping[str, Any], **extra: Any) -> bytes:
    """``config.json`` as ``PyTorchModelHubMixin`` writes it: the constructor's kwargs, infinities
    as JSON's ``Infinity``."""

    def real(v: Any) -> Any:
        if v in ("inf", "-inf"):
            return math.inf if v == "inf" else -math.inf
        if isinstance(v, list):
            return [real(x) for x in v]
        if isinstance(v, dict):
            return {k: real(x) for k, x in v.items()}
        return v

    return json.dumps({**real(dict(config)), **extra}, indent=2).encode()


def safetensors_bytes(state_dict: Mapping[str, torch.Tensor], tmp: Path) -> bytes:
    from safetensors.torch import save_file

    path = tmp / "weights.safetensors"
    save_file({k: v.clone().contiguous() for k, v in state_dict.items()}, str(path))  # aliases: own storage
    data = path.read_bytes()
    path.unlink()
    return data

"""Models on the Hugging Face hub: ``load_model("<org>/<repo>")``, ``MVModel.from_pretrained``, ``push_to_hub``.

A hub id resolves to files in the local hub cache (``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else
``~/.cache/huggingface/hub``), downloading them only when they are not cached and the hub may be
reached; with ``HF_HUB_OFFLINE=1`` (or ``local_files_only=True``) only the cache is read. Nothing is
downloaded at import.

What is read from a repository, in this order (the first layout present wins):

1. ``config.json`` + ``model.safetensors`` — the ``PyTorchModelHubMixin`` layout of the upstream
   DUSt3R, MASt3R, Fast3R and VGGT repos, and what :func:`save_pretrained` / :func:`push_to_hub`
   write. The family comes from ``mv_interp_family`` in the config, else from the adapter whose
   ``matches_hf_config`` recognises it, so a new family plugs in through its adapter alone;
2. one official ``.pth`` checkpoint (``{"model", "args"}``, read with ``weights_only=True``);
3. one bare ``.safetensors`` / ``.pth`` state dict, with the repository's ``config.json`` or ``config=``.

``filename=`` picks a file explicitly when a repository holds several.

>>> model = mv_interp.load_model("naver/DUSt3R_ViTLarge_BaseDecoder_512_dpt", device="cuda")
>>> model = MVModel.from_pretrained("me/my-dust3r", revision="v1")
>>> model.push_to_hub("me/my-dust3r")                     # what from_pretrained reads back
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .adapters.base import MultiViewModel, adapter_for_model
from .errors import CheckpointError
from .io import atomic_write, write_json
from .types import ModelLike, as_module

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CHECKPOINT_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
_FILE_SUFFIXES = CHECKPOINT_SUFFIXES + (".safetensors", ".json")
# ``org/name`` or ``org/name@revision``: the hub's own rules (letters, digits, ``-``, ``_``, ``.``)
_REPO_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+?)(?:@(?P<rev>[\w./-]+))?$")
_TRUE = {"1", "on", "yes", "true"}


class HubError(FileNotFoundError):
    """A hub id that cannot be resolved to local files; the message says why and what to do."""


def parse_repo_id(name: Any) -> tuple[str, str | None] | None:
    """``(repo_id, revision)`` when ``name`` is spelled as a hub id (``"org/name"``, ``"org/name@rev"``),
    else ``None``. A name whose last part ends in a file suffix (``runs/model.pth``) is a path."""
    if not isinstance(name, str) or name.lower().endswith(_FILE_SUFFIXES):
        return None
    m = _REPO_ID.match(name)
    if m is None or ".." in m["repo"] or m["repo"].endswith((".", "-")):
        return None
    return m["repo"], m["rev"]


def cache_dir(explicit: str | os.PathLike | None = None) -> Path:
    """The hub cache this process reads, from the environment at call time (``HF_HUB_CACHE``,
    ``HF_HOME``), so a test or a notebook may set them after ``huggingface_hub`` was imported."""
    if explicit is not None:
        return Path(explicit)
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def is_offline(local_files_only: bool | None = None) -> bool:
    """``local_files_only`` if given, else ``HF_HUB_OFFLINE`` (read now, not at import)."""
    if local_files_only is not None:
        return bool(local_files_only)
    if "HF_HUB_OFFLINE" in os.environ:
        return os.environ["HF_HUB_OFFLINE"].strip().lower() in _TRUE
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def choose_files(files: Sequence[str], config: Any = None, filename: str | None = None,
                 repo_id: str = "the repository") -> list[str]:
    """Which files of a repository to fetch (see the module docstring for the order): ``[config.json,
    weights]`` when the repository has a ``config.json`` and no ``config=`` overrides it, else ``[weights]``."""
    sidecar = [CONFIG_NAME] if config is None and CONFIG_NAME in files else []
    if filename is not None:
        if filename not in files:
            raise HubError(f"{repo_id} has no file {filename!r}; its files: {sorted(files)}")
        return [s for s in sidecar if s != filename] + [filename]
    if CONFIG_NAME in files and WEIGHTS_NAME in files:
        return sidecar + [WEIGHTS_NAME]
    weights = sorted(f for f in files if "/" not in f and f.endswith(CHECKPOINT_SUFFIXES + (".safetensors",)))
    if len(weights) > 1:
        raise HubError(f"{repo_id} holds several weight files {weights} and no {CONFIG_NAME} + {WEIGHTS_NAME}: "
                       f"pass filename= (one of them)")
    if not weights:
        raise HubError(f"{repo_id} holds no model files ({CONFIG_NAME} + {WEIGHTS_NAME}, a .pth checkpoint or a "
                       f".safetensors state dict); its files: {sorted(files)}")
    if weights[0].endswith(".safetensors") and config is None and not sidecar:
        raise CheckpointError(f"{repo_id} holds the bare state dict {weights[0]} without {CONFIG_NAME}: "
                              "pass config= (e.g. '224_linear'; --model-config on the command line)")
    return sidecar + weights


def _not_cached(repo_id: str, revision: str | None, cache: Path, why: str) -> HubError:
    rev = f" at revision {revision!r}" if revision else ""
    return HubError(
        f"{repo_id}{rev} is not in the local hub cache {cache} and {why}. Fetch it once with network "
        f"access (the same call without HF_HUB_OFFLINE, or `hf download {repo_id}`), point HF_HOME / "
        "HF_HUB_CACHE at a cache that holds it, or pass a local file or directory instead")


def _cached_files(repo_id: str, revision: str | None, cache: Path) -> list[str] | None:
    """Files of the cached snapshot of ``repo_id`` (``None`` when it is not cached)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        folder = Path(snapshot_download(repo_id, revision=revision, cache_dir=cache, local_files_only=True))
    except LocalEntryNotFoundError:
        return None
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def resolve(repo_id: str, revision: str | None = None, config: Any = None, filename: str | None = None,
            cache: str | os.PathLike | None = None, token: str | bool | None = None,
            local_files_only: bool | None = None) -> list[Path]:
    """Local paths of the files of ``repo_id`` that hold the model (fetched into the cache if needed)."""
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    cache_path = cache_dir(cache)
    offline = is_offline(local_files_only)
    if offline:
        files = _cached_files(repo_id, revision, cache_path)
        if files is None:
            raise _not_cached(repo_id, revision, cache_path, "HF_HUB_OFFLINE / local_files_only forbids a download")
    else:
        try:
            files = HfApi().list_repo_files(repo_id, revision=revision, token=token)
        except GatedRepoError:
            raise HubError(f"{repo_id} is gated: accept its terms on the hub and log in (`hf auth login`) "
                           "or pass token=") from None
        except RepositoryNotFoundError:
            raise HubError(f"no local file or directory {repo_id!r}, and the hub has no repository {repo_id!r} "
                           "(or it is private: log in or pass token=)") from None
        except RevisionNotFoundError:
            raise HubError(f"{repo_id} has no revision {revision!r}") from None
        except HfHubHTTPError:
            raise  # the hub answered with an error of its own: keep its message
        except Exception as e:  # noqa: BLE001 -- no connection (httpx/requests errors): read the cache as offline
            files = _cached_files(repo_id, revision, cache_path)
            if files is None:
                raise _not_cached(repo_id, revision, cache_path,
                                  f"the hub cannot be reached ({type(e).__name__}: {e})") from None
            offline = True
    chosen = choose_files(files, config, filename, repo_id)
    paths = []
    for name in chosen:
        try:
            paths.append(Path(hf_hub_download(repo_id, name, revision=revision, cache_dir=cache_path, token=token,
                                              local_files_only=offline)))
        except LocalEntryNotFoundError:
            raise _not_cached(repo_id, revision, cache_path, f"its cached snapshot lacks {name}") from None
        except EntryNotFoundError:
            raise HubError(f"{repo_id} has no file {name!r}") from None
    return paths


# --------------------------------------------------------------------------------------
# Writing: save_pretrained's files plus a model card, uploaded
# --------------------------------------------------------------------------------------


def save_pretrained(model: ModelLike, directory: str | os.PathLike, extra: Mapping[str, Any] | None = None) -> Path:
    """Write ``config.json`` + ``model.safetensors`` (HF style), each atomically."""
    from safetensors.torch import save_file

    module: MultiViewModel = as_module(model)
    adapter = adapter_for_model(module)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cfg = {"mv_interp_family": adapter.name, **module.config.to_dict(), **(extra or {})}
    sd = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    atomic_write(directory / "model.safetensors", lambda p: save_file(sd, str(p)))
    write_json(directory / "config.json", cfg, indent=2)
    return directory


def model_card(model: ModelLike, repo_id: str) -> str:
    """A short README.md for a pushed model: what it is and how to load it."""
    from . import __version__
    module = as_module(model)
    family = adapter_for_model(module).name
    n_params = sum(p.numel() for p in module.parameters())
    return (f"---\nlibrary_name: mv-interp\ntags:\n- mv-interp\n- {family}\n- multi-view\n- 3d-reconstruction\n---\n\n"
            f"# {repo_id}\n\nA {family} model ({n_params / 1e6:.1f} M parameters) in the layout of "
            f"[mv_interp](https://pypi.org/project/mv-interp/) {__version__}: `config.json` (with "
            "`mv_interp_family`) and `model.safetensors`.\n\n```python\nimport mv_interp\n\n"
            f"model = mv_interp.load_model(\"{repo_id}\")\n```\n")


def push_to_hub(model: ModelLike, repo_id: str, *, private: bool | None = None, token: str | bool | None = None,
                revision: str | None = None, commit_message: str | None = None, create_pr: bool = False,
                card: bool = True, extra: Mapping[str, Any] | None = None):
    """Upload what :func:`mv_interp.save_pretrained` writes (plus a model card) to ``repo_id``, creating
    the repository if needed; ``load_model(repo_id)`` reads it back. Returns the hub's commit info."""
    from huggingface_hub import HfApi

    if parse_repo_id(repo_id) is None or "@" in repo_id:
        raise ValueError(f"push_to_hub: {repo_id!r} is not a repository id ('org/name'); pass revision= for a branch")
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, token=token)
    with tempfile.TemporaryDirectory(prefix="mv_interp_push_") as tmp:
        save_pretrained(model, tmp, extra)
        if card:
            (Path(tmp) / "README.md").write_text(model_card(model, repo_id))
        return api.upload_folder(repo_id=repo_id, folder_path=tmp, revision=revision, token=token,
                                 commit_message=commit_message or "Upload model with mv_interp",
                                 create_pr=create_pr)

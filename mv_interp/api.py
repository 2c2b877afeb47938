"""Top-level entry points."""

from __future__ import annotations

from typing import Any

import torch

from .loading import BUNDLED_DIR, load_hooked
from .model import MVModel, wrap


def load_model(path_or_name: Any, device: str | torch.device = "cpu", config: Any = None, family: str | None = None,
               dtype: torch.dtype | None = None, *, revision: str | None = None, filename: str | None = None,
               cache_dir: Any = None, token: str | bool | None = None, local_files_only: bool | None = None) -> MVModel:
    """Load a multi-view model, hooked and wrapped in nnsight.

    ``path_or_name`` is one of

    * an official checkpoint ``.pth`` (``{"model": state_dict, "args": Namespace(model="AsymmetricCroCo3DStereo(...)")}``),
      read with ``weights_only=True`` and a constructor string parsed without ``eval``;
    * an HF-style directory with ``config.json`` + ``model.safetensors``;
    * a bare state dict (a mapping, a ``.pth`` or ``.safetensors`` file) together with ``config=``
      — a known name (``"224_linear"``, ``"512_linear"``, ``"512_dpt"``), a dict or a config dataclass;
    * the name of a bundled model (see :func:`list_models`);
    * a Hugging Face hub id ``"org/name"`` (or ``"org/name@revision"``) of any family — the upstream
      ``config.json`` + ``model.safetensors`` repos, a ``.pth`` checkpoint repo, or one pushed by
      :meth:`MVModel.push_to_hub` — read from the local hub cache (``HF_HOME``), fetched only when
      missing and ``HF_HUB_OFFLINE`` is unset (:mod:`mv_interp.hub`). ``revision``, ``filename``
      (which file of the repo), ``cache_dir``, ``token`` and ``local_files_only`` apply to hub ids only.

    Loading is strict: missing, unexpected or mis-shaped keys raise one error that lists them.

    >>> model = load_model("DUSt3R_ViTLarge_BaseDecoder_224_linear.pth", device="cuda")
    >>> model = load_model(state_dict, config="512_dpt")
    >>> model = load_model("naver/DUSt3R_ViTLarge_BaseDecoder_512_dpt")
    """
    device = check_device(device)
    hub = {k: v for k, v in dict(revision=revision, filename=filename, cache_dir=cache_dir, token=token,
                                 local_files_only=local_files_only).items() if v is not None}
    module = load_hooked(path_or_name, config=config, family=family, **hub)
    module = module.to(device=device, dtype=dtype) if dtype is not None else module.to(device)
    return wrap(module)


def check_device(device: str | torch.device) -> torch.device:
    """``torch.device(device)``, or a :class:`~mv_interp.errors.UserError` saying which devices exist here."""
    from .errors import UserError

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise UserError(f"device={device!r} is not a torch device ({str(e).splitlines()[0]}); use 'cpu', 'cuda', "
                        "'cuda:1' or 'mps'") from None
    here = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise UserError(f"device={device!r}, but no CUDA GPU is available here (torch {torch.__version__}, "
                            f"CUDA build: {torch.version.cuda or 'no'}); use device='cpu'")
        if dev.index is not None and dev.index >= n:
            raise UserError(f"device={device!r}, but this machine has {n} GPU(s): {here[1:]}")
    elif dev.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise UserError(f"device={device!r}, but MPS (Apple GPU) is not available here; use one of {here}")
    elif dev.type != "cpu":
        try:
            torch.empty(0, device=dev)
        except Exception as e:  # noqa: BLE001 - each backend fails in its own way
            raise UserError(f"device={device!r} cannot be used here ({type(e).__name__}); use one of {here}") from None
    return dev


def list_models() -> list[str]:
    """Names of the models bundled with the package (loadable offline by name)."""
    if not BUNDLED_DIR.is_dir():
        return []
    return sorted(p.name for p in BUNDLED_DIR.iterdir() if (p / "config.json").is_file())

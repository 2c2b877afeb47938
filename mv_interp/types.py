"""The model handle every generic tool takes, and the one way to reach the hooked module.

A *model* in mv_interp is either

* an :class:`~mv_interp.model.MVModel` — what :func:`mv_interp.load_model` returns: the hooked
  module wrapped in nnsight (``trace``, ``run_with_cache``, ``run_with_hooks``), or
* a bare :class:`~mv_interp.adapters.base.MultiViewModel` — the hooked torch module itself
  (TransformerLens-style hooks only; no nnsight).

Generic entry points (probes, head scores, interventions, the report, training) are typed
``model: ModelLike`` and call :func:`as_module` once to get the hooked module, which declares
everything they need (config, probe sites, attention sites, lens)::

    >>> from mv_interp.types import as_module
    >>> module = as_module(mv_interp.load_model("dust3r-toy"))   # the HookedDUSt3R inside
    >>> as_module(module) is module                               # a module is its own module
    True

This module sits at the bottom of the import graph: it imports only :mod:`mv_interp.hooks` and :mod:`mv_interp.errors`,
so every layer above (adapters, data, probes, heads, …) may use it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Union

from torch import Tensor

from .errors import WrongTypeError
from .hooks import HookedRootModule

if TYPE_CHECKING:  # annotations only: the classes live above this module
    from .adapters.base import MultiViewModel
    from .model import MVModel

#: What generic entry points take as ``model``: the nnsight wrapper or the hooked module.
ModelLike = Union["MVModel", "MultiViewModel"]

#: One view as a model input: an image tensor ``[batch, 3, H, W]`` (or one ``[3, H, W]`` image),
#: a view dict with ``img`` (the :mod:`mv_interp.data` format) or an image file.
ViewInput = Union[Tensor, Mapping[str, Tensor], str, os.PathLike]
#: The views of one forward, view 1 first (what ``model(*views)`` and the interventions take).
ViewInputs = Sequence[ViewInput]


def as_module(model: ModelLike) -> MultiViewModel:
    """The hooked :class:`~mv_interp.adapters.base.MultiViewModel` behind ``model``.

    ``model`` is an :class:`~mv_interp.model.MVModel` (its public ``.module``) or the module
    itself. Anything else is a :class:`~mv_interp.errors.WrongTypeError` (a ``TypeError``) that
    says what to pass.
    """
    module = model if isinstance(model, HookedRootModule) else getattr(model, "module", None)
    if not isinstance(module, HookedRootModule) or not hasattr(module, "probe_sites"):
        raise WrongTypeError(f"expected an mv_interp model (mv_interp.load_model(...), an MVModel or a "
                        f"MultiViewModel), got {type(model).__name__}")
    return module  # type: ignore[return-value]


def is_traced(model: ModelLike) -> bool:
    """Whether ``model`` is the nnsight wrapper (it can ``trace``), not the bare hooked module."""
    return not isinstance(model, HookedRootModule) and isinstance(getattr(model, "module", None), HookedRootModule)

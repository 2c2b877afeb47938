"""Token sets: which query / key / position tokens an intervention touches.

A :class:`Tokens` is data (it round-trips JSON) and is resolved against a concrete
activation at run time, because the number of tokens depends on the input size and a
rule such as "the k most-attended keys" depends on the input itself.

JSON forms (what ``Tokens.parse`` accepts, and what ``Tokens.to_json_value`` writes)::

    "all"                                  every token
    [3, 17, 20]                            token indices (row-major over the patch grid)
    {"mask": [false, true, ...]}           a boolean mask over the tokens
    {"top_attended": 5}                    keys only: the 5 keys with the largest attention,
                                           averaged over every query of the attention block
    {"top_attended": 5, "pool_heads": true}  … averaged over the selected heads too (one set)
    "others"                               queries only: every query token that is not among
                                           the selected keys (self-attention within one view)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Union

import numpy as np
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from ..errors import OutOfRangeError

KINDS = ("all", "index", "mask", "top_attended", "others")


@dataclass(frozen=True)
class Tokens:
    """A set of token positions, given explicitly or by a rule.

    Build one with :meth:`all`, :meth:`at`, :meth:`where`, :meth:`top_attended`,
    :meth:`others` or :meth:`parse` (which also takes the JSON forms above).
    """

    kind: str = "all"
    """``"all"``, ``"index"``, ``"mask"``, ``"top_attended"`` (keys only) or ``"others"`` (queries only)."""
    index: tuple[int, ...] = ()
    """Token indices (``kind="index"``), 0-based, row-major over the patch grid of one view."""
    mask: tuple[bool, ...] = ()
    """Boolean mask over the tokens (``kind="mask"``); its length must equal the number of tokens."""
    k: int = 0
    """How many keys ``top_attended`` selects (per example and head)."""
    pool_heads: bool = False
    """``top_attended`` only: average the attention over the selected heads too, so every
    selected head loses the same keys (otherwise each head loses its own top k)."""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"Tokens kind {self.kind!r} is not one of {KINDS}")
        object.__setattr__(self, "index", tuple(int(i) for i in self.index))
        object.__setattr__(self, "mask", tuple(bool(m) for m in self.mask))
        if self.kind == "index":
            bad = [i for i in self.index if i < 0]
            if bad:
                raise ValueError(f"token indices must be >= 0 (row-major over the patch grid), got {bad}")
            if len(set(self.index)) != len(self.index):
                raise ValueError(f"token indices repeat: {list(self.index)}")
        elif self.index:
            raise ValueError(f"Tokens(kind={self.kind!r}) takes no index; use kind='index'")
        if self.kind != "mask" and self.mask:
            raise ValueError(f"Tokens(kind={self.kind!r}) takes no mask; use kind='mask'")
        if self.kind == "top_attended":
            if self.k < 1:
                raise ValueError(f"top_attended needs k >= 1, got k={self.k}")
        elif self.k:
            raise ValueError(f"k is only used by kind='top_attended', got k={self.k} with kind={self.kind!r}")
        if self.pool_heads and self.kind != "top_attended":
            raise ValueError("pool_heads is only used by kind='top_attended'")

    # -- constructors -----------------------------------------------------------------------
    @classmethod
    def all(cls) -> Tokens:
        """Every token."""
        return cls("all")

    @classmethod
    def at(cls, *index: int) -> Tokens:
        """Explicit indices: ``Tokens.at(3, 17)``."""
        return cls("index", index=tuple(index))

    @classmethod
    def where(cls, mask: Any) -> Tokens:
        """A boolean mask over the tokens (list, numpy array or 1-D bool tensor)."""
        flat = torch.as_tensor(mask)
        if flat.dtype != torch.bool or flat.ndim != 1:
            raise ValueError(
                f"a token mask must be 1-D boolean over the tokens, got dtype {flat.dtype} and shape "
                f"{tuple(flat.shape)}; flatten a patch-grid mask row-major (mask.flatten())"
            )
        return cls("mask", mask=tuple(flat.tolist()))

    @classmethod
    def top_attended(cls, k: int, pool_heads: bool = False) -> Tokens:
        """Keys only: the ``k`` keys with the most attention averaged over the block's queries,
        computed from this run's pattern at the site before the knockout (the clean pattern
        when nothing upstream was changed) — the paper's register tokens."""
        return cls("top_attended", k=k, pool_heads=pool_heads)

    @classmethod
    def others(cls) -> Tokens:
        """Queries only: every query that is not one of the selected keys."""
        return cls("others")

    @classmethod
    def parse(cls, value: Any) -> Tokens:
        """A :class:`Tokens` from any accepted form (see the module docstring)."""
        if isinstance(value, Tokens):
            return value
        if isinstance(value, str):
            if value in ("all", "others"):
                return cls(value)
            raise ValueError(f"unknown token set {value!r}; use 'all', 'others', a list of indices, "
                             "{'mask': [...]} or {'top_attended': k}")
        if isinstance(value, Mapping):
            if "kind" in value:
                return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in value.items()})
            if set(value) == {"mask"}:
                return cls.where(list(value["mask"]))
            if "top_attended" in value and set(value) <= {"top_attended", "pool_heads"}:
                return cls.top_attended(int(value["top_attended"]), bool(value.get("pool_heads", False)))
            raise ValueError(f"unknown token set {dict(value)!r}; use {{'mask': [...]}} or "
                             "{'top_attended': k[, 'pool_heads': bool]}")
        if isinstance(value, int) and not isinstance(value, bool):
            return cls.at(value)
        if isinstance(value, Tensor) or hasattr(value, "dtype"):
            t = torch.as_tensor(value)
            if t.dtype == torch.bool:
                return cls.where(t)
            if t.is_floating_point():
                raise ValueError(f"token indices must be integers, got a {t.dtype} tensor")
            return cls.at(*t.reshape(-1).tolist())
        if isinstance(value, Sequence):
            items = list(value)
            if not items:
                return cls.at()
            try:  # numpy / torch scalars as well as Python ints and bools
                t = torch.as_tensor(items)
            except (TypeError, ValueError, RuntimeError):
                t = None
            if t is not None and t.ndim == 1 and t.dtype == torch.bool:
                return cls.where(t)
            if t is not None and t.ndim == 1 and not t.is_floating_point() and not t.is_complex():
                return cls.at(*t.tolist())
        raise ValueError(f"cannot read a token set from {value!r}; use 'all', a list of indices, a boolean mask, "
                         "{'mask': [...]} or {'top_attended': k}")

    # -- JSON ---------------------------------------------------------------------------------
    def to_json_value(self) -> Any:
        """The compact JSON form (inverse of :meth:`parse`)."""
        if self.kind in ("all", "others"):
            return self.kind
        if self.kind == "index":
            return list(self.index)
        if self.kind == "mask":
            return {"mask": list(self.mask)}
        out: dict[str, Any] = {"top_attended": self.k}
        if self.pool_heads:
            out["pool_heads"] = True
        return out

    def replace(self, **changes: Any) -> Tokens:
        return dataclasses.replace(self, **changes)

    @property
    def is_rule(self) -> bool:
        """True when the set depends on the input (resolved from the attention pattern)."""
        return self.kind in ("top_attended", "others")

    @property
    def is_empty(self) -> bool:
        return (self.kind == "index" and not self.index) or (self.kind == "mask" and not any(self.mask))

    def describe(self) -> str:
        if self.kind == "index":
            return f"tokens {list(self.index)}"
        if self.kind == "mask":
            return f"{sum(self.mask)} masked tokens"
        if self.kind == "top_attended":
            return f"top-{self.k} attended keys" + (" (pooled over heads)" if self.pool_heads else " (per head)")
        return f"{self.kind} tokens"

    # -- resolution ---------------------------------------------------------------------------
    def static_mask(self, n: int, what: str) -> Bool[Tensor, " pos"] | None:
        """``[n]`` bool mask for index/mask/all sets; ``None`` for rules.

        ``what`` names the token axis in error messages (e.g. "keys of dec1.self.v2 (view 1)").
        """
        if self.kind == "all":
            return torch.ones(n, dtype=torch.bool)
        if self.kind == "index":
            bad = [i for i in self.index if i >= n]
            if bad:
                raise OutOfRangeError(f"token index {bad[0]} out of range for the {what}: it has {n} tokens "
                                 f"(valid: 0..{n - 1})")
            m = torch.zeros(n, dtype=torch.bool)
            m[list(self.index)] = True
            return m
        if self.kind == "mask":
            if len(self.mask) != n:
                raise ValueError(f"token mask has length {len(self.mask)} but the {what} has {n} tokens")
            return torch.tensor(self.mask, dtype=torch.bool)
        return None


TokenSpec = Union[Tokens, str, int, Sequence, Mapping, Tensor, np.ndarray]
"""What a spec field holding tokens accepts (normalised to :class:`Tokens`)."""


def top_attended_keys(
    pattern: Float[Tensor, "batch head q_pos k_pos"], k: int, pool_heads: bool = False
) -> Int[Tensor, "batch head k"]:
    """Indices of the ``k`` keys with the largest attention averaged over every query.

    With ``pool_heads`` the average also runs over the heads given, and the same ``k`` keys are
    returned for each head. Ties go to the lower index (``torch.topk`` on CPU is not guaranteed
    stable, so a tiny index-dependent offset breaks them deterministically).
    """
    n_keys = pattern.shape[-1]
    if k > n_keys:
        raise OutOfRangeError(f"top_attended k={k} exceeds the {n_keys} keys available (valid: 1..{n_keys})")
    # float64 so the tie-break offset stays far below any real difference of float32 means
    mass = pattern.float().mean(dim=-2).double()  # [batch, head, k_pos]
    if pool_heads:
        mass = mass.mean(dim=1, keepdim=True).expand_as(mass)
    tiebreak = torch.arange(n_keys, device=mass.device, dtype=mass.dtype) * 1e-15
    return (mass - tiebreak).topk(k, dim=-1).indices


def top_attended_mask(
    pattern: Float[Tensor, "batch head q_pos k_pos"], k: int, pool_heads: bool = False
) -> Bool[Tensor, "batch head k_pos"]:
    """:func:`top_attended_keys` as a boolean mask over the keys."""
    idx = top_attended_keys(pattern, k, pool_heads)
    mask = torch.zeros(pattern.shape[0], pattern.shape[1], pattern.shape[-1], dtype=torch.bool, device=pattern.device)
    return mask.scatter_(-1, idx, True)

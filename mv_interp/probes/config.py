"""What a probe is (:class:`ProbeSpec`) and how a set of probes is trained (:class:`TrainConfig`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..adapters.base import ConfigMixin
from ..errors import WrongTypeError

TARGETS = ("pointmap", "depth")
#: Channels per pixel a probe of each target predicts: xyz + confidence, or depth + confidence.
TARGET_CHANNELS = {"pointmap": 4, "depth": 2}
AMP_MODES = ("auto", "bf16", "off")
BACKBONES = ("model", "random")


@dataclass(frozen=True)
class ProbeSpec(ConfigMixin):
    """One kind of probe, trained at every site.

    Every probe reads one token at a time (no mixing across patches), maps it to
    ``channels · p²`` values, and pixel-shuffles them to a ``p × p`` patch of the output.
    """

    name: str = "mlp"
    """Label of this probe kind in tables, files and ``ProbeSet`` outputs (``"mlp"``, ``"linear"`` …)."""
    target: str = "pointmap"
    """``"pointmap"``: xyz + confidence, post-processed like the model's head (view 1's frame);
    ``"depth"``: the view's own z-depth ``depth_scale · exp(raw)`` + confidence (appendix E.4)."""
    n_layers: int = 5
    """Number of linear layers (ReLU between them); 1 is a linear probe."""
    width: int = 512
    """Hidden width of the MLP (unused when ``n_layers == 1``)."""
    input_norm: bool = True
    """Normalise each token with a parameter-free LayerNorm first (the model's own heads also read
    normalised tokens; residual streams carry a few very high-norm tokens). Per token: no mixing."""
    depth_scale: float = 1.0
    """``depth`` target only: the depth is ``depth_scale · exp(raw)``, so raw 0 maps to this depth
    (choose it near the data's typical depth, in the data's units)."""

    def __post_init__(self) -> None:
        if not self.name or not self.name.replace("_", "").replace("-", "").isalnum():
            raise ValueError(f"ProbeSpec.name={self.name!r}: use letters, digits, '-' or '_' (it names files)")
        if self.target not in TARGETS:
            raise ValueError(f"ProbeSpec.target={self.target!r}; expected one of {TARGETS}")
        if int(self.n_layers) < 1:
            raise ValueError(f"ProbeSpec.n_layers={self.n_layers}: need at least 1 (1 = linear probe)")
        if int(self.width) < 1:
            raise ValueError(f"ProbeSpec.width={self.width} must be positive")
        if not self.depth_scale > 0:
            raise ValueError(f"ProbeSpec.depth_scale={self.depth_scale} must be positive")

    @property
    def channels(self) -> int:
        """Values per output pixel (before post-processing)."""
        return TARGET_CHANNELS[self.target]

    def dims(self, d_in: int, patch_size: int) -> list[int]:
        """Layer widths ``[d_in, width, …, channels · p²]``."""
        return [d_in] + [self.width] * (self.n_layers - 1) + [self.channels * patch_size**2]


#: The probes of the paper: the 5-layer ReLU MLP, the linear ablation, the depth probe (E.4).
PRESETS: dict[str, ProbeSpec] = {
    "mlp": ProbeSpec("mlp", "pointmap", 5, 512),
    "linear": ProbeSpec("linear", "pointmap", 1),
    "depth": ProbeSpec("depth", "depth", 5, 512),
}


def probe_spec(value: str | ProbeSpec | Mapping[str, Any]) -> ProbeSpec:
    """A :class:`ProbeSpec` from a preset name (``"mlp"``, ``"linear"``, ``"depth"``), a dict or a spec."""
    if isinstance(value, ProbeSpec):
        return value
    if isinstance(value, str):
        if value not in PRESETS:
            raise ValueError(f"unknown probe preset {value!r}; presets: {sorted(PRESETS)} (or pass a ProbeSpec)")
        return PRESETS[value]
    if isinstance(value, Mapping):
        return ProbeSpec.from_dict(value)
    raise WrongTypeError(f"a probe is a preset name, a dict or a ProbeSpec; got {type(value).__name__}")


@dataclass(frozen=True)
class TrainConfig(ConfigMixin):
    """How a set of probes is trained (see :func:`mv_interp.probes.train_probes`).

    Data for step ``s`` is a pure function of ``(data_seed, s)``, so a resumed run reproduces
    an uninterrupted one.
    """

    probes: Sequence = ("mlp", "linear", "depth")
    """Probe kinds trained at every site: preset names or :class:`ProbeSpec` (normalised to specs)."""
    encoder_blocks: bool = False
    """Also probe every encoder block's output (``model.probe_sites(encoder_blocks=True)``)."""
    sublayers: bool = False
    """Also probe each sublayer's output before its skip connection (the granularity ablation)."""
    sites: Sequence[str] | None = None
    """Only these sites: site or location names (``"dec3.cross.v2"`` or ``"dec3.cross"``); None = all."""
    steps: int = 2000
    """Optimiser steps (one frozen backbone pass each)."""
    batch_size: int = 8
    """Pairs per step."""
    lr: float = 1e-4
    """AdamW learning rate (the paper's)."""
    weight_decay: float = 0.05
    """AdamW weight decay (the paper's)."""
    alpha: float = 0.2
    """Confidence regulariser α of the loss (the paper's)."""
    seed: int = 0
    """Seed of the probes' initialisation; each probe's own seed derives from it and its site's name."""
    data_seed: int = 0
    """Training pair ``i`` (``i = step · batch_size + b``) is synthetic scene ``data_seed + i``."""
    checkpoint_every: int = 100
    """Write a resumable checkpoint every this many steps (and at the end)."""
    amp: str = "auto"
    """``"auto"`` (bf16 autocast on CUDA, fp32 elsewhere), ``"bf16"`` or ``"off"``."""
    backbone: str = "model"
    """``"model"``: the given model; ``"random"``: a re-initialised copy of its architecture (the control)."""
    control_seed: int = 1
    """Seed of the random backbone's initialisation (``backbone="random"``)."""

    def __post_init__(self) -> None:
        probes = self.probes
        if isinstance(probes, (str, ProbeSpec, Mapping)):
            probes = (probes,)
        specs = tuple(probe_spec(p) for p in probes)
        if not specs:
            raise ValueError("TrainConfig.probes is empty; name at least one probe kind, e.g. ('mlp',)")
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise ValueError(f"TrainConfig.probes has duplicate names {names}; give each ProbeSpec its own name")
        object.__setattr__(self, "probes", specs)
        if self.sites is not None:
            object.__setattr__(self, "sites", tuple(self.sites))
        for name in ("steps", "batch_size", "checkpoint_every"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"TrainConfig.{name}={getattr(self, name)} must be >= 1")
        if not self.lr > 0 or self.weight_decay < 0 or self.alpha < 0:
            raise ValueError("TrainConfig: need lr > 0, weight_decay >= 0 and alpha >= 0")
        if self.amp not in AMP_MODES:
            raise ValueError(f"TrainConfig.amp={self.amp!r}; expected one of {AMP_MODES}")
        if self.backbone not in BACKBONES:
            raise ValueError(f"TrainConfig.backbone={self.backbone!r}; expected one of {BACKBONES}")

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        d["probes"] = [s.to_dict() for s in self.probes]
        d["sites"] = list(self.sites) if self.sites is not None else None
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainConfig:
        data = dict(data)
        probes = tuple(probe_spec(p) for p in data.pop("probes", PRESETS))
        obj = super().from_dict(data)
        return dataclasses.replace(obj, probes=probes)

    def identity(self) -> dict[str, Any]:
        """The fields that define what is learned (a resumed run must agree on them; ``steps`` and
        ``checkpoint_every`` may change, so a finished run can be extended)."""
        d = self.to_dict()
        d.pop("steps")
        d.pop("checkpoint_every")
        return d


def spec_names(specs: Sequence[ProbeSpec], target: str | None = None) -> list[str]:
    return [s.name for s in specs if target is None or s.target == target]


"""What a report analyses and how hard it works (:class:`ReportConfig`), with the two presets.

The ``default`` preset is sized for the bundled ``dust3r-toy`` on a 2-core CPU (about ten
minutes end to end); ``fast`` is a smoke run of every step (under a minute) used by the tests;
``paper`` is the paper's protocol at its scale, for a ViT-L checkpoint on a GPU (see
:data:`PAPER_SIZING`).
Any field can be overridden (``ReportConfig.preset("default").replace(pairs=256)``, or the
command line's options).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..adapters.base import ConfigMixin

PATCH_PER = ("site", "head")
PROBE_KINDS = ("mlp", "linear")


@dataclass(frozen=True)
class ReportConfig(ConfigMixin):
    """Every knob of ``mv-interp report`` (what each step computes is a function of these and the model)."""

    pairs: int = 64
    """Held-out pairs every measurement uses: probe evaluation, head scores, the knockout
    (synthetic scenes from :data:`mv_interp.probes.EVAL_SEED`, or the last tuples of ``--data``).
    With ``views`` > 2 each "pair" is an example of that many views."""
    views: int = 2
    """Views per example. 2 for the pair models (DUSt3R, MASt3R); a many-view model (Fast3R, VGGT)
    takes any number, and every step runs on examples of this many views: probes at every view's
    sites, head scores across all frames, knockout and patching (views 2…N corrupted), the 4D view
    of all N views. View 1 is the reference frame throughout."""
    probe_steps: int = 300
    """Optimiser steps of the probes (one frozen backbone pass each; about 1 s per step for
    dust3r-toy on a 2-core CPU, where the loss has levelled off)."""
    batch_size: int = 8
    """Pairs per probe-training step (and per evaluation / scoring batch)."""
    probe_width: int = 256
    """Hidden width of the 5-layer MLP probes (the paper's is 512; narrower trains faster on a CPU)."""
    probe_layers: int = 5
    """Linear layers of the MLP probes (the paper's 5)."""
    probe_kinds: Sequence[str] = ("mlp",)
    """Probe kinds trained at every site: ``"mlp"`` (always) and optionally ``"linear"`` (Appendix A)."""
    lr: float = 1e-3
    """AdamW learning rate of the probes."""
    train_pool: int = 0
    """Training pairs rendered once and revisited in seeded epochs (shared by probes and control);
    0 renders fresh synthetic scenes every step. Ignored with ``--data``."""
    control: bool = True
    """Train the random-backbone control (the same probes on a re-initialised copy of the model)."""
    control_steps: int | None = 80
    """Steps of the control (``None``: ``probe_steps``). A probe on a random backbone levels off
    early (it can only learn the average room), so fewer steps suffice."""
    seed: int = 0
    """Seed of the probes' initialisation and of the first synthetic training scene."""
    knockout_k: int = 5
    """Register tokens knocked out per head and example (the paper's five)."""
    patch_pairs: int = 4
    """Clean/corrupted pairs averaged in each patching-sweep cell."""
    patch_batch: int | None = None
    """Examples per patching forward: ``patch_batch // patch_pairs`` cells run together, each on its
    own copy of the corrupted pairs (the same values as one forward per cell; fewer, larger forwards,
    meant for a GPU). ``None``: one cell per forward. On 2 CPU cores batching was 1.3x faster for
    dust3r-toy and 0.7-0.8x for a small VGGT (``benchmarks/bench_patching_batch.py``); on a GPU it is
    not measured yet."""
    patch_per: Sequence[str] = PATCH_PER
    """Patching sweeps to run: per ``"site"`` (every residual and sublayer output) and/or per ``"head"``."""
    max_points: int = 4000
    """Points per view in each 4D viewer frame."""
    overlay_queries: int = 4
    """Query patches drawn in each attention-overlay figure."""
    bootstrap: int = 1000
    """Bootstrap replicates behind every 95 % interval (resampling the held-out pairs, seeded
    by ``seed``: the same run gives the same intervals)."""
    converge_tol: float = 0.05
    """Probes count as converged when their training loss fell by at most this fraction over
    the last tenth of training; otherwise the page says the numbers are not meaningful yet."""
    smoke: bool = False
    """A smoke run (the ``fast`` preset): the page and the log say its numbers are not meaningful,
    and no headline card is green."""
    query_patches: Sequence[int] | None = None
    """Query patches (token indices, row · w + column of view 2's patch grid) of the attention
    maps; ``None``: ``overlay_queries`` patches spread over the image."""
    head_queries: int | None = 256
    """Query patches per view and batch the head scores use (a seeded sample; their attention rows
    come from q and k while the forward stays on fused attention, so many-view models fit in
    memory); ``None`` or at least the patch count (dust3r-toy: 196): every query."""

    def __post_init__(self) -> None:
        kinds = (self.probe_kinds,) if isinstance(self.probe_kinds, str) else tuple(self.probe_kinds)
        if "mlp" not in kinds or any(k not in PROBE_KINDS for k in kinds):
            raise ValueError(f"ReportConfig.probe_kinds={list(kinds)}: include 'mlp', optionally 'linear'")
        object.__setattr__(self, "probe_kinds", kinds)
        per = (self.patch_per,) if isinstance(self.patch_per, str) else tuple(self.patch_per)
        if any(p not in PATCH_PER for p in per):
            raise ValueError(f"ReportConfig.patch_per={list(per)}: choose from {PATCH_PER}")
        object.__setattr__(self, "patch_per", per)
        for name in ("pairs", "probe_steps", "batch_size", "probe_width", "probe_layers", "knockout_k", "max_points"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"ReportConfig.{name}={getattr(self, name)} must be >= 1")
        if self.views < 2:
            raise ValueError(f"ReportConfig.views={self.views}: an example needs at least 2 views")
        if self.pairs < 2:
            raise ValueError(f"ReportConfig.pairs={self.pairs}: need at least 2 pairs (an easy and a hard one)")
        if self.patch_batch is not None and self.patch_batch < 1:
            raise ValueError(f"ReportConfig.patch_batch={self.patch_batch} must be >= 1 (or None)")
        if self.patch_pairs < 1 or self.patch_pairs > self.pairs:
            raise ValueError(f"ReportConfig.patch_pairs={self.patch_pairs} must be in 1..pairs ({self.pairs})")
        if self.control_steps is not None and self.control_steps < 1:
            raise ValueError(f"ReportConfig.control_steps={self.control_steps} must be >= 1 (or None)")
        if self.bootstrap < 100:
            raise ValueError(f"ReportConfig.bootstrap={self.bootstrap}: use at least 100 replicates for a 95 % "
                             "interval")
        if not 0 < self.converge_tol < 1:
            raise ValueError(f"ReportConfig.converge_tol={self.converge_tol} is a fraction in (0, 1)")
        if self.query_patches is not None:
            qp = self.query_patches
            q = (qp,) if isinstance(qp, int) else tuple(int(t) for t in qp)
            if not q or min(q) < 0:
                raise ValueError(f"ReportConfig.query_patches={list(q)}: give token indices >= 0")
            object.__setattr__(self, "query_patches", q)
        if self.head_queries is not None and self.head_queries < 1:
            raise ValueError(f"ReportConfig.head_queries={self.head_queries} must be >= 1 (or None: every query)")
        if self.train_pool < 0 or not self.lr > 0:
            raise ValueError("ReportConfig: need train_pool >= 0 and lr > 0")

    @property
    def n_control_steps(self) -> int:
        return self.control_steps if self.control_steps is not None else self.probe_steps

    @classmethod
    def preset(cls, name: str) -> ReportConfig:
        """``"default"`` (about ten minutes on a 2-core CPU for dust3r-toy), ``"fast"`` (a smoke run) or
        ``"paper"`` (the paper's protocol at its scale, for a GPU)."""
        if name not in PRESETS:
            raise ValueError(f"unknown report preset {name!r}; presets: {sorted(PRESETS)}")
        return PRESETS[name]

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        d["probe_kinds"], d["patch_per"] = list(self.probe_kinds), list(self.patch_per)
        if self.query_patches is not None:
            d["query_patches"] = list(self.query_patches)
        return d

    def changed(self, **changes: Any) -> ReportConfig:
        """A copy with the given fields changed; ``None`` values are ignored (unset CLI options)."""
        changes = {k: v for k, v in changes.items() if v is not None}
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise ValueError(f"ReportConfig has no field(s) {unknown}")
        return dataclasses.replace(self, **changes)


PRESETS: dict[str, ReportConfig] = {
    "default": ReportConfig(),
    "fast": ReportConfig(pairs=8, probe_steps=12, batch_size=4, probe_width=64, probe_layers=3, control_steps=6,
                         patch_pairs=2, patch_per=("site",), max_points=1500, overlay_queries=2, bootstrap=200,
                         smoke=True),
    # The paper (Sec. 3, Sec. 4): 5-layer MLP probes trained on 100,000 rendered images, metrics on
    # 1,000 held-out pairs, AdamW lr 1e-4 (weight decay 0.05, TrainConfig's default).
    # 1,563 steps × 64 pairs = 100,032 training pairs.
    "paper": ReportConfig(pairs=1000, probe_steps=1563, batch_size=64, probe_width=512, probe_layers=5,
                          probe_kinds=("mlp", "linear"), lr=1e-4, control_steps=400, patch_pairs=16),
}

#: How the ``paper`` preset is sized to finish DUSt3R-224 (full size) in ≤ 30 min on one H200:
#: a projection, not a measurement (``benchmarks/bench_gpu.py --report-preset paper`` measures it).
PAPER_SIZING = """\
Probe training dominates: 100,032 probe + 25,600 control training pairs at the issue's target of
>= 300 pairs/s (all 76 default sites, three probe kinds, one H200) take <= 419 s. Evaluation reads
1,000 pairs through the probed model, the control backbone and the lens (3 forwards a pair at
>= 445 pairs/s, today's eager rate): <= 7 s. Head scoring and the knockout read 1,000 pairs with
materialised attention patterns; patching 16 clean/corrupted pairs per cell. The issue measured
263 s up to the views step for the default preset (64 pairs, 2,400 probe pairs) on an H200,
patching 81 s of it. With the targeted >= 3x per step and the other steps scaled by the pairs they
read (1,000 / 64 for heads and knockout, 16 / 4 for patching):
(263 - 81 - 2,400 / 63) / 3 x 15.6 + 81 / 3 x 4 = 748 + 108 s.
Total: 419 + 7 + 856 s = 21.4 min. Under 30 min only if the targets hold: at today's 63 probe
pairs/s the probes alone would take 33 min.
"""

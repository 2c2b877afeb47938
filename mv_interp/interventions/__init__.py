"""Causal interventions: attention knockout, head ablation, activation patching — as data.

Every intervention is a frozen dataclass that round-trips JSON and runs through nnsight
(``spec.apply_nnsight(model)`` inside ``with model.trace(...)``) or TransformerLens-style hooks
(``model.run_with_hooks(..., fwd_hooks=spec.fwd_hooks(model))``) with identical results.

>>> from mv_interp.interventions import AttentionKnockout, Tokens
>>> ko = AttentionKnockout(layers=1, kind="self", view=2, heads=[0, 3, 8, 9],
...                        keys=Tokens.top_attended(5), queries="others", mode="post")
>>> with model.trace(img1, img2):
...     ko.apply_nnsight(model)
...     out = model.output.save()

See ``docs/interventions.md`` for the CLI (``mv-interp intervene`` / ``mv-interp patch``).
"""

from .attribution import PointmapAttribution, attribution_patching, direct_pointmap_attribution
from .means import MeanActivations, compute_means, head_means
from .metrics import distance_to, pointmap_distance, scale_invariant_pointmap_distance
from .patching import PatchingSweep, patching_sweep, read_clean_nnsight, run_patched, sweep_cells
from .specs import (
    ActivationPatch,
    AttentionKnockout,
    Composite,
    Edit,
    HeadAblation,
    Intervention,
    load_spec,
    read_source_nnsight,
    register_intervention,
    spec_from_dict,
    spec_from_json,
)
from .tokens import Tokens, top_attended_keys, top_attended_mask

__all__ = [
    "ActivationPatch", "AttentionKnockout", "PointmapAttribution", "attribution_patching",
    "direct_pointmap_attribution", "Composite", "Edit", "HeadAblation", "Intervention", "MeanActivations",
    "PatchingSweep", "Tokens", "compute_means", "distance_to", "head_means", "load_spec", "patching_sweep",
    "pointmap_distance", "read_clean_nnsight", "read_source_nnsight", "register_intervention", "run_patched",
    "scale_invariant_pointmap_distance", "spec_from_dict", "spec_from_json", "sweep_cells", "top_attended_keys",
    "top_attended_mask",
]

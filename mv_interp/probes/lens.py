"""The pointmap lens: the model's own final norm and head applied to an intermediate state.

The 3D analogue of the logit lens; no training. A baseline beside the trained probes: where the
lens already decodes good geometry, the state is in the final layer's "format".
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from ..adapters.base import ProbeSite
from ..types import ModelLike, as_module


def lens_sites(model: ModelLike, sites: Sequence[ProbeSite]) -> list[ProbeSite]:
    """``sites`` plus the encoder-output sites a lens needs for heads that read the encoder (DPT)."""
    module = as_module(model)
    n_views = max([2, *(s.view for s in sites)])  # the run's views: a many-view model has N
    extra = [s for s in module.probe_sites(n_views=n_views) if s.kind == "enc_out"] if module.lens_reads_encoder \
        else []
    names = {s.name for s in sites}
    return list(sites) + [s for s in extra if s.name not in names]


@torch.no_grad()
def pointmap_lens(model: ModelLike, tokens: Mapping[str, Tensor], sites: Sequence[ProbeSite],
                  grid: tuple[int, int]) -> dict[str, dict[str, Tensor]]:
    """``{site name: {"pts3d", "conf"}}``: each site's tokens decoded by the model's own norm and head.

    ``tokens`` maps site names to ``[batch, pos, d_model]`` (e.g. :meth:`ProbeSet.tokens`); it must
    also hold the encoder-output sites when the model's lens needs them (see :func:`lens_sites`).

    >>> out = pointmap_lens(model, tokens, model.probe_sites(), grid=(14, 14))
    """
    module = as_module(model)
    needs_enc = module.lens_reads_encoder
    n_views = max([2, *(s.view for s in sites)])
    enc = {s.view: s.name for s in module.probe_sites(n_views=n_views) if s.kind == "enc_out"} if needs_enc else {}
    out = {}
    for site in sites:
        kwargs = {}
        if needs_enc and site.view in enc and enc[site.view] in tokens:
            kwargs["enc_tokens"] = tokens[enc[site.view]]
        res = module.pointmap_lens(site, tokens[site.name], grid, **kwargs)
        out[site.name] = {"pts3d": res["pts3d"].float(), "conf": res["conf"].float()}
    return out

"""Many per-patch probes evaluated at once.

A :class:`GroupedMLP` holds ``S`` independent MLPs of one shape as parameter tensors
``[S, d_in, d_out]`` per layer and runs them with one ``torch.baddbmm`` per layer over the
site axis. A :class:`ProbeBank` keeps one group per (probe kind, input width) and turns the
per-token outputs into pixel maps with the same pixel shuffle and post-processing as the model's
linear head. No operation mixes tokens: a probe's output patch depends on its own token only.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from jaxtyping import Float
from torch import Tensor, nn

from ..adapters.base import ProbeSite
from ..errors import UnknownNameError
from ..layers import postprocess_conf, postprocess_points
from .config import ProbeSpec

LN_EPS = 1e-6


def probe_seed(seed: int, spec_name: str, site_name: str) -> int:
    """The initialisation seed of one probe: independent of which other probes are trained with it."""
    return zlib.crc32(f"{seed}/{spec_name}/{site_name}".encode()) & 0x7FFFFFFF


class GroupedMLP(nn.Module):
    """``n_sites`` independent MLPs ``dims[0] → … → dims[-1]`` (ReLU between layers), run together.

    Member ``i`` equals :meth:`member` ``(i)``, a plain ``nn.Sequential`` of ``nn.Linear``.
    """

    def __init__(self, n_sites: int, dims: Sequence[int], input_norm: bool = True):
        super().__init__()
        self.n_sites, self.dims, self.input_norm = n_sites, list(dims), input_norm
        self.weights = nn.ParameterList(nn.Parameter(torch.empty(n_sites, a, b)) for a, b in zip(dims[:-1], dims[1:]))
        self.biases = nn.ParameterList(nn.Parameter(torch.empty(n_sites, 1, b)) for b in dims[1:])

    @torch.no_grad()
    def reset_parameters(self, seeds: Sequence[int]) -> None:
        """``nn.Linear``'s default initialisation, member ``i`` drawn from its own generator ``seeds[i]``
        (on CPU, so the result is the same on every device)."""
        if len(seeds) != self.n_sites:
            raise ValueError(f"need one seed per member ({self.n_sites}), got {len(seeds)}")
        for i, seed in enumerate(seeds):
            g = torch.Generator().manual_seed(int(seed))
            for w, b in zip(self.weights, self.biases):
                bound = 1 / math.sqrt(w.shape[1])
                w[i].copy_(torch.empty(w.shape[1:]).uniform_(-bound, bound, generator=g))
                b[i].copy_(torch.empty(b.shape[1:]).uniform_(-bound, bound, generator=g))

    def forward(self, x: Float[Tensor, "site batch pos d_model"],
                members: Sequence[int] | None = None) -> Float[Tensor, "site batch pos d_out"]:
        """Member ``k`` reads ``x[k]`` (``members[k]`` when a subset of the members is given)."""
        S, B, N, D = x.shape
        weights, biases = list(self.weights), list(self.biases)
        if members is not None and list(members) != list(range(self.n_sites)):
            sel = torch.as_tensor(list(members), device=x.device)
            weights, biases = [w[sel] for w in weights], [b[sel] for b in biases]
        if S != weights[0].shape[0]:
            raise ValueError(f"GroupedMLP: got inputs for {S} sites, expected {weights[0].shape[0]}")
        if not torch.is_autocast_enabled(x.device.type):
            x = x.to(weights[0].dtype)  # under autocast baddbmm picks the dtype itself
        x = x.reshape(S, B * N, D)
        if self.input_norm:
            x = F.layer_norm(x, (D,), eps=LN_EPS)
        for i, (w, b) in enumerate(zip(weights, biases)):
            x = torch.baddbmm(b, x, w)
            if i < len(weights) - 1:
                x = F.relu(x)
        return x.reshape(S, B, N, -1)

    def member(self, i: int) -> nn.Sequential:
        """Member ``i`` as a plain ``nn.Sequential`` (a copy of its weights): the reference computation."""
        layers: list[nn.Module] = []
        if self.input_norm:
            layers.append(nn.LayerNorm(self.dims[0], eps=LN_EPS, elementwise_affine=False))
        for k, (w, b) in enumerate(zip(self.weights, self.biases)):
            lin = nn.Linear(w.shape[1], w.shape[2], device=w.device, dtype=w.dtype)
            with torch.no_grad():
                lin.weight.copy_(w[i].T)
                lin.bias.copy_(b[i, 0])
            layers.append(lin)
            if k < len(self.weights) - 1:
                layers.append(nn.ReLU())
        return nn.Sequential(*layers)


def pixel_shuffle_tokens(
    raw: Float[Tensor, "batch pos C"], grid: tuple[int, int], patch_size: int
) -> Float[Tensor, "batch c H W"]:
    """Per-token ``channels · p²`` values → ``[batch, channels, H, W]``, the layout of the model's linear head."""
    h, w = grid
    return F.pixel_shuffle(rearrange(raw, "b (h w) c -> b c h w", h=h, w=w), patch_size)


class ProbeBank(nn.Module):
    """Every probe kind at every site, grouped by (kind, input width) into :class:`GroupedMLP` s.

    ``forward({site name: tokens [batch, pos, d_model]}, grid)`` returns
    ``{kind: {site name: {"pts3d", "conf"} | {"depth", "conf"}}}`` with maps ``[batch, H, W(, 3)]``
    in fp32. Probes whose site has no tokens in the input are skipped.
    """

    def __init__(self, sites: Sequence[ProbeSite], specs: Sequence[ProbeSpec], patch_size: int,
                 depth_mode: Sequence = ("exp", -math.inf, math.inf), conf_mode: Sequence = ("exp", 1, math.inf)):
        super().__init__()
        self.sites, self.specs = list(sites), list(specs)
        self.patch_size = patch_size
        self.depth_mode, self.conf_mode = tuple(depth_mode), tuple(conf_mode)
        self.groups = nn.ModuleDict()
        #: group key → site names of its members, in member order
        self.members: dict[str, list[str]] = {}
        #: (kind, site name) → (group key, member index)
        self.index: dict[tuple[str, str], tuple[str, int]] = {}
        widths = sorted({s.d_model for s in self.sites})
        for spec in self.specs:
            for d in widths:
                names = [s.name for s in self.sites if s.d_model == d]
                key = f"{spec.name}__d{d}"
                self.groups[key] = GroupedMLP(len(names), spec.dims(d, patch_size), spec.input_norm)
                self.members[key] = names
                for i, n in enumerate(names):
                    self.index[(spec.name, n)] = (key, i)
        self._spec_of = {f"{s.name}__d{d}": s for s in self.specs for d in widths}

    def reset_parameters(self, seed: int) -> None:
        for key, group in self.groups.items():
            spec = self._spec_of[key]
            group.reset_parameters([probe_seed(seed, spec.name, n) for n in self.members[key]])

    def group_spec(self, key: str) -> ProbeSpec:
        return self._spec_of[key]

    @property
    def widths(self) -> dict[int, list[str]]:
        """``{d_model: site names}``: the members of every group of that input width, in member order."""
        return {int(k.rsplit("__d", 1)[1]): names for k, names in self.members.items()}

    def stacked(self, stacks: Mapping[int, Tensor], grid: tuple[int, int],
                kinds: Sequence[str] | None = None) -> dict[str, dict[str, Tensor]]:
        """The hot path: ``{group key: {"pts3d"|"depth", "conf": [site, batch, H, W(, 3)]}}`` from
        ``{d_model: [site, batch, pos, d_model]}`` holding every member of that width, in member order.

        One batched matmul per layer and group, one pixel shuffle and post-processing per group:
        no operation per site.
        """
        out: dict[str, dict[str, Tensor]] = {}
        for key, group in self.groups.items():
            spec = self._spec_of[key]
            if kinds is not None and spec.name not in kinds:
                continue
            x = stacks[int(key.rsplit("__d", 1)[1])]
            y = group(x)
            S, B = y.shape[:2]
            post = self.postprocess(spec, pixel_shuffle_tokens(y.flatten(0, 1), grid, self.patch_size))
            out[key] = {k: v.unflatten(0, (S, B)) for k, v in post.items()}
        return out

    def forward(self, tokens: Mapping[str, Tensor], grid: tuple[int, int],
                kinds: Sequence[str] | None = None) -> dict[str, dict[str, dict[str, Tensor]]]:
        out: dict[str, dict[str, dict[str, Tensor]]] = {
            s.name: {} for s in self.specs if kinds is None or s.name in kinds}
        for key, group in self.groups.items():
            spec = self._spec_of[key]
            if spec.name not in out:
                continue
            present = [i for i, n in enumerate(self.members[key]) if n in tokens]
            if not present:
                continue
            x = torch.stack([tokens[self.members[key][i]] for i in present])
            y = group(x, present)
            B = y.shape[1]
            maps = pixel_shuffle_tokens(y.flatten(0, 1), grid, self.patch_size)
            post = self.postprocess(spec, maps)
            # split(), not per-site slicing: one backward node instead of a full-size zero tensor per site
            chunks = {k: v.split(B) for k, v in post.items()}
            for j, i in enumerate(present):
                out[spec.name][self.members[key][i]] = {k: c[j] for k, c in chunks.items()}
        return out

    def postprocess(self, spec: ProbeSpec, raw: Float[Tensor, "batch c H W"]) -> dict[str, Tensor]:
        """Raw maps → ``{"pts3d", "conf"}`` (the model's modes) or ``{"depth", "conf"}``, in fp32."""
        with torch.autocast(device_type=raw.device.type, enabled=False):
            raw = raw.float().permute(0, 2, 3, 1)
            conf = postprocess_conf(raw[..., -1], self.conf_mode)
            if spec.target == "pointmap":
                return {"pts3d": postprocess_points(raw[..., :3], self.depth_mode), "conf": conf}
            return {"depth": spec.depth_scale * torch.exp(raw[..., 0]), "conf": conf}

    def probe(self, kind: str, site: str) -> nn.Sequential:
        """The probe of ``kind`` at ``site`` as a plain per-token MLP (a copy)."""
        try:
            key, i = self.index[(kind, site)]
        except KeyError:
            raise UnknownNameError(f"no {kind!r} probe at site {site!r}; kinds: {[s.name for s in self.specs]}, "
                           f"sites: {[s.name for s in self.sites]}") from None
        return self.groups[key].member(i)


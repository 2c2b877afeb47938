"""A trained set of probes: the weights, the sites they read and how they were made.

On disk a probe set is a directory with ``probes.safetensors`` (one ``[n_sites, d_in, d_out]``
tensor per layer of each group) and ``probes.json`` (sites, probe specs, groups, the backbone's
family/config/fingerprint, the training configuration and step).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..adapters.base import MultiViewModel, ProbeSite, _from_jsonable, _jsonable, adapter_for_model, patch_tokens
from ..errors import UnknownNameError, WrongTypeError
from ..loading import atomic_write
from .config import ProbeSpec
from .losses import LossPlan
from .modules import ProbeBank
from .sites import Location, group_locations, read_tokens

FORMAT = "mv_interp.probes/1"
WEIGHTS = "probes.safetensors"
DESCRIPTION = "probes.json"
DEFAULT_DEPTH_MODE = ("exp", -math.inf, math.inf)
DEFAULT_CONF_MODE = ("exp", 1, math.inf)


def unwrap(model: Any) -> MultiViewModel:
    """The plain hooked module of an :class:`~mv_interp.model.MVModel` (or the module itself)."""
    module = getattr(model, "module", model) if not isinstance(model, MultiViewModel) else model
    if not isinstance(module, MultiViewModel):
        raise WrongTypeError(f"expected a hooked multi-view model (mv_interp.load_model(...)), got {type(model).__name__}")
    return module


@torch.no_grad()
def fingerprint(module: nn.Module) -> str:
    """A short digest of a model's weights (to check probes are applied to the backbone they were trained on)."""
    acc = torch.zeros(2, dtype=torch.float64)
    for i, p in enumerate(module.parameters()):
        flat = p.detach().reshape(-1)[:4096].double().cpu()
        acc[0] += flat.sum() * (i + 1)
        acc[1] += flat.abs().sum() + p.numel()
    return f"{acc[0].item():.9e}/{acc[1].item():.9e}"


def random_backbone(module: MultiViewModel, seed: int) -> MultiViewModel:
    """A freshly initialised model of the same family and config (the probes' control), seeded."""
    adapter = adapter_for_model(module)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        fresh = adapter.build(module.config)
    dtype = next(module.parameters()).dtype
    return fresh.to(device=module.device, dtype=dtype).eval().requires_grad_(False)


class ProbeSet(nn.Module):
    """Probes of one or more kinds at a list of sites of one backbone.

    >>> probes = ProbeSet.load("runs/probes")
    >>> out = probes.run(model, img1, img2)             # one backbone pass, every probe
    >>> out["mlp"]["dec3.cross.v2"]["pts3d"].shape      # [batch, H, W, 3], view 1's frame
    >>> probes.probe("mlp", "dec3.cross.v2")             # that probe as a plain nn.Sequential
    """

    def __init__(self, sites: Sequence[ProbeSite], specs: Sequence[ProbeSpec], patch_size: int,
                 depth_mode: Sequence = DEFAULT_DEPTH_MODE, conf_mode: Sequence = DEFAULT_CONF_MODE,
                 n_views: int = 2, meta: Mapping[str, Any] | None = None):
        super().__init__()
        if not sites:
            raise ValueError("a ProbeSet needs at least one site")
        self.sites = list(sites)
        self.specs = list(specs)
        self.n_views = n_views
        self.meta: dict[str, Any] = dict(meta or {})
        self.bank = ProbeBank(self.sites, self.specs, patch_size, depth_mode, conf_mode)
        self.locations: list[Location] = group_locations(self.sites)
        self._plans: dict[str, LossPlan] = {}

    # -- construction -------------------------------------------------------------------
    @classmethod
    def for_model(cls, model: Any, sites: Sequence[ProbeSite], specs: Sequence[ProbeSpec], seed: int = 0,
                  meta: Mapping[str, Any] | None = None, n_views: int | None = None) -> ProbeSet:
        """Freshly initialised probes for ``sites`` of ``model`` (post-processing modes from its config);
        ``n_views`` defaults to the views ``sites`` cover."""
        module = unwrap(model)
        cfg = module.config
        base = {"family": adapter_for_model(module).name, "model_config": cfg.to_dict(),
                "fingerprint": fingerprint(module), "backbone": "model", "init_seed": seed, "step": 0}
        ps = cls(sites, specs, module.patch_size, getattr(cfg, "depth_mode", DEFAULT_DEPTH_MODE),
                 getattr(cfg, "conf_mode", DEFAULT_CONF_MODE), n_views or max(s.view for s in sites),
                 {**base, **dict(meta or {})})
        ps.bank.reset_parameters(seed)
        return ps.to(module.device)

    # -- use ----------------------------------------------------------------------------
    @property
    def kinds(self) -> list[str]:
        return [s.name for s in self.specs]

    def spec(self, kind: str) -> ProbeSpec:
        for s in self.specs:
            if s.name == kind:
                return s
        raise UnknownNameError(f"no probe kind {kind!r} in this set; kinds: {self.kinds}")

    @property
    def hooks(self) -> list[str]:
        """Hook names the probes read (what ``run_with_cache`` must record)."""
        return sorted({s.hook for s in self.sites})

    @property
    def patch_size(self) -> int:
        return self.bank.patch_size

    def forward(self, tokens: Mapping[str, Tensor], grid: tuple[int, int],
                kinds: Sequence[str] | None = None) -> dict[str, dict[str, dict[str, Tensor]]]:
        """``{kind: {site name: {"pts3d"|"depth", "conf"}}}`` from ``{site name: [batch, pos, d_model]}``."""
        return self.bank(tokens, grid, kinds)

    def tokens(self, cache: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Every site's tokens from a cache recorded with ``names_filter=self.hooks``."""
        return read_tokens(cache, self.sites, self.n_views)

    def run(self, model: Any, *views: Tensor, kinds: Sequence[str] | None = None) -> dict:
        """One frozen backbone pass over ``views`` (images ``[batch, 3, H, W]``), then every probe."""
        module = unwrap(model)
        with torch.no_grad():
            _, acts = module.capture(*views, names=self.hooks)
            grid = (views[0].shape[-2] // self.patch_size, views[0].shape[-1] // self.patch_size)
            return self(self.tokens(acts), grid, kinds)

    def capture(self, model: Any, *views: Tensor) -> dict[int, Tensor]:
        """One backbone pass over ``views`` through the fast capture (:meth:`HookedRootModule.capture`),
        as ``{d_model: [site, batch, pos, d_model]}`` stacks in member order (what :meth:`ProbeBank.stacked`
        reads). The stacking is the only copy; activations keep their dtype."""
        _, acts = unwrap(model).capture(*views, names=self.hooks)
        by_name = {s.name: s for s in self.sites}
        return {d: torch.stack([patch_tokens(acts[by_name[n].hook], by_name[n], self.n_views) for n in names])
                for d, names in self.bank.widths.items()}

    def loss_plan(self, device: Any) -> LossPlan:
        """The location groups of :func:`~mv_interp.probes.losses.stacked_probe_loss` (built once per device)."""
        key = str(device)
        if key not in self._plans:
            self._plans[key] = LossPlan.build(self.locations, self.specs, self.bank.index, device)
        return self._plans[key]

    def probe(self, kind: str, site: str) -> nn.Sequential:
        """One probe as a plain per-token ``nn.Sequential`` (a copy; outputs ``channels · p²`` raw values)."""
        return self.bank.probe(kind, site)

    def site(self, name: str) -> ProbeSite:
        for s in self.sites:
            if s.name == name:
                return s
        raise UnknownNameError(f"no site {name!r} in this probe set; sites: {[s.name for s in self.sites]}")

    def check_backbone(self, model: Any) -> None:
        """Raise if ``model`` is not the family/config the probes were trained on (weights are
        compared too for ``backbone == "model"``)."""
        module = unwrap(model)
        cfg = module.config.to_dict()
        if self.meta.get("model_config") not in (None, cfg):
            diff = sorted(k for k in cfg if self.meta["model_config"].get(k) != cfg[k])
            raise ValueError(f"these probes were trained on a model with a different config (fields {diff}); "
                             "load the model they were trained on")
        trained_on = self.meta.get("fingerprint")
        if self.meta.get("backbone", "model") == "model" and trained_on not in (None, fingerprint(module)):
            raise ValueError("these probes were trained on different weights of this architecture "
                             f"(fingerprint {self.meta['fingerprint']} vs {fingerprint(module)}); load that model, "
                             "or pass check=False to apply them anyway")

    def backbone(self, model: Any) -> MultiViewModel:
        """The module these probes read: ``model`` itself, or the seeded random re-initialisation of
        its architecture for a control set (``meta["backbone"] == "random"``)."""
        module = unwrap(model)
        if self.meta.get("backbone", "model") == "random":
            rnd = random_backbone(module, int(self.meta["control_seed"]))
            if self.meta.get("fingerprint") not in (None, fingerprint(rnd)):
                raise ValueError("the random backbone rebuilt from control_seed differs from the one the control "
                                 "probes were trained on (a different torch version can change initialisers)")
            return rnd
        return module

    # -- files --------------------------------------------------------------------------
    def description(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "sites": [dataclasses.asdict(s) for s in self.sites],
            "locations": [{"name": loc.name, "sites": [s.name for s in loc.sites]} for loc in self.locations],
            "specs": [s.to_dict() for s in self.specs],
            "groups": [{"key": k, "kind": self.bank.group_spec(k).name, "dims": g.dims, "sites": self.bank.members[k]}
                       for k, g in self.bank.groups.items()],
            "patch_size": self.patch_size,
            "depth_mode": _jsonable(list(self.bank.depth_mode)),
            "conf_mode": _jsonable(list(self.bank.conf_mode)),
            "n_views": self.n_views,
            "meta": self.meta,
        }

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``probes.safetensors`` + ``probes.json`` into ``directory`` (each atomically)."""
        from safetensors.torch import save_file

        directory = Path(directory)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.bank.state_dict().items()}
        atomic_write(directory / WEIGHTS, lambda p: save_file(tensors, str(p), metadata={"format": FORMAT}))
        text = json.dumps(self.description(), indent=1, allow_nan=True)
        atomic_write(directory / DESCRIPTION, lambda p: Path(p).write_text(text))
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike, device: str | torch.device = "cpu") -> ProbeSet:
        """Load a probe set written by :meth:`save` (or a training run directory holding one)."""
        directory = Path(directory)
        if not (directory / DESCRIPTION).is_file() and (directory / "probes" / DESCRIPTION).is_file():
            directory = directory / "probes"
        if not (directory / DESCRIPTION).is_file():
            raise FileNotFoundError(f"no probe set in {directory}: expected {DESCRIPTION} and {WEIGHTS} "
                                    "(written by `mv-interp probes train` / ProbeSet.save)")
        desc = json.loads((directory / DESCRIPTION).read_text())
        if desc.get("format") != FORMAT:
            raise ValueError(f"{directory / DESCRIPTION} has format {desc.get('format')!r}; expected {FORMAT!r}")
        sites = [ProbeSite(**s) for s in desc["sites"]]
        specs = [ProbeSpec.from_dict(s) for s in desc["specs"]]
        ps = cls(sites, specs, desc["patch_size"], _from_jsonable(desc["depth_mode"]),
                 _from_jsonable(desc["conf_mode"]), desc["n_views"], desc.get("meta"))
        from safetensors.torch import load_file

        state = load_file(str(directory / WEIGHTS))
        ps.bank.load_state_dict(state, strict=True)
        return ps.to(device)

    def extra_repr(self) -> str:
        return f"kinds={self.kinds}, sites={len(self.sites)}, locations={len(self.locations)}"

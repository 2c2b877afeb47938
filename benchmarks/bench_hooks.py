"""Cost of the hook points: a hooked forward with no hook active vs the same network with them removed.

DUSt3R-224 (ViT-L encoder, ViT-B decoders, linear head) at full size with random weights, one
224×224 pair, fp32. Variants, timed interleaved (round-robin) so drift hits all alike:

* ``stripped`` — every HookPoint replaced by a plain Python identity (no module call);
* ``hooked``   — the HookedDUSt3R module as shipped, no hook registered;
* ``nnsight``  — the same module wrapped in nnsight (``MVModel.forward``), called outside a trace;
* ``hooked, identity HookPoint`` — the module with every HookPoint's forward a bare identity, as
  before the fast capture's sink check (``if self._sink is not None``) was added: the before/after
  of that change, timed in the same run.

    python benchmarks/bench_hooks.py [--device cpu|cuda] [--repeats 15]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _results import markdown_table, record  # noqa: E402

import mv_interp  # noqa: E402
from mv_interp.adapters.dust3r import NAMED_CONFIGS, HookedDUSt3R  # noqa: E402
from mv_interp.hooks import HookPoint  # noqa: E402


class _Bare:
    """What a hook point is reduced to: an identity that is never active."""

    is_active = False

    def __call__(self, x):
        return x


def strip_hooks(model: torch.nn.Module) -> torch.nn.Module:
    for module in list(model.modules()):
        for name, child in list(module._modules.items()):
            if isinstance(child, HookPoint):
                del module._modules[name]
                object.__setattr__(module, name, _Bare())
    return model


class _IdentityHookPoint(HookPoint):
    """A HookPoint as it was before the fast capture (forward is a bare identity)."""

    def forward(self, x):
        return x


def identity_hook_points(model: torch.nn.Module) -> torch.nn.Module:
    for hp in model.hook_dict.values():
        hp.__class__ = _IdentityHookPoint
    return model


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--config", default="224_linear")
    args = ap.parse_args()

    torch.manual_seed(0)
    cfg = NAMED_CONFIGS[args.config]
    hooked = HookedDUSt3R(cfg).eval().to(args.device)
    stripped = strip_hooks(copy.deepcopy(hooked))
    wrapped = mv_interp.MVModel(copy.deepcopy(hooked))
    n_hooks = len(hooked.hook_dict)
    H, W = cfg.img_size
    g = torch.Generator().manual_seed(0)
    img1, img2 = (torch.rand(1, 3, H, W, generator=g).mul(2).sub(1).to(args.device) for _ in range(2))

    before = identity_hook_points(copy.deepcopy(hooked))
    variants = {"stripped": stripped, "hooked": hooked, "nnsight": wrapped.forward, "hooked, identity HookPoint": before}
    times: dict[str, list[float]] = {k: [] for k in variants}
    with torch.inference_mode():
        ref = stripped(img1, img2)[1]["pts3d"]
        for name, fn in variants.items():  # warm-up, and the three compute the same thing
            out = fn(img1, img2)[1]["pts3d"]
            assert torch.allclose(out, ref, atol=1e-5), name
        for _ in range(args.repeats):
            for name, fn in variants.items():
                sync(args.device)
                t0 = time.perf_counter()
                fn(img1, img2)
                sync(args.device)
                times[name].append(time.perf_counter() - t0)

    base = statistics.median(times["stripped"])
    rows = []
    for name, ts in times.items():
        med = statistics.median(ts)
        rows.append([name, f"{med * 1e3:.1f}", f"{min(ts) * 1e3:.1f}", f"{(med / base - 1) * 100:+.2f} %"])
    table = markdown_table(["variant", "median ms", "min ms", "vs stripped"], rows)
    print(f"DUSt3R {args.config}, {n_hooks} hook points, one {H}x{W} pair, {args.device}, {args.repeats} repeats")
    print(table)
    body = (
        f"DUSt3R {args.config} at full size (random weights), {n_hooks} hook points, one {H}×{W} pair, fp32, "
        f"device {args.device}, median of {args.repeats} interleaved runs. Target: `hooked` within 3 % of `stripped`; "
        "`hooked, identity HookPoint` is the hooked path before the fast capture (the before/after of that change)."
        + (f" Load average at the end: {os.getloadavg()[0]:.1f}." if hasattr(os, "getloadavg") else "") + "\n\n"
        + table
    )
    record(f"Hook overhead ({args.device})", body, f"python benchmarks/bench_hooks.py --device {args.device} --repeats {args.repeats}")


if __name__ == "__main__":
    main()

"""The analysis behind ``mv-interp report``, one resumable step at a time.

Every step asks the model for its sites (``probe_sites()``, ``attention_sites()``,
``view_outputs()``) and calls the library's public tools — :mod:`mv_interp.probes`,
:mod:`mv_interp.heads`, :mod:`mv_interp.interventions`, :mod:`mv_interp.viz` — so the report runs
on any adapted two-view model. Steps write into the output folder:

=================  ==========================================================================
``probes/model``   pointmap probes at every site (``probes.json`` + ``probes.safetensors``)
``probes/control`` the same probes trained on a randomly initialised copy of the model
``probes/eval``    per-site metrics (``metrics.csv``/``.json``, ``contributions.csv``), figures
``heads``          head scores and labels (``scores.csv``/``.json``), heatmaps, Figure 5, overlays
``knockout``       the register-token knockout: specs, per-site errors before/after, figures
``patching``       activation-patching sweeps (per site, per head): heatmaps, JSON, tensors
``views``          the 4D view of an easy and a hard pair: viewer data, rerun recordings
=================  ==========================================================================
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..data.difficulty import pair_stats, pick_indices
from ..data.views import Views
from ..io import atomic_write, write_csv, write_json, write_text
from ..probes.views import page_inputs
from ..types import ModelLike, as_module
from ..viz.plotting import pyplot, save_figure
from .config import ReportConfig
from .uncertainty import head_intervals, paired_intervals, probe_intervals

Batch = list[dict[str, Tensor]]
PROBE_KIND = "mlp"  # the probe kind every view of the report shows


# --------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------


def _tqdm(iterable, progress: bool, **kw):
    from tqdm.auto import tqdm

    return tqdm(iterable, disable=not progress, dynamic_ncols=True, **kw)


# --------------------------------------------------------------------------------------
# Pairs
# --------------------------------------------------------------------------------------


@dataclass
class Pairs:
    """The held-out pairs every measurement uses, where probes train, and the example pairs."""

    views: Batch
    """Held-out pairs (a batch of views on the model's device)."""
    train: Any
    """What ``train_probes`` gets as ``data`` (``None``: fresh synthetic scenes every step)."""
    describe: dict[str, Any]
    """JSON description of the data (part of every step's key)."""
    stats: list[dict[str, Any]]
    """Per held-out pair: overlap (share of view 2's valid pixels seen in view 1), rotation (°)."""
    examples: dict[str, int] = field(default_factory=dict)
    """``{"easy": i, "hard": j}``: indices of the example pairs into :attr:`views`."""

    def pair(self, label: str) -> Batch:
        i = self.examples[label]
        return Views(self.views).slice(i, i + 1)


class _FirstViews(torch.utils.data.Dataset):
    """Samples of a dataset cut to their first ``n_views`` views (the report's examples)."""

    def __init__(self, dataset: Any, indices: Sequence[int], n_views: int = 2):
        self.dataset, self.indices, self.n_views = dataset, list(indices), n_views

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        return list(self.dataset[self.indices[i]])[: self.n_views]


def prepare_pairs(model: ModelLike, cfg: ReportConfig, data: str | os.PathLike | None = None,
                  progress: bool = True) -> Pairs:
    """Render (or load) the held-out pairs and set up the probes' training data.

    Synthetic (``data=None``): held-out scenes ``EVAL_SEED … EVAL_SEED + pairs − 1`` at the model's
    input size; probes train on scenes from ``cfg.seed`` (rendered on the fly, or a pool of
    ``cfg.train_pool``). A capture directory: its last ``pairs`` tuples (at most half of them) are
    held out, the others train the probes; images are cropped to the model's input size. Every
    example has ``cfg.views`` views (a capture's tuples are cut to their first ``cfg.views``).
    """
    from ..data import SceneConfig, collate_views
    from ..data.sources import SyntheticSource
    from ..probes.data import EVAL_SEED

    module = as_module(model)
    device = module.device
    H, W = tuple(module.config.img_size)
    bs = cfg.batch_size
    if data is None:
        scene = SceneConfig(image_size=(H, W), n_views=cfg.views)
        held_out = SyntheticSource((H, W), seed=EVAL_SEED, scene=scene)
        chunks = [held_out.take(s, min(bs, cfg.pairs - s), device)
                  for s in _tqdm(range(0, cfg.pairs, bs), progress, desc="held-out pairs", unit="batch")]
        views = Views.concat(chunks)
        describe = {"source": "synthetic", "eval_seed": EVAL_SEED, "pairs": cfg.pairs, "scene": scene.to_dict(),
                    "train_seed": cfg.seed, "train_pool": cfg.train_pool}
        # pairs: None, train_probes' own default (fresh synthetic pairs from cfg.seed); N views: the same
        # rooms seen from N cameras
        train: Any = None if cfg.views == 2 else SyntheticSource((H, W), seed=cfg.seed, scene=scene)
        if cfg.train_pool:
            train = _LazyPool(cfg.train_pool, scene, cfg.seed, bs, progress)
    else:
        from ..data import CaptureDataset

        root = Path(data)
        if not root.is_dir():
            raise FileNotFoundError(f"--data {root}: not a directory; give a capture directory (docs/data.md: "
                                    "`mv-interp data render` or `convert-habitat` write one)")
        ds = CaptureDataset(root, size=max(H, W), square_ok=H == W)
        n = len(ds)
        if n < 3:
            raise ValueError(f"--data {root}: {n} tuple(s); the report needs at least 3 (some train the probes, "
                             "the others are held out for the measurements)")
        n_eval = min(cfg.pairs, n // 2)
        if n_eval < 2:
            raise ValueError(f"--data {root}: {n} tuples leave {n_eval} held-out pair(s); the report needs at least "
                             "2 (an easy and a hard one) — add tuples to the capture")
        held = list(range(n - n_eval, n))
        short = sorted({len(ds[i]) for i in (0, n - 1)} - set(range(cfg.views, 10**6)))
        if short:
            raise ValueError(f"--data {root}: its tuples have {short[0]} view(s); --views {cfg.views} needs at least "
                             f"{cfg.views} (give --views {short[0]}, or a capture with more views per tuple)")
        samples = [list(ds[i])[: cfg.views] for i in _tqdm(held, progress, desc="held-out pairs", unit="pair")]
        views = [{k: v.to(device) for k, v in view.items()} for view in collate_views(samples)]
        train = _FirstViews(ds, range(n - n_eval), cfg.views)
        index = root / "index.json"
        describe = {"source": "capture", "path": str(root.resolve()), "tuples": n, "held_out": n_eval,
                    "index_mtime": index.stat().st_mtime if index.is_file() else None, "size": max(H, W),
                    "train_seed": cfg.seed, **({"views": cfg.views} if cfg.views != 2 else {})}
    stats = pair_stats(views, bs)
    return Pairs(views, train, describe, stats, pick_indices(stats, by=("overlap", "rotation")))


def image_pairs(model: ModelLike, images: Sequence[str | os.PathLike], n_views: int = 2) -> Pairs:
    """Plain photos as examples of ``n_views`` views (``a b [c d …]``: consecutive files group up),
    no ground truth: views ``{"img"}`` at the model's input size (scaled to its long side,
    centre-cropped). The first example is the one shown everywhere (the second, if any, is the
    "hard" one)."""
    from ..data.sources import ImageSource
    from ..images import center_crop

    paths = [Path(p) for p in images]
    if len(paths) < n_views or len(paths) % n_views:
        what = "pairs of images (a.png b.png [c.png d.png …])" if n_views == 2 else \
            f"groups of {n_views} images (--views {n_views})"
        raise ValueError(f"--images: got {len(paths)} file(s); give {what}")
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"--images: no such file(s) {missing}")
    module = as_module(model)
    H, W = tuple(module.config.img_size)
    n = len(paths) // n_views
    groups = [paths[n_views * i: n_views * (i + 1)] for i in range(n)]
    loaded = ImageSource(groups, size=max(H, W), square_ok=H == W, patch=module.patch_size).take(0, n)
    h, w = min(H, loaded[0]["img"].shape[-2]), min(W, loaded[0]["img"].shape[-1])
    views = [{"img": center_crop(v["img"], h, w).contiguous().to(module.device)} for v in loaded]
    stats = [{"overlap": math.nan, "rotation_deg": math.nan, "index": i,
              "files": [p.name for p in paths[n_views * i: n_views * (i + 1)]]} for i in range(n)]
    describe = {"source": "images", "files": [str(p.resolve()) for p in paths],
                "mtimes": [p.stat().st_mtime for p in paths], "size": [h, w],
                **({"views": n_views} if n_views != 2 else {})}
    return Pairs(views, None, describe, stats, {"easy": 0, "hard": 1} if n > 1 else {"easy": 0})


class _LazyPool:
    """A pool of synthetic training pairs rendered on first use (only when probes must train)."""

    def __init__(self, n: int, scene: Any, seed: int, batch_size: int, progress: bool):
        self.n, self.scene, self.seed, self.bs, self.progress = n, scene, seed, batch_size, progress
        self._views: Batch | None = None

    def views(self, device: Any) -> Batch:
        if self._views is None:
            from ..data import render_views

            chunks = [render_views(min(self.bs, self.n - s), self.scene, seed=self.seed + s, device=device)
                      for s in _tqdm(range(0, self.n, self.bs), self.progress, desc="training pairs", unit="batch")]
            self._views = [{k: v for k, v in view.items() if k in ("img", "pts3d", "valid", "depth")}
                           for view in Views.concat(chunks)]
        return self._views


# --------------------------------------------------------------------------------------
# Probes
# --------------------------------------------------------------------------------------


def train_config(cfg: ReportConfig, control: bool = False):
    """The :class:`~mv_interp.probes.TrainConfig` of the report's probes (or of their control)."""
    from ..probes import PRESETS, ProbeSpec, TrainConfig

    specs = [ProbeSpec(PROBE_KIND, "pointmap", cfg.probe_layers, cfg.probe_width)]
    if "linear" in cfg.probe_kinds:
        specs.append(PRESETS["linear"])
    steps = cfg.n_control_steps if control else cfg.probe_steps
    tc = TrainConfig(probes=tuple(specs), steps=steps, batch_size=cfg.batch_size, lr=cfg.lr, seed=cfg.seed,
                     data_seed=cfg.seed, checkpoint_every=max(10, steps // 8))
    return tc.replace(backbone="random", probes=tuple(specs[:1])) if control else tc


KEY_FILE = "report_key.txt"


def train_step(model: ModelLike, pairs: Pairs, tc: Any, directory: Path, key: str, progress: bool) -> dict[str, Any]:
    """Train (or resume) one probe set into ``directory``; returns facts for the report.

    A directory left by an interrupted run with the same key resumes from its checkpoint; one
    left by other settings (or a forced re-run) is cleared first. The checkpoint is removed once
    the probe set is saved (it holds the optimiser state: three times the probes' size).
    """
    from ..probes import train_probes
    from ..probes.train import CHECKPOINT, LOG

    marker = directory / KEY_FILE
    if directory.exists() and not (marker.is_file() and marker.read_text().strip() == key):
        shutil.rmtree(directory)
    directory.mkdir(parents=True, exist_ok=True)
    write_text(marker, key + "\n")
    data = pairs.train.views(next(iter(as_module(model).parameters())).device) if isinstance(pairs.train, _LazyPool) \
        else pairs.train
    probes = train_probes(model, tc, directory, data=data, progress=progress)
    (directory / CHECKPOINT).unlink(missing_ok=True)
    log = [json.loads(line) for line in (directory / LOG).read_text().splitlines() if line.strip()]
    losses = [float(r["loss"]) for r in log]
    tail = losses[-max(1, len(losses) // 10):]
    return {"steps": tc.steps, "batch_size": tc.batch_size, "sites": len(probes.sites),
            "locations": len(probes.locations), "kinds": probes.kinds,
            "final_loss": float(np.mean(tail)) if tail else math.nan,
            "first_loss": losses[0] if losses else math.nan,
            "tail_drop": tail_drop(losses), "parameters": sum(p.numel() for p in probes.parameters())}


def tail_drop(losses: Sequence[float]) -> float:
    """How much a training loss still fell over the last tenth of training, as a fraction of its
    level there: the mean of the tenth's first third minus the mean of its last third, over the
    former (0.1 = still falling by 10 %; ≤ 0 = flat or rising). NaN with fewer than 3 logged steps."""
    tail = list(losses)[-max(3, len(losses) // 10):]
    if len(tail) < 3:
        return math.nan
    k = max(1, len(tail) // 3)
    first, last = float(np.mean(tail[:k])), float(np.mean(tail[-k:]))
    return (first - last) / abs(first) if first else math.nan


@torch.no_grad()
def _outputs(model: ModelLike, views: Batch, batch_size: int) -> list[list[dict[str, Tensor]]]:
    """The model's per-view outputs on ``views``, one list entry per batch of ``batch_size`` pairs."""
    module = as_module(model)
    return [module.view_outputs(module(*[v["img"] for v in Views(views).slice(s, s + batch_size)]))
            for s in range(0, Views(views).batch_size, batch_size)]


def output_metrics_per_pair(model: ModelLike, views: Batch, batch_size: int,
                            outputs: list[list[dict[str, Tensor]]] | None = None) -> dict[str, np.ndarray]:
    """The model's own output on the held-out pairs, scored like a probe (E.1, E.2, depth), one
    value per pair; ``outputs`` (from :func:`_outputs`) saves the forward passes when at hand.
    Pairs without ground truth give ``{}``."""
    from ..probes.evaluate import pointmap_metrics

    if not all(k in v for v in views for k in ("pts3d", "valid")):
        return {}
    outputs = outputs if outputs is not None else _outputs(model, views, batch_size)
    acc: dict[str, list[Tensor]] = {}
    for i, out in enumerate(outputs):
        b = Views(views).slice(i * batch_size, (i + 1) * batch_size)
        for k, v in pointmap_metrics(out, b).items():
            acc.setdefault(k, []).append(v.float().cpu())
    return {k: torch.cat(v).double().numpy() for k, v in acc.items()}


def output_metrics(model: ModelLike, views: Batch, batch_size: int,
                   outputs: list[list[dict[str, Tensor]]] | None = None) -> dict[str, float]:
    """The means over pairs of :func:`output_metrics_per_pair`."""
    per = output_metrics_per_pair(model, views, batch_size, outputs)
    return {k: float(np.nanmean(v)) if np.isfinite(v).any() else math.nan for k, v in per.items()}


def evaluate_step(model: ModelLike, pairs: Pairs, cfg: ReportConfig, out: Path, progress: bool) -> tuple[list, dict]:
    from ..probes import ProbeSet, evaluate_probes, plot_contributions, plot_curves

    module = as_module(model)
    probes = ProbeSet.load(out / "probes" / "model", device=module.device)
    control = None
    if (out / "probes" / "control" / "probes.json").is_file() and cfg.control:
        control = ProbeSet.load(out / "probes" / "control", device=module.device)
    table = evaluate_probes(model, probes, pairs.views, control=control, lens=True, batch_size=cfg.batch_size,
                            progress=progress)
    d = out / "probes" / "eval"
    files = list(table.write(d).values())
    ivs = probe_intervals(table.rows, table.per_pair, table.contributions, replicates=cfg.bootstrap, seed=cfg.seed)
    files.append(write_json(d / "intervals.json", ivs))
    files.append(write_csv(d / "intervals.csv", ivs["sites"], INTERVAL_COLUMNS))
    files.append(plot_curves(table, d / "curves.png", intervals=ivs["sites"]))
    if table.contributions:
        files.append(plot_contributions(table, d / "contributions.png", intervals=ivs["contributions"]))
    model_out = output_metrics(model, pairs.views, cfg.batch_size)
    files.append(write_json(d / "model_output.json", model_out))
    info = {"locations": table.locations, "methods": table.methods, "model_output": model_out,
            "n_pairs": table.meta.get("n_pairs")}
    return files, info


INTERVAL_COLUMNS = ("method", "location", "metric", "estimate", "low", "high", "level", "n", "replicates")


# --------------------------------------------------------------------------------------
# Heads
# --------------------------------------------------------------------------------------


def heads_step(model: ModelLike, pairs: Pairs, cfg: ReportConfig, out: Path, progress: bool,
               name: str = "") -> tuple[list, dict]:
    from ..heads import LABELS, ScoreConfig, save_example_figures

    d = out / "heads"
    scores, per_pair = score_heads_per_pair(model, pairs.views, ScoreConfig(max_queries=cfg.head_queries), progress,
                                            batch_size=cfg.batch_size)
    scores.model_name = name or scores.model_name
    paths = scores.save(d, figures=True)
    paths.update(save_example_figures(model, pairs.pair("easy"), scores, d, n_queries=cfg.overlay_queries,
                                      labels=head_evidence_labels(scores), queries=cfg.query_patches))
    labels = scores.labels()
    counts = {lab: sum(lab in v for v in labels.values()) for lab in LABELS}
    arrays = {f"{'|'.join(map(str, k))}/{stat}": v for k, ss in per_pair.items() for stat, v in ss.items()}
    paths["per_pair"] = atomic_write(d / "per_pair.npz", lambda p: _savez(p, arrays))
    units = [unit_row(u) for u in scores.units]
    t_index = list(scores.thresholds_px).index(scores.primary_px)
    ivs = head_intervals(per_pair, units, scores.thresholds.to_dict(), t_index, replicates=cfg.bootstrap,
                         seed=cfg.seed)
    ivs["best_per_layer"] = best_head_intervals(scores, per_pair, t_index, cfg)
    if ivs["best_per_layer"]:
        paths["curve_ci"] = plot_correspondence_ci(ivs["best_per_layer"], scores.primary_px,
                                                   d / "correspondence_curve_ci.png")
    paths["intervals"] = write_json(d / "intervals.json", ivs)
    paths["intervals_csv"] = write_csv(d / "intervals.csv", ivs["heads"], HEAD_INTERVAL_COLUMNS)
    info = {"counts": counts, "n_heads": len(labels), "primary_px": scores.primary_px,
            "best_per_layer": [b.to_dict() for b in scores.best_per_layer()],
            "register_heads": len(scores.register_heads()), "n_pairs": scores.n_pairs,
            "n_pairs_with_geometry": scores.n_pairs_with_geometry}
    return list(paths.values()), info


HEAD_INTERVAL_COLUMNS = ("site", "query_view", "key_view", "head", "score", "estimate", "low", "high", "level", "n")


def _savez(path: Any, arrays: dict[str, np.ndarray]) -> None:
    with open(path, "wb") as f:
        np.savez_compressed(f, **arrays)


def unit_row(u: Any) -> dict[str, Any]:
    """A scored block as the plain dict :func:`~mv_interp.report.uncertainty.head_intervals` reads."""
    return {"key": u.key, "site": u.site.name, "query_view": u.query_view, "key_view": u.key_view,
            "layer": u.site.layer, "stack": u.site.stack, "kind": u.site.kind, "same_view": u.same_view,
            "n_heads": u.site.n_heads}


def score_heads_per_pair(model: ModelLike, views: Batch, config: Any = None, progress: bool = False,
                         batch_size: int = 8) -> tuple[Any, dict]:
    """:func:`mv_interp.heads.score_heads` on ``views`` in batches of ``batch_size``, keeping each
    example's sums (``HeadScorer.per_sample``: the statistics are sums, so the scores are the batched
    run's); returns the scores and ``{unit key: {stat: [pairs, ...]}}`` for the intervals."""
    from ..heads import HeadScorer

    scorer = HeadScorer(model, config)
    scorer.per_sample = {}
    batches = list(Views(views).batches(batch_size))
    for batch in _tqdm(batches, progress, desc="scoring heads", unit="batch"):
        scorer.update(batch)
    per = {key: {stat: torch.cat(parts).numpy() for stat, parts in stats.items()}
           for key, stats in scorer.per_sample.items()}
    return scorer.result(), per


def plot_correspondence_ci(best: list[dict[str, Any]], px: float, path: Path) -> Path:
    """Figure 5 with intervals: the best head's recall per layer (95 % band) against the
    same-position and uniform baselines, one panel per block group; legends below the data."""
    plt = pyplot()
    key = f"{px:g}px"
    from ..heads.result import figure_groups

    groups: dict[tuple, list[dict]] = {}
    for b in best:
        groups.setdefault((b["stack"], b["kind"], b["query_view"], b["key_view"]), []).append(b)
    groups = {g: groups[g] for g in figure_groups(groups)}  # many views: the queries into view 1
    nr, nc = math.ceil(len(groups) / 3), min(len(groups), 3)
    fig, axes = plt.subplots(nr, nc, figsize=(max(5.5, 4.6 * nc), 3.6 * nr), squeeze=False, layout="constrained")
    for ax in list(axes.flat)[len(groups):]:
        ax.axis("off")
    for ax, ((stack, kind, qv, kv), bs) in zip(axes.flat, groups.items()):
        bs = sorted(bs, key=lambda b: b["layer"])
        x = [b["layer"] for b in bs]
        rec = [100 * b["recall"][key] for b in bs]
        lo = [100 * (b["recall_ci"]["low"] if b["recall_ci"]["low"] is not None else math.nan) for b in bs]
        hi = [100 * (b["recall_ci"]["high"] if b["recall_ci"]["high"] is not None else math.nan) for b in bs]
        ax.plot(x, rec, "o-", color="#2c8a4b", lw=2, label=f"best head, recall@{key}")
        ax.fill_between(x, lo, hi, color="#2c8a4b", alpha=0.2, lw=0, label="95 % interval")
        ax.plot(x, [100 * b["same_position"][key] for b in bs], "--", color="0.35", label="same grid position")
        ax.plot(x, [100 * b["chance"][key] for b in bs], ":", color="0.35", label="uniform attention")
        for xi, b, r in zip(x, bs, rec):
            ax.annotate(f"h{b['head']}", (xi, r), xytext=(0, 6), textcoords="offset points", ha="center", fontsize=7)
        ax.set_xticks(x)
        ax.set_xlabel(f"{stack} block")
        ax.set_ylim(0, 105)
        ax.set_title(f"{stack} {kind} · queries v{qv} → keys v{kv}", fontsize=10)
        ax.grid(alpha=0.3)
    for row in axes:
        row[0].set_ylabel("correct correspondences (%)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=4, fontsize=8, frameon=False)
    return save_figure(fig, path, tight=True)


def best_head_intervals(scores: Any, per_pair: dict, t_index: int, cfg: ReportConfig) -> list[dict[str, Any]]:
    """The best head of each layer (Figure 5) with intervals of its recall and of its margins over
    the uniform and same-position baselines, and, per block group, the change of the best recall
    from the first layer to the sixth (or last) — the paper's "40 % at the decoder input to over 60 %
    after six blocks"."""
    from .. import stats

    out = []
    for b in scores.best_per_layer():
        S = per_pair.get((b.site, b.query_view, b.key_view), {})
        if "corr_hits" not in S:
            continue
        w = stats.resample_weights(S["corr_rows"].shape[0], cfg.bootstrap, cfg.seed)
        rows, hits = S["corr_rows"], S["corr_hits"][:, b.head, t_index]
        d = b.to_dict()
        d["recall_ci"] = stats.ratio_interval(hits, rows, weights=w).to_dict()
        d["vs_same_position"] = stats.ratio_interval(hits - S["corr_same_pos"][:, t_index], rows, weights=w).to_dict()
        d["vs_uniform"] = stats.ratio_interval(hits - S["corr_chance"][:, t_index], rows, weights=w).to_dict()
        d["_hits"] = hits
        out.append(d)
    groups: dict[tuple, list[dict]] = {}
    for d in out:
        groups.setdefault((d["stack"], d["kind"], d["query_view"], d["key_view"]), []).append(d)
    for g in groups.values():
        g.sort(key=lambda d: d["layer"])
        first, end = g[0], g[min(5, len(g) - 1)]
        rows = per_pair[(first["site"], first["query_view"], first["key_view"])]["corr_rows"]
        w = stats.resample_weights(rows.shape[0], cfg.bootstrap, cfg.seed)
        change = stats.ratio_interval(end["_hits"] - first["_hits"], rows, weights=w).to_dict()
        for d in g:
            d["group_change"] = {"from_layer": first["layer"], "to_layer": end["layer"], "change": change,
                                 "layers": len(g)}
    for d in out:
        d.pop("_hits")
    return out


# --------------------------------------------------------------------------------------
# Knockout of register tokens (the paper's Appendix G)
# --------------------------------------------------------------------------------------


def knockout_target(contributions: Any, scores: Any, view: int = 2) -> tuple[Any, dict[str, Any]]:
    """The self-attention block of ``view`` whose skip lowers the aligned view-2 error most
    (Figure 4) and its scored block (a :class:`~mv_interp.heads.scoring.UnitInfo`)."""
    units = {u.site.layer: u for u in scores.units
             if u.site.stack == "dec" and u.site.kind == "self" and u.query_view == view and u.key_view == view}
    if not units:
        raise ValueError(f"the model declares no decoder self-attention for view {view}; nothing to knock out")
    why: dict[str, Any] = {}
    skips = [s for s in (contributions.skips if contributions is not None else ()) if s.kind == "self"
             and s.block in units and math.isfinite(s.delta)]
    if skips:
        best = min(skips, key=lambda s: s.delta)
        layer = best.block
        why = {"rule": "largest decrease of the aligned view-2 error across a self-attention skip",
               "delta": best.delta, "rel_change": best.rel_change, "error_before": best.error_before,
               "error_after": best.error_after}
    else:
        layer = sorted(units)[min(1, len(units) - 1)]
        why = {"rule": "no Figure-4 contributions; the second decoder block (the paper's choice)"}
    return units[layer], why


def knockout_heads(scores: Any, unit: Any) -> tuple[list[int], str]:
    """Heads of ``unit`` labelled *register*; if none passes the threshold, the quarter of its
    heads with the highest register lift (said so in the returned rule)."""
    regs = [r.ref.head for r in scores.register_heads()
            if (r.ref.site, r.ref.query_view, r.ref.key_view) == unit.key]
    if regs:
        return sorted(regs), "heads labelled register (register lift ≥ %.2g)" % scores.thresholds.register_lift
    lift = scores.metrics(unit)["register_lift"].nan_to_num(-1.0)
    n = max(1, math.ceil(unit.site.n_heads / 4))
    heads = sorted(int(h) for h in lift.argsort(descending=True)[:n])
    return heads, f"no head passed the register threshold; the {n} with the highest register lift"


def _control_tokens(scores: Any, unit: Any, heads: Sequence[int], k: int, seed: int) -> list[int]:
    """``k`` fixed tokens that are not among the heads' frequent register tokens (seeded)."""
    avoid = {t for h in heads for t in scores.register_tokens(unit, h)[0]}
    pool = [t for t in range(unit.n_tokens) if t not in avoid] or list(range(unit.n_tokens))
    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(len(pool), generator=g)[:k].tolist()
    return sorted(pool[i] for i in pick)


def positive_control_heads(scores: Any, unit: Any, n: int) -> tuple[Any, list[int], str] | None:
    """The positive control of the register knockout: ``n`` heads (as many as were knocked out)
    with the highest correspondence recall, in the cross-view block of the same query view that
    holds the strongest one — of the knocked block's kind where that kind has cross-view blocks
    (a global attention), else of the cross-attention. Without correspondence scores (plain
    photos): the first ``n`` heads of the same layer's cross-view block. ``None`` if the model has
    no cross-view attention."""
    from ..heads.result import px_label

    cross = [u for u in scores.units if not u.same_view and u.query_view == unit.query_view]
    if not cross:
        return None
    scored = [u for u in cross if float(scores.metrics(u)["corr_n"][0]) > 0]
    col = f"corr_recall@{px_label(scores.primary_px)}"
    if scored:
        pool = [u for u in scored if u.site.kind == unit.site.kind] or scored
        best = max(pool, key=lambda u: float(scores.metrics(u)[col].nan_to_num(-1).max()))
        rec = scores.metrics(best)[col].nan_to_num(-1)
        heads = sorted(int(h) for h in rec.argsort(descending=True)[:n])
        return best, heads, (f"the {len(heads)} head(s) with the highest correspondence recall, in the block holding "
                             "the strongest correspondence head")
    same = [u for u in cross if u.site.layer == unit.site.layer] or cross
    u = same[0]
    heads = list(range(min(n, u.site.n_heads)))
    return u, heads, (f"no correspondence scores without ground truth: the first {len(heads)} head(s) of the same "
                      "block's cross-view attention")


def _knockout_specs(scores: Any, unit: Any, heads: list[int], cfg: ReportConfig) -> tuple[dict[str, Any], dict]:
    from ..interventions import AttentionKnockout, Tokens

    common = dict(layers=unit.site.layer, kind=unit.site.kind, stack=unit.site.stack, view=unit.query_view,
                  key_view=unit.key_view if unit.site.layout == "global" else None, heads=heads,
                  queries="others", mode="post")
    tokens = _control_tokens(scores, unit, heads, cfg.knockout_k, cfg.seed)
    specs = {"registers": AttentionKnockout(keys=Tokens.top_attended(cfg.knockout_k), **common),
             "random_tokens": AttentionKnockout(keys=Tokens.at(*tokens), **common)}
    positive = positive_control_heads(scores, unit, len(heads))
    about: dict[str, Any] = {}
    if positive is not None:
        pu, ph, rule = positive
        specs["positive"] = AttentionKnockout(layers=pu.site.layer, kind=pu.site.kind, stack=pu.site.stack,
                                              view=pu.query_view,
                                              key_view=pu.key_view if pu.site.layout == "global" else None,
                                              heads=ph, queries="all", keys="all", mode="post")
        about = {"site": pu.site.name, "layer": pu.site.layer, "query_view": pu.query_view, "key_view": pu.key_view,
                 "heads": ph, "rule": rule}
    return specs, about


#: The knockout's variants, in the order the page shows them.
VARIANTS = {"clean": "clean", "registers": "register tokens knocked out",
            "random_tokens": "random tokens knocked out (control)",
            "positive": "correspondence heads knocked out (positive control)"}


def knockout_step(model: ModelLike, pairs: Pairs, cfg: ReportConfig, out: Path, progress: bool,
                  probes_dir: Path | None = None) -> tuple[list, dict]:
    """The register knockout with its random-token control and its positive control, each
    measured by the probes at every site (when there are probes and ground truth), by the model's
    own output errors (with ground truth) and by how far the model's output moves (always)."""
    from ..heads import HeadRef, HeadScores, plot_attention_overlays
    from ..heads.figures import default_queries
    from ..interventions import scale_invariant_pointmap_distance
    from ..probes import ProbeSet, ProbeTable, evaluate_probes, probe_frames

    module = as_module(model)
    d = out / "knockout"
    synthetic = pairs.describe.get("source") != "images"
    probes_dir = out / "probes" / "model" if probes_dir is None and synthetic else probes_dir
    probes = ProbeSet.load(probes_dir, device=module.device) if probes_dir is not None else None
    clean = ProbeTable.load(out / "probes" / "eval") if synthetic else None
    scores = HeadScores.load(out / "heads")
    unit, why = knockout_target(clean.contributions.get(PROBE_KIND) if clean is not None else None, scores)
    heads, head_rule = knockout_heads(scores, unit)
    specs, positive = _knockout_specs(scores, unit, heads, cfg)
    files = [specs[name].save(d / f"{name}.json") for name in specs]

    has_gt = all(k in v for v in pairs.views for k in ("pts3d", "valid"))
    tables = {"clean": clean} if clean is not None and has_gt else {}
    ref = _outputs(model, pairs.views, cfg.batch_size)
    per_pair = {"clean": output_metrics_per_pair(model, pairs.views, cfg.batch_size, outputs=ref)}
    moved = {"clean": np.zeros(Views(pairs.views).batch_size)}
    for name, spec in _tqdm(specs.items(), progress, desc="knockout", unit="variant"):
        with module.hooks(spec.fwd_hooks(module, n_views=len(pairs.views))):
            if tables and name != "positive":  # the positive control is read off the output alone
                tables[name] = evaluate_probes(model, probes, pairs.views, lens=False, batch_size=cfg.batch_size)
            knocked = _outputs(model, pairs.views, cfg.batch_size)
        per_pair[name] = output_metrics_per_pair(model, pairs.views, cfg.batch_size, outputs=knocked)
        moved[name] = torch.cat([scale_invariant_pointmap_distance(o, r).cpu()
                                 for o, r in zip(knocked, ref)]).double().numpy()
    outputs = {name: {k: float(np.nanmean(v)) for k, v in m.items()} for name, m in per_pair.items()}

    metrics = ("e2_aligned_v2", "e1_v2", "e1_v1")
    rows = []
    if tables:
        for loc in clean.locations:
            row: dict[str, Any] = {"location": loc}
            for m in metrics:
                for name, t in tables.items():
                    row[f"{m}_{name}"] = t.value(PROBE_KIND, loc, m)
            rows.append(row)
    out_row: dict[str, Any] = {"location": "model output"}
    for m in metrics:
        for name in per_pair:
            out_row[f"{m}_{name}"] = outputs[name].get(m, math.nan)
    for name in moved:
        out_row[f"moved_{name}"] = float(moved[name].mean())
    rows.append(out_row)
    files.append(write_csv(d / "knockout.csv", rows))
    if tables:
        files.append(_plot_knockout(rows, clean.locations, unit, heads, d / "knockout.png"))

    intervals = {"moved": paired_intervals(moved, "clean", replicates=cfg.bootstrap, seed=cfg.seed)}
    if per_pair["clean"]:
        intervals["e2_aligned_v2"] = paired_intervals({n: m["e2_aligned_v2"] for n, m in per_pair.items()}, "clean",
                                                      replicates=cfg.bootstrap, seed=cfg.seed)
    measures = {"moved": moved}
    if per_pair["clean"]:
        measures["e2_aligned_v2"] = {n: m["e2_aligned_v2"] for n, m in per_pair.items()}
    intervals["contrasts"] = {
        f"{a}_vs_{b}": {k: _paired(series[a], series[b], cfg) for k, series in measures.items()}
        for a, b in (("registers", "random_tokens"), ("positive", "registers"), ("positive", "random_tokens"))
        if a in moved and b in moved}

    # the heads' attention on the easy pair (Figure 15 style): registers light up whatever the query
    easy = pairs.pair("easy")
    labels = head_evidence_labels(scores)
    refs = [HeadRef(unit.site.name, unit.query_view, unit.key_view, h) for h in heads]
    queries = list(cfg.query_patches) if cfg.query_patches else default_queries(unit.grid, cfg.overlay_queries)
    queries = [q for q in queries if q < unit.n_tokens] or default_queries(unit.grid, cfg.overlay_queries)
    files.append(plot_attention_overlays(model, easy, refs, d / "knocked_heads.png", queries=queries, labels=labels))
    if positive:
        prefs = [HeadRef(positive["site"], positive["query_view"], positive["key_view"], h) for h in positive["heads"]]
        files.append(plot_attention_overlays(model, easy, prefs, d / "positive_heads.png", queries=queries,
                                             labels=labels))

    # 4D comparison on the hard pair: clean and knocked-out probes (or lens), from the knocked block on
    label = "hard" if "hard" in pairs.examples else "easy"
    pair = pairs.pair(label)
    kw = {"kind": PROBE_KIND} if probes is not None else {"lens": True}
    frames_clean = probe_frames(model, probes, pair, **kw)
    with module.hooks(specs["registers"].fwd_hooks(module, n_views=len(pair))):
        frames_ko = probe_frames(model, probes, pair, **kw)
    start = next((i for i, f in enumerate(frames_clean) if _frame_layer(f.label) >= unit.site.layer), 0)
    from ..viz import Frame, viewer_data

    frames = []
    for fc, fk in zip(frames_clean[start:], frames_ko[start:]):
        frames += [Frame(f"clean · {fc.label}", fc.views), Frame(f"knockout · {fk.label}", fk.views)]
    images, valid, gt = page_inputs(pair)
    data = viewer_data(frames, images, valid, gt, title=f"{label} pair · clean vs knockout (alternating)",
                       max_points=cfg.max_points)
    files.append(write_json(d / "viewer_compare.json", data))

    summary = {name: {"model_output": outputs.get(name, {}), "output_moved": float(moved[name].mean())}
               for name in moved}
    info = {"site": unit.site.name, "pattern_hook": unit.site.pattern_hook, "layer": unit.site.layer,
            "query_view": unit.query_view, "heads": heads, "head_rule": head_rule, "n_heads": unit.site.n_heads,
            "k": cfg.knockout_k, "why": why, "specs": {n: s.to_dict() for n, s in specs.items()},
            "summary": summary, "register_tokens": {h: list(scores.register_tokens(unit, h)[0]) for h in heads},
            "n_tokens": unit.n_tokens, "example": label, "positive": positive, "intervals": intervals,
            "probed": bool(tables), "n_pairs": Views(pairs.views).batch_size, "queries": queries}
    files.append(write_json(d / "knockout.json", {"rows": rows, **info}))
    return files, info


def _paired(a: np.ndarray, b: np.ndarray, cfg: ReportConfig) -> dict[str, Any]:
    from .. import stats

    return stats.paired_difference(a, b, replicates=cfg.bootstrap, seed=cfg.seed).to_dict()


def head_evidence_labels(scores: Any) -> dict[Any, tuple[str, ...]]:
    """Each head's labels with the score behind them and the baseline it beat, for figure titles:
    ``correspondence: recall 83% (same pos. 53%)``, ``register: lift 0.71 (≥ 0.5)``."""
    from ..heads import HeadRef
    from ..heads.result import px_label

    t0 = px_label(scores.primary_px)
    th = scores.thresholds
    out = {}
    for u in scores.units:
        m = scores.metrics(u)
        for h in range(u.site.n_heads):
            ref = HeadRef(u.site.name, u.query_view, u.key_view, h)
            parts = []
            for lab in scores._labels(u, m, h):
                if lab == "correspondence":
                    parts.append(f"corr. recall {100 * float(m[f'corr_recall@{t0}'][h]):.0f}% (same pos. "
                                 f"{100 * float(m[f'corr_same_pos@{t0}'][h]):.0f}%, uniform "
                                 f"{100 * float(m[f'corr_chance@{t0}'][h]):.0f}%)")
                elif lab == "register":
                    parts.append(f"register lift {float(m['register_lift'][h]):.2f} (≥ {th.register_lift:g})")
                elif lab == "local":
                    parts.append(f"local lift {float(m['local_lift'][h]):.2f} (≥ {th.local_lift:g})")
                else:
                    parts.append(f"other (register lift {float(m['register_lift'][h]):.2f})")
            out[ref] = tuple(parts)
    return out


def _frame_layer(label: str) -> int:
    """The decoder block of a location name (``dec3.cross`` → 3; encoder / decoder input → −2)."""
    import re

    m = re.match(r"dec(\d+)", label)
    return int(m.group(1)) if m else -2


def _plot_knockout(rows: list[dict], locations: list[str], unit: Any, heads: list[int], path: Path) -> Path:

    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(max(9, 0.6 * len(locations) + 3), 3.8), layout="constrained")
    x = np.arange(len(locations))
    styles = {"clean": dict(color="#333333", marker="o", lw=2, label="clean"),
              "registers": dict(color="#d62728", marker="s", lw=1.5, label="register tokens knocked out"),
              "random_tokens": dict(color="#1f77b4", marker="^", lw=1, ls="--", label="random tokens (control)"),
              "positive": dict(color="#9467bd", marker="v", lw=1, ls=":",
                               label="correspondence heads knocked out (positive control)")}
    for ax, (m, title) in zip(axes, (("e2_aligned_v2", "aligned view-2 error (E.2)"),
                                     ("e1_v2", "view-2 error in view 1's frame (E.1)"))):
        for name, st in styles.items():
            if f"{m}_{name}" in rows[0]:
                ax.plot(x, [r[f"{m}_{name}"] for r in rows[: len(locations)]], **st)
        ax.set_xticks(x)
        ax.set_xticklabels(locations, rotation=90, fontsize=7)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("probe error (GT-normalised units)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=len(labels), fontsize=8, frameon=False)
    fig.suptitle(f"knockout of {unit.site.name} heads {heads}: probed errors at every site", fontsize=11)
    return save_figure(fig, path, tight=True)


# --------------------------------------------------------------------------------------
# Patching
# --------------------------------------------------------------------------------------


def patching_step(model: ModelLike, pairs: Pairs, cfg: ReportConfig, out: Path, progress: bool) -> tuple[list, dict]:
    from ..interventions import distance_to, patching_sweep

    module = as_module(model)
    n = Views(pairs.views).batch_size
    idx = list(range(min(cfg.patch_pairs, n)))
    other = [(i + 1) % n for i in idx]  # corrupted view 2: the next pair's view 2 (another scene)
    v = pairs.views
    clean = tuple(view["img"][idx] for view in v)
    if n > 1:
        corrupted = (v[0]["img"][idx],) + tuple(view["img"][other] for view in v[1:])
    else:  # one pair (plain photos): view 2 mirrored left-right, the same content in the wrong places
        other = ["mirrored"]
        corrupted = (v[0]["img"][idx],) + tuple(view["img"][idx].flip(-1) for view in v[1:])
    with torch.no_grad():
        clean_out = module.view_outputs(module(*clean))
    files, info = [], {"pairs": idx, "corrupted_view2_from": other, "sweeps": {}}
    for per in cfg.patch_per:
        metric = distance_to(clean_out, scale_invariant=True)
        sweep = patching_sweep(model, clean, corrupted, per=per, metric=metric, progress=progress,
                               cells_per_forward=max(1, (cfg.patch_batch or 1) // len(idx)))
        files += list(sweep.save(out / "patching" / per).values())
        vals = sweep.values
        cells = []
        flat = vals.flatten()
        for i in flat.nan_to_num(math.inf).argsort()[:8].tolist():
            if not math.isfinite(float(flat[i])):
                break
            if sweep.inner is None:
                r, c = divmod(i, len(sweep.layers))
                cells.append({"site": sweep.sites[r], "layer": sweep.layers[c], "value": float(flat[i]),
                              "hook": sweep.hooks[r][c]})
            else:
                r, rest = divmod(i, len(sweep.layers) * len(sweep.inner))
                c, h = divmod(rest, len(sweep.inner))
                cells.append({"site": sweep.sites[r], "layer": sweep.layers[c], per: sweep.inner[h],
                              "value": float(flat[i]), "hook": sweep.hooks[r][c]})
        info["sweeps"][per] = {"metric": sweep.metric, "clean": sweep.clean_value, "corrupted": sweep.corrupted_value,
                               "cells": int(np.isfinite(vals.numpy()).sum()), "seconds": sweep.seconds,
                               "best": cells, "sites": sweep.sites, "layers": sweep.layers}
    return files, info


# --------------------------------------------------------------------------------------
# The 4D view
# --------------------------------------------------------------------------------------


def views_step(model: ModelLike, pairs: Pairs, cfg: ReportConfig, out: Path, progress: bool,
               probes_dir: Path | None = None) -> tuple[list, dict]:
    """The 4D views of the example pairs: probes (from ``probes_dir``; default the report's own)
    and the pointmap lens, as viewer data and rerun recordings. Without probes (plain photos and
    no ``--probes``) the lens alone."""
    from PIL import Image

    from ..probes import ProbeSet, pair_frames
    from ..viz import rerun_available

    module = as_module(model)
    if probes_dir is None and pairs.describe.get("source") != "images":
        probes_dir = out / "probes" / "model"
    probes = ProbeSet.load(probes_dir, device=module.device) if probes_dir is not None else None
    rerun = rerun_available()  # the .rrd sidecars need the optional extra; the page's viewers do not
    rerun = rerun_available()  # the .rrd sidecars need the optional extra; the page's viewers do not
    d = out / "views"
    files, info = [], {}
    for label in _tqdm(list(dict.fromkeys(pairs.examples)), progress, desc="4D views", unit="pair"):
        four = pair_frames(model, probes, pairs.pair(label), kind=PROBE_KIND, lens=True)
        for v, img in enumerate(four.images, start=1):
            files.append(atomic_write(d / f"pair_{label}_view{v}.png",
                                      lambda p, img=img: Image.fromarray(img).save(p, format="PNG")))
        name = f"pair {pairs.examples[label] + 1}" if pairs.describe.get("source") == "images" else f"{label} pair"
        for method in four.methods:
            title = f"{name} · {'probes' if method == PROBE_KIND else 'pointmap lens'}"
            data = four.viewer_data(method, title=title, max_points=cfg.max_points)
            files.append(write_json(d / f"viewer_{label}_{method}.json", data))
        if rerun:
            files.append(four.write_rerun(d / f"pair_{label}.rrd", next(iter(four.methods)),
                                          app_id=f"mv_interp_report_{label}"))
        info[label] = dict(pairs.stats[pairs.examples[label]])
        info[label]["methods"] = list(four.methods)
    info["rerun"] = rerun
    return files, info

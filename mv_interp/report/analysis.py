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

import csv
import io
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

from ..loading import atomic_write
from ..probes.data import batch_size_of as n_pairs
from ..probes.data import slice_batch
from ..probes.views import page_inputs
from .config import ReportConfig

Batch = list[dict[str, Tensor]]
PROBE_KIND = "mlp"  # the probe kind every view of the report shows


# --------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------


def write_text(path: Path, text: str) -> Path:
    return atomic_write(path, lambda p: Path(p).write_text(text))


def write_json(path: Path, obj: Any) -> Path:
    return write_text(path, json.dumps(_clean(obj), indent=1) + "\n")


def write_csv(path: Path, rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> Path:
    cols = list(columns or (rows[0].keys() if rows else []))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    return write_text(path, buf.getvalue())


def _clean(obj: Any) -> Any:
    """JSON-safe: NaN/inf → None, tuples → lists, numpy/torch scalars → Python numbers."""
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, Tensor) and obj.numel() == 1:
        return _clean(obj.item())
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def cat_batches(batches: Sequence[Batch]) -> Batch:
    return [{k: torch.cat([b[v][k] for b in batches]) for k in batches[0][v]} for v in range(len(batches[0]))]


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
        return slice_batch(self.views, i, i + 1)


class _FirstTwoViews(torch.utils.data.Dataset):
    """Samples of a dataset cut to their first two views (the report analyses pairs)."""

    def __init__(self, dataset: Any, indices: Sequence[int]):
        self.dataset, self.indices = dataset, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        return list(self.dataset[self.indices[i]])[:2]


def _pair_stats(views: Batch, batch_size: int) -> list[dict[str, Any]]:
    from ..data import pixel_correspondences
    from ..metrics import rotation_angle

    stats = []
    for s in range(0, n_pairs(views), batch_size):
        v1, v2 = slice_batch(views, s, s + batch_size)
        has_geometry = all(k in v for v in (v1, v2) for k in ("depth", "valid", "intrinsics", "cam2world"))
        if not has_geometry:
            stats += [{"overlap": math.nan, "rotation_deg": math.nan} for _ in range(v1["img"].shape[0])]
            continue
        _, ok = pixel_correspondences(v2, v1)
        overlap = ok.flatten(1).float().sum(1) / v2["valid"].flatten(1).float().sum(1).clamp_min(1)
        rot = rotation_angle(v1["cam2world"][:, :3, :3], v2["cam2world"][:, :3, :3])
        stats += [{"overlap": float(o), "rotation_deg": float(r)} for o, r in zip(overlap.cpu(), rot.cpu())]
    for i, s in enumerate(stats):
        s["index"] = i
    return stats


def pick_examples(stats: Sequence[dict[str, Any]]) -> dict[str, int]:
    """The easiest and the hardest pair: ranked by overlap (more is easier) and by relative
    rotation (less is easier), the two ranks averaged (the paper's Figure 3 contrasts a pair with
    large overlap and one seen from very different viewpoints)."""
    n = len(stats)
    overlap = np.array([s["overlap"] for s in stats], dtype=float)
    rot = np.array([s["rotation_deg"] for s in stats], dtype=float)
    if not np.isfinite(overlap).any():
        return {"easy": 0, "hard": min(1, n - 1)}
    overlap = np.nan_to_num(overlap, nan=0.0)
    rot = np.nan_to_num(rot, nan=0.0)
    difficulty = np.argsort(np.argsort(-overlap)) + np.argsort(np.argsort(rot))
    easy, hard = int(np.argmin(difficulty)), int(np.argmax(difficulty))
    if easy == hard:
        hard = (easy + 1) % n
    return {"easy": easy, "hard": hard}


def prepare_pairs(model: Any, cfg: ReportConfig, data: str | os.PathLike | None = None,
                  progress: bool = True) -> Pairs:
    """Render (or load) the held-out pairs and set up the probes' training data.

    Synthetic (``data=None``): held-out scenes ``EVAL_SEED … EVAL_SEED + pairs − 1`` at the model's
    input size; probes train on scenes from ``cfg.seed`` (rendered on the fly, or a pool of
    ``cfg.train_pool``). A capture directory: its last ``pairs`` tuples (at most half of them) are
    held out, the others train the probes; images are cropped to the model's input size.
    """
    from ..data import SceneConfig, collate_views, render_views
    from ..probes.data import EVAL_SEED
    from ..probes.probeset import unwrap

    module = unwrap(model)
    device = module.device
    H, W = tuple(module.config.img_size)
    bs = cfg.batch_size
    if data is None:
        scene = SceneConfig(image_size=(H, W))
        chunks = [render_views(min(bs, cfg.pairs - s), scene, seed=EVAL_SEED + s, device=device)
                  for s in _tqdm(range(0, cfg.pairs, bs), progress, desc="held-out pairs", unit="batch")]
        views = cat_batches(chunks)
        describe = {"source": "synthetic", "eval_seed": EVAL_SEED, "pairs": cfg.pairs, "scene": scene.to_dict(),
                    "train_seed": cfg.seed, "train_pool": cfg.train_pool}
        train: Any = None
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
        samples = [list(ds[i])[:2] for i in _tqdm(held, progress, desc="held-out pairs", unit="pair")]
        views = [{k: v.to(device) for k, v in view.items()} for view in collate_views(samples)]
        train = _FirstTwoViews(ds, range(n - n_eval))
        index = root / "index.json"
        describe = {"source": "capture", "path": str(root.resolve()), "tuples": n, "held_out": n_eval,
                    "index_mtime": index.stat().st_mtime if index.is_file() else None, "size": max(H, W),
                    "train_seed": cfg.seed}
    stats = _pair_stats(views, bs)
    return Pairs(views, train, describe, stats, pick_examples(stats))


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
                           for view in cat_batches(chunks)]
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


def train_step(model: Any, pairs: Pairs, tc: Any, directory: Path, key: str, progress: bool) -> dict[str, Any]:
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
    data = pairs.train.views(next(iter(_module(model).parameters())).device) if isinstance(pairs.train, _LazyPool) \
        else pairs.train
    probes = train_probes(model, tc, directory, data=data, progress=progress)
    (directory / CHECKPOINT).unlink(missing_ok=True)
    log = [json.loads(line) for line in (directory / LOG).read_text().splitlines() if line.strip()]
    tail = log[-max(1, len(log) // 10):]
    return {"steps": tc.steps, "batch_size": tc.batch_size, "sites": len(probes.sites),
            "locations": len(probes.locations), "kinds": probes.kinds,
            "final_loss": float(np.mean([r["loss"] for r in tail])) if tail else math.nan,
            "first_loss": log[0]["loss"] if log else math.nan,
            "parameters": sum(p.numel() for p in probes.parameters())}


def _module(model: Any):
    from ..probes.probeset import unwrap

    return unwrap(model)


@torch.no_grad()
def _outputs(model: Any, views: Batch, batch_size: int) -> list[list[dict[str, Tensor]]]:
    """The model's per-view outputs on ``views``, one list entry per batch of ``batch_size`` pairs."""
    module = _module(model)
    return [module.view_outputs(module(*[v["img"] for v in slice_batch(views, s, s + batch_size)]))
            for s in range(0, n_pairs(views), batch_size)]


def output_metrics(model: Any, views: Batch, batch_size: int,
                   outputs: list[list[dict[str, Tensor]]] | None = None) -> dict[str, float]:
    """The model's own output on the held-out pairs, scored like a probe (E.1, E.2, depth);
    ``outputs`` (from :func:`_outputs`) saves the forward passes when they are already at hand."""
    from ..probes.evaluate import pointmap_metrics

    outputs = outputs if outputs is not None else _outputs(model, views, batch_size)
    acc: dict[str, list[Tensor]] = {}
    for i, out in enumerate(outputs):
        b = slice_batch(views, i * batch_size, (i + 1) * batch_size)
        for k, v in pointmap_metrics(out, b).items():
            acc.setdefault(k, []).append(v.float().cpu())
    return {k: float(torch.cat(v).nanmean()) for k, v in acc.items()}


def evaluate_step(model: Any, pairs: Pairs, cfg: ReportConfig, out: Path, progress: bool) -> tuple[list, dict]:
    from ..probes import ProbeSet, evaluate_probes, plot_contributions, plot_curves

    module = _module(model)
    probes = ProbeSet.load(out / "probes" / "model", device=module.device)
    control = None
    if (out / "probes" / "control" / "probes.json").is_file() and cfg.control:
        control = ProbeSet.load(out / "probes" / "control", device=module.device)
    table = evaluate_probes(model, probes, pairs.views, control=control, lens=True, batch_size=cfg.batch_size,
                            progress=progress)
    d = out / "probes" / "eval"
    files = list(table.write(d).values())
    files.append(plot_curves(table, d / "curves.png"))
    if table.contributions:
        files.append(plot_contributions(table, d / "contributions.png"))
    model_out = output_metrics(model, pairs.views, cfg.batch_size)
    files.append(write_json(d / "model_output.json", model_out))
    info = {"locations": table.locations, "methods": table.methods, "model_output": model_out,
            "n_pairs": table.meta.get("n_pairs")}
    return files, info


# --------------------------------------------------------------------------------------
# Heads
# --------------------------------------------------------------------------------------


def heads_step(model: Any, pairs: Pairs, cfg: ReportConfig, out: Path, progress: bool,
               name: str = "") -> tuple[list, dict]:
    from ..heads import LABELS, ScoreConfig, save_example_figures, score_heads

    d = out / "heads"
    scores = score_heads(model, pairs.views, batch_size=cfg.batch_size, progress=progress,
                         config=ScoreConfig(max_queries=cfg.head_queries))
    scores.model_name = name or scores.model_name
    paths = scores.save(d)
    paths.update(save_example_figures(model, pairs.pair("easy"), scores, d, n_queries=cfg.overlay_queries))
    labels = scores.labels()
    counts = {lab: sum(lab in v for v in labels.values()) for lab in LABELS}
    info = {"counts": counts, "n_heads": len(labels), "primary_px": scores.primary_px,
            "best_per_layer": [b.to_dict() for b in scores.best_per_layer()],
            "register_heads": len(scores.register_heads())}
    return list(paths.values()), info


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


def _knockout_specs(scores: Any, unit: Any, heads: list[int], cfg: ReportConfig) -> dict[str, Any]:
    from ..interventions import AttentionKnockout, Tokens

    common = dict(layers=unit.site.layer, kind="self", stack="dec", view=unit.query_view,
                  key_view=unit.key_view if unit.site.layout == "global" else None, heads=heads,
                  queries="others", mode="post")
    tokens = _control_tokens(scores, unit, heads, cfg.knockout_k, cfg.seed)
    return {"registers": AttentionKnockout(keys=Tokens.top_attended(cfg.knockout_k), **common),
            "random_tokens": AttentionKnockout(keys=Tokens.at(*tokens), **common)}


def knockout_step(model: Any, pairs: Pairs, cfg: ReportConfig, out: Path, progress: bool) -> tuple[list, dict]:
    from ..heads import HeadRef, HeadScores, plot_attention_overlays
    from ..heads.figures import default_queries
    from ..interventions import scale_invariant_pointmap_distance
    from ..probes import ProbeSet, ProbeTable, evaluate_probes, probe_frames

    module = _module(model)
    d = out / "knockout"
    probes = ProbeSet.load(out / "probes" / "model", device=module.device)
    clean = ProbeTable.load(out / "probes" / "eval")
    scores = HeadScores.load(out / "heads")
    unit, why = knockout_target(clean.contributions.get(PROBE_KIND), scores)
    heads, head_rule = knockout_heads(scores, unit)
    specs = _knockout_specs(scores, unit, heads, cfg)
    files = [specs[name].save(d / f"{name}.json") for name in specs]

    tables = {"clean": clean}
    # the clean output was scored by the evaluate step; one forward per batch and variant gives both
    # the knocked-out output's metrics and its distance to the clean output
    outputs = {"clean": json.loads((out / "probes" / "eval" / "model_output.json").read_text())}
    moved = {}
    ref = _outputs(model, pairs.views, cfg.batch_size)
    for name, spec in _tqdm(specs.items(), progress, desc="knockout", unit="variant"):
        with module.hooks(spec.fwd_hooks(module, n_views=len(pairs.views))):
            tables[name] = evaluate_probes(model, probes, pairs.views, lens=False, batch_size=cfg.batch_size)
            knocked = _outputs(model, pairs.views, cfg.batch_size)
        outputs[name] = output_metrics(model, pairs.views, cfg.batch_size, outputs=knocked)
        moved[name] = float(torch.cat([scale_invariant_pointmap_distance(o, r).cpu()
                                       for o, r in zip(knocked, ref)]).mean())

    metrics = ("e1_v2", "e2_aligned_v2", "e1_v1")
    rows = []
    for loc in clean.locations:
        row: dict[str, Any] = {"location": loc}
        for m in metrics:
            for name, t in tables.items():
                row[f"{m}_{name}"] = t.value(PROBE_KIND, loc, m)
        rows.append(row)
    out_row: dict[str, Any] = {"location": "model output"}
    for m in metrics:
        for name in tables:
            out_row[f"{m}_{name}"] = outputs[name].get(m, math.nan)
    rows.append(out_row)
    files.append(write_csv(d / "knockout.csv", rows))
    files.append(_plot_knockout(rows, clean.locations, unit, heads, d / "knockout.png"))

    # the heads' attention on the easy pair (Figure 15 style): registers light up whatever the query
    easy = pairs.pair("easy")
    refs = [HeadRef(unit.site.name, unit.query_view, unit.key_view, h) for h in heads]
    queries = default_queries(unit.grid, cfg.overlay_queries)
    files.append(plot_attention_overlays(model, easy, refs, d / "knocked_heads.png", queries=queries,
                                         labels=scores.labels()))

    # 4D comparison on the hard pair: clean and knocked-out probes, site by site from the knocked block on
    label = "hard"
    pair = pairs.pair(label)
    frames_clean = probe_frames(model, probes, pair, kind=PROBE_KIND)
    with module.hooks(specs["registers"].fwd_hooks(module, n_views=len(pair))):
        frames_ko = probe_frames(model, probes, pair, kind=PROBE_KIND)
    start = next((i for i, f in enumerate(frames_clean) if _location_layer(clean, f.label) >= unit.site.layer), 0)
    from ..viz import Frame, viewer_data

    frames = []
    for fc, fk in zip(frames_clean[start:], frames_ko[start:]):
        frames += [Frame(f"clean · {fc.label}", fc.views), Frame(f"knockout · {fk.label}", fk.views)]
    images, valid, gt = page_inputs(pair)
    data = viewer_data(frames, images, valid, gt, title=f"{label} pair · clean vs knockout (alternating)",
                       max_points=cfg.max_points)
    files.append(write_json(d / "viewer_compare.json", data))

    summary = {name: {"model_output": outputs[name], "output_moved": moved.get(name, 0.0)} for name in outputs}
    info = {"site": unit.site.name, "pattern_hook": unit.site.pattern_hook, "layer": unit.site.layer,
            "query_view": unit.query_view, "heads": heads, "head_rule": head_rule, "n_heads": unit.site.n_heads,
            "k": cfg.knockout_k, "why": why, "specs": {n: s.to_dict() for n, s in specs.items()},
            "summary": summary, "register_tokens": {h: list(scores.register_tokens(unit, h)[0]) for h in heads},
            "n_tokens": unit.n_tokens, "example": label}
    files.append(write_json(d / "knockout.json", {"rows": rows, **info}))
    return files, info


def _location_layer(table: Any, location: str) -> int:
    for r in table.rows:
        if r["location"] == location:
            return int(r["layer"]) if r["stack"] == "dec" else -2
    return -2


def _plot_knockout(rows: list[dict], locations: list[str], unit: Any, heads: list[int], path: Path) -> Path:
    from ..probes.views import _pyplot, _save

    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(max(9, 0.6 * len(locations) + 3), 3.8), layout="constrained")
    x = np.arange(len(locations))
    styles = {"clean": dict(color="#333333", marker="o", lw=2, label="clean"),
              "registers": dict(color="#d62728", marker="s", lw=1.5, label="register tokens knocked out"),
              "random_tokens": dict(color="#1f77b4", marker="^", lw=1, ls="--", label="random tokens (control)")}
    for ax, (m, title) in zip(axes, (("e2_aligned_v2", "aligned view-2 error (E.2)"),
                                     ("e1_v2", "view-2 error in view 1's frame (E.1)"))):
        for name, st in styles.items():
            ax.plot(x, [r[f"{m}_{name}"] for r in rows[: len(locations)]], **st)
        ax.set_xticks(x)
        ax.set_xticklabels(locations, rotation=90, fontsize=7)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("probe error (GT-normalised units)")
    axes[1].legend(fontsize=8)
    fig.suptitle(f"knockout of {unit.site.name} heads {heads}: probed errors at every site", fontsize=11)
    return _save(fig, path)


# --------------------------------------------------------------------------------------
# Patching
# --------------------------------------------------------------------------------------


def patching_step(model: Any, pairs: Pairs, cfg: ReportConfig, out: Path, progress: bool) -> tuple[list, dict]:
    from ..interventions import distance_to, patching_sweep

    module = _module(model)
    n = n_pairs(pairs.views)
    idx = list(range(cfg.patch_pairs))
    other = [(i + 1) % n for i in idx]  # corrupted view 2: the next pair's view 2 (another scene)
    v = pairs.views
    clean = tuple(view["img"][idx] for view in v)
    corrupted = (v[0]["img"][idx],) + tuple(view["img"][other] for view in v[1:])
    with torch.no_grad():
        clean_out = module.view_outputs(module(*clean))
    files, info = [], {"pairs": idx, "corrupted_view2_from": other, "sweeps": {}}
    for per in cfg.patch_per:
        metric = distance_to(clean_out, scale_invariant=True)
        sweep = patching_sweep(model, clean, corrupted, per=per, metric=metric, progress=progress)
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


def views_step(model: Any, pairs: Pairs, cfg: ReportConfig, out: Path, progress: bool) -> tuple[list, dict]:
    from PIL import Image

    from ..probes import ProbeSet, probe_frames
    from ..viz import rerun_available, viewer_data, write_rerun_recording

    module = _module(model)
    probes = ProbeSet.load(out / "probes" / "model", device=module.device)
    rerun = rerun_available()  # the .rrd sidecars need the optional extra; the page's viewers do not
    d = out / "views"
    files, info = [], {}
    for label in _tqdm(list(pairs.examples), progress, desc="4D views", unit="pair"):
        pair = pairs.pair(label)
        images, valid, gt = page_inputs(pair)
        for v, img in enumerate(images, start=1):
            files.append(atomic_write(d / f"pair_{label}_view{v}.png",
                                      lambda p, img=img: Image.fromarray(img).save(p, format="PNG")))
        methods = {PROBE_KIND: probe_frames(model, probes, pair, kind=PROBE_KIND),
                   "lens": probe_frames(model, probes, pair, lens=True)}
        for method, frames in methods.items():
            title = f"{label} pair · {'probes' if method == PROBE_KIND else 'pointmap lens'}"
            data = viewer_data(frames, images, valid, gt, title=title, max_points=cfg.max_points)
            files.append(write_json(d / f"viewer_{label}_{method}.json", data))
        if rerun:
            files.append(write_rerun_recording(d / f"pair_{label}.rrd", methods[PROBE_KIND], images, valid, gt,
                                               app_id=f"mv_interp_report_{label}"))
        info[label] = dict(pairs.stats[pairs.examples[label]])
    info["rerun"] = rerun
    return files, info

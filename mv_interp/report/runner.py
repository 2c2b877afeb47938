"""``run_report``: the whole analysis of one model into one output folder and one HTML page."""

from __future__ import annotations

import math
import os
import platform
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from ..adapters.base import MultiViewModel
from ..types import ModelLike, as_module
from . import analysis as A
from .config import ReportConfig
from ..viz.recording import rerun_available
from .steps import Steps, digest

REPORT = "report.html"
SUMMARY = "summary.json"
TITLES = {
    "probes": "train pointmap probes at every site",
    "control": "train the random-backbone control probes",
    "evaluate": "evaluate probes, lens and control per site",
    "heads": "score and classify every attention head",
    "knockout": "knock out the register tokens (Appendix G)",
    "patching": "activation-patching sweeps",
    "views": "4D views of the easy and hard pair",
}
STEP_NAMES = tuple(TITLES)


def smoke_reasons(cfg: ReportConfig, infos: dict[str, dict[str, Any]], pairs_used: int,
                  photos: bool = False) -> list[str]:
    """Why this run's numbers are not meaningful yet, each with the setting to raise (empty: none).

    A smoke run (``cfg.smoke``, the ``fast`` preset), and probes whose training loss still fell by
    more than ``cfg.converge_tol`` over the last tenth of training."""
    out = []
    if cfg.smoke and photos:
        out.append(f"a --fast smoke run on {pairs_used} photo pair(s) ({cfg.bootstrap} bootstrap replicates, "
                   f"{cfg.patch_pairs} patching pair(s) at most); run without --fast, and give more pairs")
    elif cfg.smoke:
        out.append(f"a --fast smoke run: probes trained {cfg.probe_steps} steps, measured on {pairs_used} held-out "
                   "pairs; run without --fast (or raise --probe-steps and --pairs)")
    for name, flag in (("probes", "--probe-steps"), ("control", "--control-steps")):
        drop = infos.get(name, {}).get("tail_drop")
        if isinstance(drop, (int, float)) and math.isfinite(drop) and drop > cfg.converge_tol:
            out.append(f"the {name} did not converge: their loss still fell {100 * drop:.0f}% over the last tenth of "
                       f"training (more than {100 * cfg.converge_tol:.0f}%); raise {flag} "
                       f"(now {infos[name].get('steps')})")
    return out


def model_name(spec: Any) -> str:
    """A display name for what ``load_model`` was given."""
    if isinstance(spec, (str, os.PathLike)):
        from ..api import list_models

        s = str(spec)
        return s if s in list_models() else Path(s).name
    return type(spec).__name__


def model_card(spec: Any) -> str | None:
    """The model card (``README.md``) of a bundled model or of an HF-style model directory."""
    if not isinstance(spec, (str, os.PathLike)):
        return None
    from ..api import list_models
    from ..loading import BUNDLED_DIR

    s = str(spec)
    candidates = [BUNDLED_DIR / s / "README.md"] if s in list_models() else []
    if Path(s).is_dir():
        candidates.append(Path(s) / "README.md")
    for c in candidates:
        if c.is_file():
            return c.read_text()
    return None


class EtaLog:
    """A ``progress(done, total)`` hook that logs the rate and the ETA every ``every`` of the way.

    >>> hook = EtaLog(print, "probes", pairs_per_step=64)
    >>> hook(157, 1563)   # "probes: 157/1563 (10 %), 41.2 pairs/s, ETA 38 min 10 s"
    """

    def __init__(self, log: Callable[[str], None], label: str, pairs_per_step: int = 1, every: float = 0.1):
        self.log, self.label, self.pairs, self.every = log, label, pairs_per_step, every
        self.t0: float | None = None
        self.start = 0
        self.next = 0.0

    def __call__(self, done: int, total: int) -> None:
        now = time.perf_counter()
        if self.t0 is None:  # the first step of this run (a resumed run starts later)
            self.t0, self.start, self.next = now, done - 1, (done - 1) / total + self.every
            return
        if done / total < self.next and done != total:
            return
        self.next = done / total + self.every
        rate = (done - self.start) / max(now - self.t0, 1e-9)
        eta = (total - done) / rate if rate > 0 else float("inf")
        self.log(f"  {self.label}: {done}/{total} steps ({done / total:.0%}), {rate * self.pairs:.1f} pairs/s, "
                 f"ETA {_duration(eta)}")


def _duration(seconds: float) -> str:
    if not seconds < float("inf"):
        return "unknown"
    m, s = divmod(int(round(seconds)), 60)
    return f"{m} min {s} s" if m else f"{s} s"


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, else what ``platform`` knows)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return cpu


def _environment(module: MultiViewModel) -> dict[str, Any]:
    import mv_interp

    cpu = cpu_name()
    dev = module.device
    return {"mv_interp": mv_interp.__version__, "torch": torch.__version__, "python": sys.version.split()[0],
            "platform": platform.platform(), "cpu": cpu, "cpu_threads": torch.get_num_threads(),
            "device": str(dev) + (f" ({torch.cuda.get_device_name(dev)})" if dev.type == "cuda" else "")}


def run_report(model: ModelLike | str | os.PathLike = "dust3r-toy", config: ReportConfig | None = None, out: str | os.PathLike = "mv_interp_out",
               *, data: str | os.PathLike | None = None, images: Sequence[str | os.PathLike] | None = None,
               probes: str | os.PathLike | None = None, device: str | torch.device = "cpu",
               model_config: Any = None, family: str | None = None, force: bool | Iterable[str] = False,
               progress: bool = True, log: Callable[[str], None] = print, command: str = "",
               compile: bool = False) -> dict[str, Path]:
    """Run every step of the report (reusing finished ones) and write ``OUT/report.html``.

    Args:
        model: anything :func:`mv_interp.load_model` takes (bundled name, official ``.pth``, HF dir,
            state dict file with ``model_config``), or an already loaded model.
        config: :class:`ReportConfig` (default: the ``default`` preset).
        out: output folder (created); a re-run into the same folder reuses finished steps.
        data: a capture directory (``docs/data.md``) instead of synthetic rooms.
        images: plain photos instead: image files taken as pairs (``a.png b.png [c.png d.png …]``),
            no depth or cameras. Everything that needs no ground truth runs (the pointmap lens 4D
            view, attention maps, register/local head scores, the knockout and patching measured by
            how far the model's own output moves); the sections that need ground truth say so.
        probes: with ``images``, a probe set trained on this model (e.g. a synthetic report's
            ``OUT/probes/model``) to apply to the photos as well.
        force: ``True`` recomputes every step; a list of step names recomputes those (and, as their
            results change, everything downstream).
        progress: progress bars, and for probe training a log line with the rate and ETA every 10 %.
        compile: run the model's hook-free forwards compiled (:func:`mv_interp.model.enable_compile`);
            the compile time is logged. Off by default (minutes of compilation; pays off on a GPU).

    Returns ``{"html": …, "summary": …, "manifest": …}``.

    >>> run_report("dust3r-toy", ReportConfig.preset("fast"), "runs/report")
    >>> run_report("dust3r-toy", out="runs/photos", images=["a.png", "b.png"])
    """
    from ..api import load_model
    from ..errors import check_writable
    from ..resume import fingerprint

    t_start = time.perf_counter()
    cfg = config or ReportConfig.preset("default")
    out = Path(out)
    if not isinstance(force, bool):
        force = list(force)
        unknown = sorted(set(force) - set(STEP_NAMES))
        if unknown:
            raise ValueError(f"--force: unknown step(s) {unknown}; steps: {list(STEP_NAMES)}")
    check_writable(out)  # a read-only or full output folder fails now, not after the model and the steps
    name, spec = model_name(model), model
    if isinstance(model, (str, os.PathLike)):
        log(f"loading {model} on {device}")
        model = load_model(model, device=device, config=model_config, family=family)
    module = as_module(model).eval()
    if compile:
        from ..model import enable_compile

        fast = enable_compile(module)
        log("compiled fast path on: hook-free forwards run through torch.compile (first calls compile)")
    if module.fixed_n_views is not None and module.fixed_n_views != cfg.views:
        raise ValueError(f"{type(module).__name__} takes {module.fixed_n_views} views per example; the report was "
                         f"asked for --views {cfg.views} (use --views {module.fixed_n_views}, or a many-view model: "
                         "Fast3R, VGGT)")
    from ..adapters.base import adapter_for_model

    model_id = {"family": adapter_for_model(module).name, "config": module.config.to_dict(),
                "fingerprint": fingerprint(module)}
    timings: dict[str, float] = {}

    t = time.perf_counter()
    if images is not None:
        if data is not None:
            raise ValueError("give --data (a capture with ground truth) or --images (plain photos), not both")
        log(f"loading {len(images)} image(s) as {len(images) // cfg.views} "
            + ("pair(s)" if cfg.views == 2 else f"example(s) of {cfg.views} views"))
        pairs = A.image_pairs(model, images, cfg.views)
    else:
        if probes is not None:
            raise ValueError("--probes applies trained probes to plain photos; use it with --images")
        log(f"preparing {cfg.pairs} held-out " + ("pairs" if cfg.views == 2 else f"examples of {cfg.views} views")
            + (f" from {data}" if data else " (synthetic rooms)"))
        pairs = A.prepare_pairs(model, cfg, data, progress)
        ex = {k: pairs.stats[i] for k, i in pairs.examples.items()}
        log("  example pairs: " + ", ".join(f"{k} #{s['index']} (overlap {s['overlap']:.0%}, rotation "
                                            f"{s['rotation_deg']:.0f}°)" for k, s in ex.items()))
    timings["pairs"] = time.perf_counter() - t
    photos = images is not None
    from ..probes.data import batch_size_of

    n_used = batch_size_of(pairs.views)

    base = {"model": model_id, "data": pairs.describe}
    run_probes = not photos
    total = len(STEP_NAMES) - (0 if cfg.control else 1) - (3 if photos else 0)
    steps = Steps(out, force=force, log=log, total=total)

    def probe_step(name: str, control: bool, folder: Path) -> None:
        tconf = A.train_config(cfg, control=control)
        settings = {**base, "train": tconf.to_dict()}
        key = steps.key(name, settings)  # also marks the folder, so an interrupted run resumes only its own
        steps.run(name, settings, lambda: ([folder / "probes.json", folder / "probes.safetensors"],
                                           A.train_step(model, pairs, tconf, folder, key,
                                                        EtaLog(log, name, tconf.batch_size) if progress else False)),
                  title=TITLES[name])

    probes_dir = Path(probes) if probes is not None else out / "probes" / "model"
    if photos:
        # plain photos: nothing to train or evaluate probes on; earlier synthetic steps' files go
        for stale in ("probes", "control", "evaluate"):
            steps.manifest.steps.pop(stale, None)
        if probes is not None and not (probes_dir / "probes.json").is_file():
            raise FileNotFoundError(f"--probes {probes_dir}: no probes.json there; give a probe set trained on this "
                                    "model (a report's OUT/probes/model, or `mv-interp probes train`)")
    if run_probes:
        probe_step("probes", False, out / "probes" / "model")
        reads = ["probes"]
        if cfg.control:
            probe_step("control", True, out / "probes" / "control")
            reads.append("control")
        steps.run("evaluate", {**base, "batch": cfg.batch_size, "control": cfg.control, "bootstrap": cfg.bootstrap,
                               "seed": cfg.seed}, lambda: A.evaluate_step(model, pairs, cfg, out, progress),
                  reads=reads, title=TITLES["evaluate"])
    use_probes = probes_dir if (run_probes or probes is not None) else None
    probes_key = {"probes": str(probes_dir.resolve()), "mtime": (probes_dir / "probes.safetensors").stat().st_mtime}\
        if photos and probes is not None else None
    steps.run("heads", {**base, "batch": cfg.batch_size, "queries": cfg.overlay_queries, "examples": pairs.examples,
                        "query_patches": cfg.to_dict().get("query_patches"),
                        "bootstrap": cfg.bootstrap, "seed": cfg.seed, "per_pair": True,
                        **({"head_queries": cfg.head_queries} if cfg.head_queries is not None else {})},
              lambda: A.heads_step(model, pairs, cfg, out, progress, name), title=TITLES["heads"])
    steps.run("knockout", {**base, "k": cfg.knockout_k, "seed": cfg.seed, "batch": cfg.batch_size,
                           "points": cfg.max_points, "queries": cfg.overlay_queries, "examples": pairs.examples,
                           "query_patches": cfg.to_dict().get("query_patches"), "bootstrap": cfg.bootstrap,
                           "controls": ["random_tokens", "positive"], "probes_key": probes_key},
              lambda: A.knockout_step(model, pairs, cfg, out, progress, use_probes),
              reads=["probes", "evaluate", "heads"],
              title=TITLES["knockout"])
    steps.run("patching", {**base, "pairs": min(cfg.patch_pairs, n_used), "per": list(cfg.patch_per)},
              lambda: A.patching_step(model, pairs, cfg, out, progress), title=TITLES["patching"])
    steps.run("views", {**base, "points": cfg.max_points, "examples": pairs.examples, "probes_key": probes_key,
                       "rerun": rerun_available()},
              lambda: A.views_step(model, pairs, cfg, out, progress, use_probes),
              reads=["probes"], title=TITLES["views"])
    smoke = smoke_reasons(cfg, {n: r.info for n, r in steps.records.items()}, n_used, photos)
    for line in smoke:
        log(f"NOTE: {line}")

    if compile:
        log(f"compiled fast path: {fast.calls['compiled']} compiled and {fast.calls['eager']} eager forwards, "
            f"first calls (compilation included) {sum(fast.compile_seconds.values()):.0f} s")
        timings["compile_first_calls"] = sum(fast.compile_seconds.values())
    t = time.perf_counter()
    from .page import build_page

    ctx = {
        "records": {n: {"seconds": r.seconds, "reused": r.reused, "finished": r.finished, "info": r.info,
                        "files": r.files} for n, r in steps.records.items()},
        "titles": TITLES, "timings": timings, "config": cfg.to_dict(), "data": pairs.describe,
        "model": {"name": name, "family": model_id["family"], "config": model_id["config"],
                  "fingerprint": model_id["fingerprint"], "parameters": sum(p.numel() for p in module.parameters()),
                  "img_size": list(module.config.img_size)},
        "model_card": model_card(spec), "pairs_used": n_used, "photos": photos, "smoke": smoke,
        "environment": _environment(module), "command": command,
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    timings["total"] = time.perf_counter() - t_start  # provisional: the page shows the time up to here
    page, facts = build_page(ctx, out)
    html_path = A.write_text(out / REPORT, page)
    timings["page"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t_start
    steps.manifest.meta = {"last_run": ctx["created"], "model": name, "config": cfg.to_dict(), "data": pairs.describe,
                           "timings": timings, "key": digest(base)}
    steps.manifest.save()
    summary = {"model": name, "created": ctx["created"], "timings": timings,
               "steps": {n: {"seconds": r["seconds"], "reused": r["reused"]} for n, r in ctx["records"].items()},
               "facts": facts, "examples": {k: pairs.stats[i] for k, i in pairs.examples.items()},
               "pairs_used": n_used, "smoke": smoke, "command": command}
    summary_path = A.write_json(out / SUMMARY, summary)
    log(f"report: {html_path} ({html_path.stat().st_size / 1e6:.1f} MB) in {timings['total']:.0f} s")
    return {"html": html_path, "summary": summary_path, "manifest": steps.manifest.path}

"""Joint training of every probe at every site from one frozen backbone pass per batch.

Each step: the batch of step ``s`` (a pure function of the data seed and ``s``), one backbone
forward under ``no_grad`` recording only the probed hooks, every probe of every kind at every
site on those activations, the summed per-location losses, one AdamW step over all probes.
Because AdamW is element-wise and a probe's parameters only enter its own location's loss,
this trains each probe exactly as a run of its own would (at a fraction of the backbone cost).

A run directory holds ``checkpoint.pt`` (probes, optimiser, step, log; written atomically every
``checkpoint_every`` steps), ``train_log.jsonl`` and, at the end, the probe set
(``probes.safetensors`` + ``probes.json``). Calling :func:`train_probes` again on the same
directory resumes from the checkpoint — bit-exact on CPU — or, when ``steps`` grew, extends it.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path
from typing import Any

import torch

from ..resume import StateFile
from ..types import ModelLike, as_module
from .config import TrainConfig
from .data import PairSource, check_batch, open_source
from .losses import probe_loss
from .probeset import ProbeSet, fingerprint, random_backbone
from .sites import select_sites

CHECKPOINT = "checkpoint.pt"
LOG = "train_log.jsonl"


def autocast_context(device: torch.device, amp: str):
    """bf16 autocast on CUDA for ``amp="auto"``; always for ``"bf16"``; never for ``"off"``."""
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def _data_source(data: Any, module, config: TrainConfig) -> PairSource:
    return open_source(data, tuple(module.config.img_size), seed=config.data_seed)


def _identity(config: TrainConfig, module, source: PairSource, sites) -> dict[str, Any]:
    return {"train": config.identity(), "model_config": module.config.to_dict(), "fingerprint": fingerprint(module),
            "data": source.describe(), "sites": [s.name for s in sites]}


def _save_checkpoint(state: StateFile, probes: ProbeSet, opt: torch.optim.Optimizer, step: int) -> None:
    state.save({"step": step, "probes": {k: v.detach().cpu() for k, v in probes.bank.state_dict().items()},
                "optim": _to_cpu(opt.state_dict())})


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_cpu(v) for v in obj]
    return obj


def _load_checkpoint(state: StateFile, probes: ProbeSet, opt: torch.optim.Optimizer) -> int:
    """The step to resume from (0 without a checkpoint); a checkpoint of other settings is an error."""
    saved = state.load(on_mismatch="error")
    if saved is None:
        return 0
    probes.bank.load_state_dict(saved["probes"])
    opt.load_state_dict(saved["optim"])
    return int(saved["step"])


def train_probes(model: ModelLike, config: TrainConfig | None = None, out_dir: str | os.PathLike | None = None,
                 data: Any = None, progress: bool = True, stop_after: int | None = None) -> ProbeSet:
    """Train probes of every kind in ``config.probes`` at every probe site of ``model``, jointly.

    Args:
        model: an :class:`~mv_interp.model.MVModel` or hooked module (kept frozen; its device is used).
        config: :class:`TrainConfig` (sites, probe kinds, steps, optimiser, seeds, control backbone).
        out_dir: run directory for checkpoints, the log and the final probe set; ``None`` trains in
            memory. An existing run there with the same settings is resumed (or extended).
        data: ``None`` (synthetic pairs rendered on the fly at the model's input size), a capture
            directory or pairs file (:func:`~mv_interp.probes.data.open_pairs`), a pair
            source with ``batch(step, batch_size, device)`` / ``describe()``, a batch of views held
            in memory (visited in seeded epochs), or a dataset whose items are samples (lists of views).
        progress: show a tqdm bar with the loss.
        stop_after: stop (with a checkpoint) once this step is reached — to split a run.

    Returns:
        the trained :class:`ProbeSet` (also saved in ``out_dir``).

    >>> probes = train_probes(model, TrainConfig(steps=2000, batch_size=8), "runs/probes")
    >>> control = train_probes(model, TrainConfig(steps=2000, backbone="random"), "runs/control")
    """
    from tqdm.auto import tqdm

    config = config or TrainConfig()
    module = as_module(model)
    if config.backbone == "random":
        module = random_backbone(module, config.control_seed)
    was_training = module.training
    module.eval()
    device = module.device
    source = _data_source(data, module, config)
    # a model taking any number of views is probed at the data's view count
    n_views = module.fixed_n_views or len(source.batch(0, 1, device))
    sites = select_sites(module.probe_sites(encoder_blocks=config.encoder_blocks, sublayers=config.sublayers,
                                            n_views=n_views), config.sites)
    meta = {"backbone": config.backbone, "control_seed": config.control_seed if config.backbone == "random" else None,
            "train": config.to_dict(), "data": source.describe()}
    probes = ProbeSet.for_model(module, sites, config.probes, seed=config.seed, meta=meta, n_views=n_views)
    params = [p for p in probes.parameters()]
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    identity = _identity(config, module, source, sites)

    out = Path(out_dir) if out_dir is not None else None
    checkpoint = StateFile(out / CHECKPOINT, identity, what="probe run") if out is not None else None
    step = _load_checkpoint(checkpoint, probes, opt) if checkpoint is not None else 0
    end = config.steps if stop_after is None else min(config.steps, stop_after)
    hooks = probes.hooks
    need = ("img", "pts3d", "valid") + (("depth",) if any(s.target == "depth" for s in config.probes) else ())

    bar = tqdm(total=config.steps, initial=step, disable=not progress, desc="probes", dynamic_ncols=True)
    log_lines: list[str] = []
    t0 = time.perf_counter()
    try:
        while step < end:
            views = source.batch(step, config.batch_size, device)
            check_batch(views, need)
            imgs = [v["img"] for v in views]
            grid = (imgs[0].shape[-2] // probes.patch_size, imgs[0].shape[-1] // probes.patch_size)
            with autocast_context(device, config.amp):
                with torch.no_grad():
                    _, cache = module.run_with_cache(*imgs, names_filter=hooks)
                outputs = probes(probes.tokens(cache), grid)
                loss, logs = probe_loss(outputs, probes.locations, views, probes.specs, config.alpha)
            del cache
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            value = float(loss.detach())
            bar.set_postfix(loss=f"{value:.4f}")
            bar.update(1)
            log_lines.append(json.dumps({"step": step, "loss": value, **{k: float(v) for k, v in logs.items()},
                                         "time_s": round(time.perf_counter() - t0, 3)}))
            if out is not None and (step % config.checkpoint_every == 0 or step == end):
                _flush_log(out, log_lines)
                _save_checkpoint(checkpoint, probes, opt, step)
    finally:
        bar.close()
        module.train(was_training)
    probes.meta["step"] = step
    if out is not None:
        _flush_log(out, log_lines)
        if step == config.steps:
            probes.save(out)
    return probes


def _flush_log(out: Path, lines: list[str]) -> None:
    # Flushed with each checkpoint: an interrupted run loses the lines it will redo on resume.
    if not lines:
        return
    out.mkdir(parents=True, exist_ok=True)
    with open(out / LOG, "a") as f:
        f.write("\n".join(lines) + "\n")
    lines.clear()

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
A resumed run first cuts the log back to the checkpoint's step and removes temporary files of
writes a kill interrupted; a damaged checkpoint is reported and the run starts again
(docs/reliability.md).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .. import distributed as D
from ..io import atomic_write
from ..io import remove_stale_tmp
from ..resume import StateFile
from ..types import ModelLike, as_module
from .config import TrainConfig
from ..data.sources import SourceLike
from .data import PairSource, Prefetcher, check_batch, open_source, shard_batch
from .losses import stacked_probe_loss
from .probeset import ProbeSet, fingerprint, random_backbone
from .sites import select_sites

CHECKPOINT = "checkpoint.pt"
LOG = "train_log.jsonl"


def autocast_context(device: torch.device, amp: str):
    """bf16 autocast on CUDA for ``amp="auto"``; always for ``"bf16"``; never for ``"off"``."""
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def _data_source(data: SourceLike, module, config: TrainConfig) -> PairSource:
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
    """The step to resume from: 0 without a checkpoint — or, with a warning, when it is damaged (a
    truncated or corrupt file is never resumed from: the run starts again, and reaches the same
    result). A checkpoint of other settings is an error that names the fields that differ."""
    if not state.path.is_file():
        return 0
    try:
        saved = state.load(on_mismatch="restart")
        if saved is not None and not {"step", "probes", "optim"} <= set(saved):
            raise ValueError("missing entries")
    except Exception as e:  # noqa: BLE001 - torch raises many types on a damaged file
        warnings.warn(f"{state.path} is damaged ({type(e).__name__}: "
                      f"{str(e).splitlines()[0][:100] if str(e) else ''}); training these probes again from step 0",
                      RuntimeWarning, stacklevel=3)
        return 0
    if saved is None:  # readable, but of another run: the error names the fields that differ
        state.load(on_mismatch="error")
        return 0
    probes.bank.load_state_dict(saved["probes"])
    opt.load_state_dict(saved["optim"])
    return int(saved["step"])


def make_optimizer(params: list, config: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW over the probes' (fp32 master) weights: the fused kernel where torch has one for the
    device (one kernel for all parameters), else the multi-tensor ``foreach`` one. Both are
    element-wise, so each probe still gets exactly the update a run of its own would."""
    kwargs: dict[str, Any] = {"lr": config.lr, "weight_decay": config.weight_decay}
    if device.type in ("cuda", "cpu"):
        kwargs["fused"] = True
    else:
        kwargs["foreach"] = True
    return torch.optim.AdamW(params, **kwargs)


def train_probes(model: ModelLike, config: TrainConfig | None = None, out_dir: str | os.PathLike | None = None,
                 data: SourceLike = None, progress: bool | Callable[[int, int], None] = True, stop_after: int | None = None,
                 prefetch: int = 2) -> ProbeSet:
    """Train probes of every kind in ``config.probes`` at every probe site of ``model``, jointly.

    Args:
        model: an :class:`~mv_interp.model.MVModel` or hooked module (kept frozen; its device is used;
            its compiled fast path is taken when enabled, see :func:`mv_interp.model.enable_compile`).
        config: :class:`TrainConfig` (sites, probe kinds, steps, optimiser, seeds, control backbone).
        out_dir: run directory for checkpoints, the log and the final probe set; ``None`` trains in
            memory. An existing run there with the same settings is resumed (or extended).
        data: ``None`` (synthetic pairs rendered on the fly at the model's input size), a capture
            directory or pairs file (:func:`~mv_interp.probes.data.open_pairs`), a pair
            source with ``batch(step, batch_size, device)`` / ``describe()``, a batch of views held
            in memory (visited in seeded epochs), or a dataset whose items are samples (lists of views).
        progress: show a tqdm bar with the loss; or a callable ``progress(step, total)`` called
            after every step (e.g. a report's ETA).
        stop_after: stop (with a checkpoint) once this step is reached — to split a run.
        prefetch: batches made ahead in a background worker (0: make each batch when needed).
            The time the training loop waited for data is logged as ``data_stall_s``.

    Under ``torchrun`` (an initialised ``torch.distributed`` process group, see
    :mod:`mv_interp.distributed`) every rank makes its own shard of each batch of
    ``config.batch_size`` pairs and the ranks average their gradients: the same pairs and, in
    expectation, the same updates as one process; rank 0 writes the files.

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
    W = D.world_size()
    if config.batch_size % W:
        raise ValueError(f"TrainConfig.batch_size={config.batch_size} does not split over {W} ranks; "
                         f"use a multiple of {W}")
    first, last = config.batch_size // W * D.rank(), config.batch_size // W * (D.rank() + 1)
    # a model taking any number of views is probed at the data's view count
    n_views = module.fixed_n_views or len(source.batch(0, 1, device))
    sites = select_sites(module.probe_sites(encoder_blocks=config.encoder_blocks, sublayers=config.sublayers,
                                            n_views=n_views), config.sites)
    meta = {"backbone": config.backbone, "control_seed": config.control_seed if config.backbone == "random" else None,
            "train": config.to_dict(), "data": source.describe(), "world_size": W}
    probes = ProbeSet.for_model(module, sites, config.probes, seed=config.seed, meta=meta, n_views=n_views)
    params = [p for p in probes.parameters()]
    opt = make_optimizer(params, config, device)
    identity = _identity(config, module, source, sites)

    out = Path(out_dir) if out_dir is not None else None
    checkpoint = StateFile(out / CHECKPOINT, identity, what="probe run") if out is not None else None
    step = 0
    if out is not None:
        remove_stale_tmp(out)  # left by a run killed inside a write
        step = _load_checkpoint(checkpoint, probes, opt)
        # the log may hold steps after the last committed checkpoint (a kill, a full disk): they are redone
        truncate_log(out / LOG, step)
    end = config.steps if stop_after is None else min(config.steps, stop_after)
    need = ("img", "pts3d", "valid") + (("depth",) if any(s.target == "depth" for s in config.probes) else ())
    plan = probes.loss_plan(device)
    writer = out is not None and D.is_main()

    def make(s: int):
        views = shard_batch(source, s, config.batch_size, device, first, last)
        check_batch(views, need)
        return views

    show = progress is True and D.is_main()
    bar = tqdm(total=config.steps, initial=step, disable=not show, desc="probes", dynamic_ncols=True)
    pending: list[tuple[int, Tensor, float, float]] = []  # (step, logged values on the device, time, stall)
    names: list[str] = []
    feed = Prefetcher(make, step, end, device, prefetch) if prefetch > 0 and step < end else None
    t0 = time.perf_counter()
    try:
        while step < end:
            views = feed.get(step) if feed is not None else make(step)
            imgs = [v["img"] for v in views]
            grid = (imgs[0].shape[-2] // probes.patch_size, imgs[0].shape[-1] // probes.patch_size)
            with autocast_context(device, config.amp):
                with torch.no_grad():
                    stacks = probes.capture(module, *imgs)
                outputs = probes.bank.stacked(stacks, grid)
                loss, logs = stacked_probe_loss(outputs, plan, views, probes.specs, config.alpha)
            del stacks
            opt.zero_grad(set_to_none=True)
            loss.backward()
            names = ["loss", *logs]
            logged = torch.stack([loss.detach().float(), *(v.detach().float() for v in logs.values())])
            # one collective per step: the gradients and the logged values, averaged over ranks
            D.all_reduce_mean([p.grad for p in params if p.grad is not None] + [logged])
            opt.step()
            step += 1
            pending.append((step, logged, time.perf_counter() - t0, feed.stall_s if feed is not None else 0.0))
            bar.update(1)
            if callable(progress):
                progress(step, config.steps)
            if step % config.checkpoint_every == 0 or step == end:
                # the only host sync of the loop: the log values of the steps since the last one
                lines = _log_lines(names, pending)
                bar.set_postfix(loss=f"{json.loads(lines[-1])['loss']:.4f}")
                if writer:
                    _flush_log(out, lines)
                    _save_checkpoint(checkpoint, probes, opt, step)
                D.barrier()
    finally:
        if feed is not None:
            feed.close()
        bar.close()
        module.train(was_training)
    probes.meta["step"] = step
    if out is not None and step == config.steps:
        if writer:
            probes.save(out)
        D.barrier()
    return probes


def truncate_log(path: Path, step: int) -> None:
    """Keep the lines of ``train_log.jsonl`` up to ``step`` (the committed checkpoint); drop later,
    repeated and unreadable (half-written) lines. Rewritten atomically, only when something is dropped."""
    if not path.is_file():
        return
    text = path.read_text()
    keep, last = [], 0
    for line in text.splitlines():
        try:
            s = int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            continue
        if last < s <= step:  # in order, each step once (logs of older versions may repeat steps)
            keep.append(line)
            last = s
    new = "".join(line + "\n" for line in keep)
    if new != text:
        if keep:
            atomic_write(path, lambda p: Path(p).write_text(new))
        else:
            path.unlink()


def _log_lines(names: list[str], pending: list) -> list[str]:
    values = torch.stack([v for _, v, _, _ in pending]).tolist()
    lines = [json.dumps({"step": s, **dict(zip(names, vals)), "time_s": round(t, 3), "data_stall_s": round(st, 3)})
             for (s, _, t, st), vals in zip(pending, values)]
    pending.clear()
    return lines


def _flush_log(out: Path, lines: list[str]) -> None:
    # Written with each checkpoint: an interrupted run loses the lines it will redo on resume.
    if not lines:
        return
    out.mkdir(parents=True, exist_ok=True)
    with open(out / LOG, "a") as f:
        f.write("\n".join(lines) + "\n")

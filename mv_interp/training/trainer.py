"""Train a DUSt3R-family model from scratch on synthetic scenes rendered on the fly.

The same hooked implementation and checkpoint format as everything else; DUSt3R's confidence
loss (α = 0.2); AdamW with warm-up + cosine; bf16 autocast on CUDA; view-swapped copies of every
pair; checkpoints every few minutes (a new directory per checkpoint, then an atomic ``LATEST``
pointer), so a long training is several resumed runs with the same result as one.

>>> cfg = TrainConfig(model={"img_size": [128, 128], "enc_embed_dim": 128, ...})
>>> train(cfg, "runs/toy", device="cuda", minutes=9)     # call again to resume
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from ..adapters.base import ConfigMixin, get_adapter
from ..data.views import ViewsLike, as_views
from ..io import atomic_write
from ..resume import check_identity
from ..types import ModelLike, as_module

#: scene seeds of the validation set start here; training seeds stay far below it
VAL_SEED = 1_000_000_000


@dataclass(frozen=True)
class TrainConfig(ConfigMixin):
    """Everything that determines a training run (with the seed, the run is reproducible)."""

    model: dict = field(default_factory=dict)
    """Config fields of the model family (e.g. DUSt3RConfig's); missing fields take their defaults."""
    family: str = "dust3r"
    """Registered adapter whose model is trained (any config of the DUSt3R family)."""
    scene: dict = field(default_factory=dict)
    """SceneConfig overrides; ``image_size`` defaults to the model's ``img_size``."""
    batch_size: int = 256
    """Pairs per optimiser step, view-swapped copies included."""
    symmetrize: bool = True
    """Train on every pair and its view-swapped copy (half the batch is rendered)."""
    lr: float = 5e-4
    """Peak learning rate (AdamW)."""
    weight_decay: float = 0.05
    """AdamW weight decay (not applied to biases, norms and the mask token)."""
    betas: tuple = (0.9, 0.95)
    """AdamW betas."""
    warmup_steps: int = 500
    """Linear warm-up steps."""
    total_steps: int = 20_000
    """Length of the cosine schedule (training may stop earlier on its time budget)."""
    min_lr_ratio: float = 0.02
    """Final learning rate as a fraction of ``lr``."""
    alpha: float = 0.2
    """Confidence regulariser of the loss."""
    grad_clip: float = 1.0
    """Gradient-norm clip (0 disables)."""
    bf16: bool = True
    """bf16 autocast for the backbone on CUDA (heads and loss stay fp32)."""
    seed: int = 0
    """Seed of the training scenes and the initial weights."""
    val_pairs: int = 256
    """Held-out pairs of the validation set (fixed scene seeds from VAL_SEED)."""
    val_every: int = 500
    """Validate every this many steps (and at the end of each run)."""
    ckpt_minutes: float = 3.0
    """Write a checkpoint at least this often."""
    log_every: int = 25
    """Append a training log line every this many steps."""
    compile_render: bool = False
    """Render training scenes with ``torch.compile`` (faster on GPU after a one-off compile; same values
    up to float rounding, so bit-exact resume holds within one setting)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "betas", tuple(self.betas))
        if self.batch_size < 2 or (self.symmetrize and self.batch_size % 2):
            raise ValueError(f"batch_size={self.batch_size}: need an even number >= 2 when symmetrize=True")
        if not 0 <= self.warmup_steps < self.total_steps:
            raise ValueError(f"warmup_steps={self.warmup_steps} must be in [0, total_steps={self.total_steps})")
        if self.lr <= 0 or not 0 < self.min_lr_ratio <= 1:
            raise ValueError("lr must be > 0 and min_lr_ratio in (0, 1]")

    def model_config(self) -> Any:
        adapter = get_adapter(self.family)
        return adapter.config_cls.from_dict(self.model)

    def scene_config(self) -> Any:
        from ..data import SceneConfig

        size = tuple(self.model_config().img_size)
        return SceneConfig.from_dict({"image_size": list(size), **self.scene})

    def lr_at(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        t = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


# --------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------


def in_frame_of(views: list[dict[str, Tensor]], ref: int) -> list[dict[str, Tensor]]:
    """The same views with ``pts3d`` re-expressed in view ``ref``'s camera frame, ``ref`` first."""
    from ..data.geometry import invert_rigid, transform

    world2ref = invert_rigid(views[ref]["cam2world"])
    order = [ref] + [i for i in range(len(views)) if i != ref]
    out = []
    for i in order:
        v = dict(views[i])
        v["pts3d"] = transform(world2ref, v["pts3d_world"])
        out.append(v)
    return out


def training_batch(cfg: TrainConfig, scene_cfg: Any, step: int, device: torch.device) -> list[dict[str, Tensor]]:
    """The batch of optimiser step ``step`` — a pure function of (config, step), so resuming is exact."""
    from ..data.sources import SyntheticSource

    n_scenes = cfg.batch_size // 2 if cfg.symmetrize else cfg.batch_size
    source = SyntheticSource(scene_cfg.image_size, seed=cfg.seed * 100_000_000, scene=scene_cfg,
                             compile=cfg.compile_render)
    views = source.batch(step, n_scenes, device)
    views = [{k: views[v][k] for k in ("img", "pts3d", "pts3d_world", "valid", "cam2world", "depth", "intrinsics")}
             for v in range(2)]
    if not cfg.symmetrize:
        return views
    swapped = in_frame_of(views, 1)
    return [{k: torch.cat([views[v][k], swapped[v][k]]) for k in views[v]} for v in range(2)]


def validation_views(n_pairs: int, scene_cfg: Any, device: torch.device | str = "cpu", seed: int = VAL_SEED) -> list[dict]:
    """``n_pairs`` held-out scenes from ``seed`` (the same every run)."""
    from ..data.sources import SyntheticSource

    return SyntheticSource(scene_cfg.image_size, seed=seed, scene=scene_cfg).take(0, n_pairs, device)


# --------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(model: ModelLike, views: ViewsLike, batch: int = 32) -> dict[str, float]:
    """Validation metrics of a 2-view model on rendered pairs (means over pairs; rotation: median).

    ``err_v1``/``err_v2``: scale–shift-invariant pointmap error (E.1) of each view;
    ``baseline_err_v2``: the same for a baseline with perfect per-view geometry and the identity
    relative pose; ``rot_err_deg``: median relative-rotation error, and ``baseline_rot_err_deg``
    (the true relative rotation angle); ``aligned_err_v2``: E.2.
    """
    from .. import metrics

    module = as_module(model)
    module.eval()
    device = next(module.parameters()).device
    acc: dict[str, list[Tensor]] = {}
    views = as_views(views, "views").validate(need=("img", "pts3d", "valid", "depth", "intrinsics", "cam2world"))
    for vb in views.batches(batch):
        vb = vb.to(device)
        out = module(vb[0]["img"], vb[1]["img"])
        pred = [o["pts3d"].float() for o in out]
        gt = [v["pts3d"] for v in vb]
        valid = [v["valid"] for v in vb]
        e = metrics.scale_shift_invariant_error(pred, gt, valid)
        base = metrics.identity_pose_baseline(vb)
        eb = metrics.scale_shift_invariant_error([b["pts3d"] for b in base], gt, valid)
        own2 = metrics.camera_points(vb[1]["depth"], vb[1]["intrinsics"])
        c1, c2 = vb[0]["cam2world"], vb[1]["cam2world"]
        rot = metrics.relative_rotation_error(pred[1], out[1]["conf"].float(), own2, valid[1], c1, c2)
        rot_base = metrics.relative_rotation_error(base[1]["pts3d"], base[1]["conf"], own2, valid[1], c1, c2)
        e2 = metrics.aligned_view2_error(pred[1], gt[1], out[1]["conf"].float(), valid[1])
        for k, val in (("err_v1", e.per_view[:, 0]), ("err_v2", e.per_view[:, 1]), ("baseline_err_v2", eb.per_view[:, 1]),
                       ("rot_err_deg", rot), ("baseline_rot_err_deg", rot_base), ("aligned_err_v2", e2)):
            acc.setdefault(k, []).append(val.detach().float().cpu())
    res = {k: float(torch.cat(v).nanmean()) for k, v in acc.items()}
    for k in ("rot_err_deg", "baseline_rot_err_deg"):
        res[k.replace("_deg", "_median_deg")] = float(torch.cat(acc[k]).nanmedian())
    res["err_v2_over_baseline"] = res["err_v2"] / max(res["baseline_err_v2"], 1e-12)
    res["pairs"] = views.batch_size
    return res


# --------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------

SHARD_BYTES = 12_000_000  # files stay under the device tool's 16 MiB transfer limit


def _save_sharded(tensors: dict[str, Tensor], directory: Path, prefix: str) -> list[str]:
    shards, cur, size = [], {}, 0
    for k, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if cur and size + nbytes > SHARD_BYTES:
            shards.append(cur)
            cur, size = {}, 0
        cur[k] = t.detach().cpu().contiguous()
        size += nbytes
    if cur:
        shards.append(cur)
    names = []
    for i, shard in enumerate(shards):
        name = f"{prefix}-{i:03d}.safetensors"
        save_file(shard, str(directory / name))
        names.append(name)
    return names


def _load_sharded(directory: Path, names: list[str]) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for n in names:
        out.update(load_file(str(directory / n)))
    return out


def save_checkpoint(out_dir: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, state: dict) -> Path:
    """Write ``ckpt-{step}/`` (weights, optimiser, state) and then point ``LATEST`` at it."""
    name = f"ckpt-{state['step']:08d}"
    tmp = out_dir / f".{name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    model_files = _save_sharded(model.state_dict(), tmp, "model")
    opt_sd = opt.state_dict()
    flat = {f"{i}.{k}": v for i, s in opt_sd["state"].items() for k, v in s.items() if isinstance(v, Tensor)}
    opt_files = _save_sharded(flat, tmp, "optim")
    meta = {**state, "model_files": model_files, "optim_files": opt_files,
            "param_groups": [{k: v for k, v in g.items()} for g in opt_sd["param_groups"]]}
    (tmp / "state.json").write_text(json.dumps(meta, indent=2))
    final = out_dir / name
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    atomic_write(out_dir / "LATEST", lambda p: Path(p).write_text(name + "\n"))
    for old in out_dir.glob("ckpt-*"):  # keep the newest two
        if old.name not in (name, _previous(out_dir, name)):
            shutil.rmtree(old, ignore_errors=True)
    return final


def _previous(out_dir: Path, name: str) -> str | None:
    older = sorted(p.name for p in out_dir.glob("ckpt-*") if p.name < name)
    return older[-1] if older else None


def latest_checkpoint(out_dir: Path) -> Path | None:
    pointer = out_dir / "LATEST"
    if not pointer.is_file():
        return None
    path = out_dir / pointer.read_text().strip()
    return path if (path / "state.json").is_file() else None


def load_checkpoint(path: Path, model: torch.nn.Module, opt: torch.optim.Optimizer | None) -> dict:
    meta = json.loads((path / "state.json").read_text())
    model.load_state_dict(_load_sharded(path, meta["model_files"]), strict=True)
    if opt is not None:
        flat = _load_sharded(path, meta["optim_files"])
        state: dict[int, dict[str, Tensor]] = {}
        for key, t in flat.items():
            i, k = key.split(".", 1)
            state.setdefault(int(i), {})[k] = t
        opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    return meta


# --------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "norm" in name or name == "mask_token" else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, fused=False)


def _log(out_dir: Path, record: dict) -> None:
    with open(out_dir / "log.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


def _trim_log(out_dir: Path, step: int) -> None:
    """Drop log lines written after the checkpoint we resume from (a crashed run's tail)."""
    path = out_dir / "log.jsonl"
    if not path.is_file():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= step]
    atomic_write(path, lambda p: Path(p).write_text("".join(ln + "\n" for ln in keep)))


def train(cfg: TrainConfig, out_dir: str | os.PathLike, device: str | torch.device = "cpu",
          minutes: float | None = None, max_steps: int | None = None, progress: bool = True) -> dict:
    """Train (or resume) into ``out_dir``; stop after ``minutes`` of wall time, ``max_steps`` steps
    (this run) or at ``cfg.total_steps``. Returns the final state (step, elapsed, last validation).
    """
    from .. import metrics

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device(device)
    cfg_path = out_dir / "train_config.json"
    if cfg_path.is_file():
        saved = TrainConfig.from_dict(json.loads(cfg_path.read_text()))
        if saved != cfg:
            check_identity(saved.to_dict(), cfg.to_dict(), cfg_path, what="training run with a different config")
    else:
        atomic_write(cfg_path, lambda p: Path(p).write_text(cfg.to_json() + "\n"))

    adapter = get_adapter(cfg.family)
    torch.manual_seed(cfg.seed)
    model = adapter.build(cfg.model_config()).to(device)
    opt = build_optimizer(model, cfg)
    state = {"step": 0, "elapsed_s": 0.0, "val": None, "device": str(device)}
    ckpt = latest_checkpoint(out_dir)
    if ckpt is not None:
        meta = load_checkpoint(ckpt, model, opt)
        state = {k: meta[k] for k in ("step", "elapsed_s", "val", "device") if k in meta}
        _trim_log(out_dir, state["step"])
    scene_cfg = cfg.scene_config()
    val_views = validation_views(cfg.val_pairs, scene_cfg, device)
    use_bf16 = cfg.bf16 and device.type == "cuda"

    stop_at = cfg.total_steps if max_steps is None else min(cfg.total_steps, state["step"] + max_steps)
    t_run, t_ckpt = time.time(), time.time()
    elapsed0 = state["elapsed_s"]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=stop_at, initial=state["step"], desc="train", dynamic_ncols=True)
    model.train()
    while state["step"] < stop_at:
        step = state["step"]
        views = training_batch(cfg, scene_cfg, step, device)
        for g in opt.param_groups:
            g["lr"] = cfg.lr_at(step)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            out = model(views[0]["img"], views[1]["img"])
        loss, logs = metrics.confidence_loss([o["pts3d"] for o in out], [o["conf"] for o in out],
                                             [v["pts3d"] for v in views], [v["valid"] for v in views], alpha=cfg.alpha)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip) if cfg.grad_clip else torch.tensor(0.0)
        opt.step()
        state["step"] = step + 1
        state["elapsed_s"] = elapsed0 + time.time() - t_run
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{float(loss.detach()):.4f}")
        if state["step"] % cfg.log_every == 0 or state["step"] == 1:
            _log(out_dir, {"step": state["step"], "loss": float(loss.detach()), "lr": cfg.lr_at(step), "grad_norm": float(gnorm),
                           "elapsed_s": round(state["elapsed_s"], 2), **{k: float(v) for k, v in logs.items()}})
        done = state["step"] >= stop_at or (minutes is not None and time.time() - t_run > minutes * 60)
        if state["step"] % cfg.val_every == 0 or done:
            state["val"] = evaluate(model, val_views)
            _log(out_dir, {"step": state["step"], "elapsed_s": round(state["elapsed_s"], 2), "val": state["val"]})
            model.train()
        if done or time.time() - t_ckpt > cfg.ckpt_minutes * 60:
            save_checkpoint(out_dir, model, opt, state)
            t_ckpt = time.time()
        if done:
            break
    if bar is not None:
        bar.close()
    if latest_checkpoint(out_dir) is None or json.loads((latest_checkpoint(out_dir) / "state.json").read_text())["step"] != state["step"]:
        save_checkpoint(out_dir, model, opt, state)
    return state


def export_model(out_dir: str | os.PathLike, target: str | os.PathLike, card: str | None = None) -> Path:
    """Save the latest checkpoint's weights as an HF-style model directory (config.json + model.safetensors)."""
    from ..hub import save_pretrained

    out_dir = Path(out_dir)
    cfg = TrainConfig.from_dict(json.loads((out_dir / "train_config.json").read_text()))
    ckpt = latest_checkpoint(out_dir)
    if ckpt is None:
        raise FileNotFoundError(f"no checkpoint in {out_dir}; train first")
    model = get_adapter(cfg.family).build(cfg.model_config())
    load_checkpoint(ckpt, model, None)
    target = save_pretrained(model.float(), target)
    if card is not None:
        atomic_write(Path(target) / "README.md", lambda p: Path(p).write_text(card))
    return Path(target)

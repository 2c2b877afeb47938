"""Pointmap probes at every skip connection, trained together (the paper's core instrument).

A probe reads one site's residual stream token by token (no mixing across patches) and decodes a
pointmap + confidence (or a depth map) through the model's own post-processing. Every probe kind
at every site trains from one frozen backbone pass per batch; see ``docs/probes.md``.

>>> from mv_interp.probes import TrainConfig, train_probes, evaluate_probes, probe_frames
>>> probes = train_probes(model, TrainConfig(steps=2000), "runs/probes")
>>> control = train_probes(model, TrainConfig(steps=2000, backbone="random"), "runs/control")
>>> table = evaluate_probes(model, probes, 256, control=control)
>>> table.write("runs/eval"); table.series("mlp", "e2_aligned_v2")
>>> frames = probe_frames(model, probes, pair)           # list[mv_interp.viz.Frame], one per location
"""

from .config import PRESETS, ProbeSpec, TrainConfig, probe_spec
from .data import EVAL_SEED, DatasetSource, SyntheticSource, TensorSource, open_pairs, save_pairs
from .evaluate import ProbeTable, eval_pairs, evaluate_probes
from .lens import pointmap_lens
from .losses import depth_confidence_loss, probe_loss
from .modules import GroupedMLP, ProbeBank
from .probeset import ProbeSet, random_backbone
from .sites import Location, group_locations, select_sites
from .train import train_probes
from .views import PairFrames, pair_frames, pick_pairs, plot_contributions, plot_curves, probe_frames, write_4d

__all__ = [
    "EVAL_SEED", "PRESETS", "DatasetSource", "GroupedMLP", "Location", "ProbeBank", "ProbeSet", "ProbeSpec",
    "ProbeTable", "SyntheticSource", "TrainConfig", "depth_confidence_loss", "eval_pairs", "evaluate_probes",
    "group_locations", "PairFrames", "pair_frames", "pick_pairs", "plot_contributions", "plot_curves", "pointmap_lens", "probe_frames",
    "probe_loss", "probe_spec", "random_backbone", "save_pairs", "select_sites", "train_probes", "write_4d",
    "TensorSource", "open_pairs",
]

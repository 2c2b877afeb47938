"""Attention-head classification: correspondence, register and local heads of any adapted model.

>>> from mv_interp.heads import score_heads
>>> scores = score_heads(model, views)                 # views: mv_interp.data batch(es)
>>> scores.table()                                     # one row per (site, query view, key view, head)
>>> scores.classify(register_lift=0.7).heads("register")
>>> scores.best_per_layer()                            # the paper's Figure 5
>>> scores.register_heads()                            # heads + register tokens for a knockout
>>> scores.save("heads_out", figures=False)            # CSV, JSON, state
>>> save_score_figures(scores, "heads_out")            # heatmaps, label map, curve

See ``docs/heads.md`` for the score definitions and how to read the outputs.
"""

from .figures import (
    plot_attention_overlays,
    plot_correspondence_curve,
    plot_correspondence_lines,
    plot_heatmaps,
    plot_label_map,
    save_example_figures,
    save_score_figures,
)
from .result import LABELS, BestHead, HeadRef, HeadScores, HeadThresholds, RegisterHead
from .scoring import (
    KINDS,
    BlockStatistics,
    HeadScorer,
    ScoreConfig,
    UnitInfo,
    block_statistics,
    iter_batches,
    score_heads,
)
from .targets import Correspondence, correspondence_targets

__all__ = [
    "KINDS", "LABELS", "score_heads", "HeadScorer", "ScoreConfig", "HeadScores", "HeadThresholds", "HeadRef",
    "BestHead", "RegisterHead", "UnitInfo", "block_statistics", "BlockStatistics", "Correspondence",
    "correspondence_targets", "iter_batches", "plot_heatmaps", "plot_label_map", "plot_correspondence_curve",
    "plot_attention_overlays", "plot_correspondence_lines", "save_score_figures",
    "save_example_figures",
]

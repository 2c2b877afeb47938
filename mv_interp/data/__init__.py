"""Multi-view data with exact geometry: synthetic rooms, real captures, correspondences.

A *view* is a dict of tensors (``img``, ``depth``, ``valid``, ``intrinsics``, ``cam2world``,
``pts3d_world``, ``pts3d``); a *sample* is a list of views (view 1 first, the reference
frame of ``pts3d``); a *batch* is the same list with every tensor stacked on a leading
batch axis (:func:`collate_views`). See ``docs/data.md``.

>>> from mv_interp.data import SceneConfig, render_views, patch_correspondences
>>> view1, view2 = render_views(8, SceneConfig(image_size=(224, 224)), seed=0)
>>> match, count = patch_correspondences(view2, view1)     # [8, 196] patch of view 1 per patch of view 2
"""

from .capture import (CaptureDataset, CaptureError, MissingFileError, check_capture, load_tuple, read_index,
                      read_view, write_capture)
from .correspondence import patch_correspondences, pixel_correspondences
from .dataset import SyntheticPairs, collate_views, split_views
from .difficulty import pair_stats, pick_pairs
from .geometry import VIEW_KEYS, complete_view
from .habitat import convert_habitat
from .raycast import render
from .scene import Scene
from .synthetic import SceneConfig, render_views, sample_cameras, sample_scenes
from .views import Views, as_views

__all__ = [
    "VIEW_KEYS", "CaptureDataset", "CaptureError", "MissingFileError", "Scene", "SceneConfig", "SyntheticPairs",
    "check_capture", "collate_views", "complete_view", "convert_habitat", "load_tuple", "patch_correspondences",
    "pixel_correspondences", "read_index", "read_view", "render", "render_views", "sample_cameras", "sample_scenes",
    "split_views", "write_capture", "Views", "as_views", "pair_stats", "pick_pairs",
]

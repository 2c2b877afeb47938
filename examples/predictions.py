"""What a model predicts next to the ground truth, on held-out synthetic pairs: ``docs/images/predictions.png``.

Each row is one validation pair (scenes the model never trained on): the two input images, the true and
the predicted depth of both views *in view 1's frame* (the z coordinate of the pointmaps, so view 2's map
only matches if the model got the relative pose right), and a top-down view (x, z) of both pointmaps:
ground truth in grey, the prediction coloured by view. Both are divided by their mean distance to view 1's
camera (the normalisation DUSt3R is trained with); the title gives each view's scale–shift-invariant
error (E.1).

    python examples/predictions.py                               # dust3r-toy, 3 validation pairs
    python examples/predictions.py --model ckpt.pth --pairs 4 --out predictions.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

import mv_interp
from mv_interp.data import SceneConfig
from mv_interp.images import to_image
from mv_interp.metrics import normalize_pointmaps, scale_shift_invariant_error
from mv_interp.training.trainer import VAL_SEED, validation_views

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="dust3r-toy")
    p.add_argument("--config", default=None, help="config of a bare state dict (e.g. 224_linear)")
    p.add_argument("--pairs", type=int, default=3)
    p.add_argument("--first", type=int, default=0, help="first validation pair (scene seed VAL_SEED + first)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=str(ROOT / "docs" / "images" / "predictions.png"))
    args = p.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    model = mv_interp.load_model(args.model, device=args.device, config=args.config)
    scene = SceneConfig(image_size=tuple(model.config.img_size))
    views = validation_views(args.pairs, scene, device=args.device, seed=VAL_SEED + args.first)
    with torch.no_grad():
        out = model.view_outputs(model.module(views[0]["img"], views[1]["img"]))
    valid = [v["valid"] for v in views]
    pred, _ = normalize_pointmaps([o["pts3d"].float() for o in out], valid)
    gt, _ = normalize_pointmaps([v["pts3d"].float() for v in views], valid)
    err = scale_shift_invariant_error(pred, gt, valid)  # per view, per pair
    errors = [err.per_view[:, v].cpu() for v in range(2)]  # [pair] per view

    cols = ["view 1", "view 2", "true depth v1", "predicted v1", "true depth v2\n(view 1's frame)",
            "predicted v2\n(view 1's frame)", "top-down (x, z)"]
    fig, axes = plt.subplots(args.pairs, len(cols), figsize=(2.1 * len(cols), 2.25 * args.pairs + 0.4),
                             layout="constrained", squeeze=False)
    for i in range(args.pairs):
        row = axes[i]
        for v in range(2):
            row[v].imshow(to_image(views[v]["img"][i]))
        for v in range(2):
            g = gt[v][i, ..., 2].cpu().numpy()
            q = pred[v][i, ..., 2].cpu().numpy()
            lo, hi = np.percentile(g, [1, 99])
            row[2 + 2 * v].imshow(g, cmap="viridis", vmin=lo, vmax=hi)
            row[3 + 2 * v].imshow(q, cmap="viridis", vmin=lo, vmax=hi)
            row[3 + 2 * v].set_xlabel(f"E.1 = {float(errors[v][i]):.3f}", fontsize=8)
        ax = row[6]
        rng = np.random.default_rng(i)
        for v, colour in ((0, "#d62728"), (1, "#1f77b4")):
            g = gt[v][i].reshape(-1, 3).cpu().numpy()
            q = pred[v][i].reshape(-1, 3).cpu().numpy()
            take = rng.choice(len(g), size=min(700, len(g)), replace=False)
            ax.scatter(g[take, 0], g[take, 2], s=1, c="#b0b0b0")
            ax.scatter(q[take, 0], q[take, 2], s=1, c=colour, label=f"view {v + 1}" if i == 0 else None)
        ax.set_aspect("equal")
        ax.tick_params(labelsize=6)
        for a in row[:6]:
            a.set_xticks([])
            a.set_yticks([])
        row[0].set_ylabel(f"pair {args.first + i}", fontsize=9)
    for a, c in zip(axes[0], cols):
        a.set_title(c, fontsize=9)
    axes[0][6].legend(fontsize=7, markerscale=6, loc="upper right")
    name = args.model if not Path(args.model).exists() else Path(args.model).name
    fig.suptitle(f"{name} on held-out synthetic pairs: prediction vs ground truth", fontsize=11)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}; E.1 view 1 {errors[0].mean():.4f}, view 2 {errors[1].mean():.4f} "
          f"over {args.pairs} pairs")


if __name__ == "__main__":
    main()

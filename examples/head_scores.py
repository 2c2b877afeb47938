"""Score and classify every attention head of a model on synthetic pairs; write the README picture.

    python examples/head_scores.py --model dust3r-toy --pairs 64    # the README picture
    python examples/head_scores.py --model path/to/checkpoint.pth --pairs 256 --device cuda

Writes the full output of ``mv-interp heads classify`` to ``--out`` (table, heatmaps, label map,
Figure-5 curve, overlays, correspondence lines) and copies the overlay of the best
correspondence block to ``docs/images/heads_overlay.png`` (``--no-docs`` to skip).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch

import mv_interp
from mv_interp.data import SceneConfig, render_views
from mv_interp.heads import save_example_figures, score_heads

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="dust3r-toy")
    p.add_argument("--config", default=None, help="config of a bare state dict (e.g. 224_linear)")
    p.add_argument("--pairs", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="heads_out")
    p.add_argument("--no-docs", action="store_true", help="do not update docs/images/heads_overlay.png")
    args = p.parse_args()

    model = mv_interp.load_model(args.model, device=args.device, config=args.config)
    config = SceneConfig(image_size=tuple(model.config.img_size))
    views = render_views(args.pairs, config, seed=args.seed, device=args.device)

    scores = score_heads(model, views, batch_size=args.batch_size, progress=True)
    print(scores.summary())
    paths = scores.save(args.out)
    # pick the example pair with the most ground-truth matches so the pictures have something to show
    from mv_interp.heads import correspondence_targets

    matched = (correspondence_targets(views[1], views[0], model.module.patch_size).match >= 0).sum(-1)
    sample = int(matched.argmax())
    paths.update(save_example_figures(model, views, scores, args.out, sample=sample))
    for name, path in sorted(paths.items()):
        print(f"{name:>40}: {path}")

    overlay = next((p for n, p in paths.items() if n.startswith("overlay_correspondence")), None)
    if overlay is not None and not args.no_docs:
        target = ROOT / "docs" / "images" / "heads_overlay.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(overlay, target)
        print(f"README picture: {target}")


if __name__ == "__main__":
    main()

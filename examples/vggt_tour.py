"""A tour of a (tiny, random) VGGT: token layout, register heads, a camera-token knockout, 4D pointmaps.

    python examples/vggt_tour.py                       # tiny random VGGT, 4 frames, writes vggt_tour_out/
    python examples/vggt_tour.py --model facebook_VGGT-1B/model.safetensors --config vggt:1b --size 518 518

1. Every frame's aggregator tokens are ``[camera, register_0..3, patches]``; the global blocks see
   all frames' tokens at once.
2. Head scores (``mv_interp.heads``) over rendered 4-frame scenes: the heads whose attention piles
   onto a few keys, and *which* keys those are — VGGT's own register tokens, its camera tokens or
   patches — named by token group.
3. Knock out every query's access to the camera tokens in every global block and see how much the
   predicted poses and pointmaps move.
4. The 3D lens (the point head applied to every intermediate state) of all 4 frames, as a 4D view:
   ``vggt_tour_out/vggt_4d.html`` (works offline; slider = layer).

A random model has no learned registers, so step 2 shows the machinery rather than a finding; run it
on the released VGGT-1B (``--model``) to see the real ones.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import mv_interp
from mv_interp.adapters.vggt import HookedVGGT, VGGTConfig
from mv_interp.data import SceneConfig, render_views
from mv_interp.heads import ScoreConfig, score_heads
from mv_interp.interventions import AttentionKnockout
from mv_interp.probes import probe_frames
from mv_interp.probes.views import page_inputs
from mv_interp.viz.viewer import write_viewer_html

TINY = dict(img_size=112, embed_dim=32, depth=4, num_heads=2, dino_depth=1, dino_num_heads=2, camera_trunk_depth=1,
            camera_num_heads=4, camera_num_iterations=2, dpt_features=16, dpt_out_channels=(8, 8, 16, 16),
            dpt_layers=(0, 1, 2, 3))


def token_name(model: HookedVGGT, index: int, grid: tuple[int, int]) -> str:
    """'camera', 'register 2' or 'patch (r, c)' for an index within one frame's tokens."""
    groups = model.token_groups(grid)
    if index in groups["camera"]:
        return "camera"
    if index in groups["registers"]:
        return f"register {groups['registers'].index(index)}"
    r, c = divmod(index - groups["patches"][0], grid[1])
    return f"patch ({r}, {c})"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="a VGGT checkpoint (default: a tiny random VGGT)")
    p.add_argument("--config", default=None, help="config of a bare state dict, e.g. vggt:1b")
    p.add_argument("--size", type=int, nargs=2, default=None, metavar=("H", "W"), help="frame size (multiple of 112)")
    p.add_argument("--scenes", type=int, default=4, help="rendered 4-frame scenes to score heads on")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="vggt_tour_out")
    args = p.parse_args(argv)

    if args.model:
        model = mv_interp.load_model(args.model, config=args.config, device=args.device)
    else:
        torch.manual_seed(0)
        model = mv_interp.MVModel(HookedVGGT(VGGTConfig(**TINY)).eval().to(args.device))
    vggt: HookedVGGT = model.module
    size = tuple(args.size or vggt.config.img_size)
    n_frames = 4
    scenes = render_views(args.scenes, SceneConfig(image_size=size, n_views=n_frames), seed=0, device=args.device)
    frames = [v["img"] for v in scenes]
    grid = (size[0] // vggt.patch_size, size[1] // vggt.patch_size)
    groups = vggt.token_groups(grid)
    P = sum(len(g) for g in groups.values())

    # 1. token layout ---------------------------------------------------------------------------
    print(f"{type(vggt).__name__}: {len(vggt.hook_dict)} hooks; per frame {P} tokens = camera + "
          f"{len(groups['registers'])} registers + {len(groups['patches'])} patches ({grid[0]}x{grid[1]})")
    glob = [s for s in vggt.attention_sites(n_views=n_frames) if s.layout == "global"]
    print(f"global attention: {len(glob)} blocks, patterns [batch, head, {n_frames}·{P}, {n_frames}·{P}]")

    # 2. register heads -----------------------------------------------------------------------------
    scores = score_heads(model, scenes, config=ScoreConfig(kinds=("register", "local"), max_queries=64),
                         batch_size=2)
    rows = [r for r in scores.table() if r["query_view"] != r["key_view"] and r["block_mass"] > 0.05]
    rows.sort(key=lambda r: -r["register_mass"])
    print("heads with the most attention on a few keys of another frame (site q→k head: mass on its top keys):")
    for r in rows[:5]:
        keys = ", ".join(token_name(vggt, t, grid) for t in r["register_tokens"][:3])
        print(f"  {r['site']} {r['query_view']}→{r['key_view']} h{r['head']}: {r['register_mass']:.2f} "
              f"(chance {r['register_chance']:.2f}) on {keys}")
    on_specials = sum(1 for r in rows if r["register_tokens"] and r["register_tokens"][0] < len(groups["camera"]) +
                      len(groups["registers"]))
    print(f"  {on_specials} of {len(rows)} cross-frame head blocks put their most-attended key on a camera or "
          f"register token; heads labelled 'register': {len(scores.register_heads())}")

    # 3. camera-token knockout ------------------------------------------------------------------------
    cameras = vggt.global_token_index("camera", n_frames, grid=grid)
    ko = AttentionKnockout(layers=[s.layer for s in glob], kind="self", stack="dec", keys=cameras)
    with torch.no_grad():
        clean = model(*frames)
        knocked = ko.run(model, *frames, n_views=n_frames)
    dpose = max(float((k["pose_enc"] - c["pose_enc"]).abs().mean()) for c, k in zip(clean, knocked))
    dpts = max(float((k["pts3d"] - c["pts3d"]).norm(dim=-1).mean() / c["pts3d"].norm(dim=-1).mean())
               for c, k in zip(clean, knocked))
    print(f"knocking out the camera tokens in all {len(glob)} global blocks: pose encodings move by "
          f"{dpose:.3g} (mean |Δ|), pointmaps by {dpts:.2g} of their mean norm")

    # 4. the 3D lens of 4 frames through the network -------------------------------------------------------
    scene = [{k: v[:1] for k, v in view.items()} for view in scenes]
    lens = probe_frames(model, None, scene, lens=True)
    images, valid, gt = page_inputs(scene)
    out = Path(args.out)
    html = write_viewer_html(out / "vggt_4d.html", lens, images, valid, gt, title="VGGT lens, 4 frames",
                             view_names=[f"frame {i}" for i in range(1, n_frames + 1)])
    print(f"4D view of {n_frames} frames through {len(lens)} layers: {html}")
    return {"scores": scores, "rows": rows, "pose_change": dpose, "points_change": dpts, "frames": lens, "html": html}


if __name__ == "__main__":
    main()

"""The generic tools run unchanged on a tiny random VGGT: the conformity suite, probes, head scores
(registers found on VGGT's real register tokens), knockout of token groups, patching across frames,
query-subset attention patterns and ``mv-interp report --fast``."""

from __future__ import annotations

import json

import pytest
import torch

import mv_interp
from mv_interp.adapters.vggt import HookedVGGT, VGGTConfig
from mv_interp.heads import ScoreConfig, score_heads
from mv_interp.heads.scoring import HeadScorer, block_statistics
from mv_interp.interventions import ActivationPatch, AttentionKnockout, Composite
from mv_interp.layers import QueryPatterns
from mv_interp.testing import check_adapter

TINY = dict(img_size=28, embed_dim=32, depth=3, num_heads=2, dino_depth=1, dino_num_heads=2, camera_trunk_depth=1,
            camera_num_heads=4, camera_num_iterations=2, dpt_features=16, dpt_out_channels=(8, 8, 16, 16),
            dpt_layers=(0, 1, 1, 2))
GRID = (2, 3)  # 28 x 42 frames
P = 5 + 6  # camera + 4 registers + 6 patches per frame


@pytest.fixture(scope="module")
def tiny_vggt():
    torch.manual_seed(0)
    return mv_interp.MVModel(HookedVGGT(VGGTConfig(**TINY)).eval())


def frames(model, n=3, seed=0, batch=2):
    return model.example_inputs(batch, (28, 42), n_views=n, seed=seed)


def test_check_adapter_passes(tiny_vggt):
    report = check_adapter(tiny_vggt)
    assert report.ok and len(report.results) >= 13
    assert all(r.status == "passed" for r in report.results), str(report)


def test_token_groups_and_names(tiny_vggt):
    m = tiny_vggt.module
    groups = m.token_groups(GRID)
    assert groups["camera"] == (0,) and groups["registers"] == (1, 2, 3, 4) and groups["patches"] == tuple(range(5, 11))
    assert m.global_token_index("registers", 3, frames=3, grid=GRID) == (23, 24, 25, 26)
    assert m.global_token_index("camera", 3, grid=GRID) == (0, 11, 22)
    assert m.act_name("pattern", 3, stack="dec") == "aggregator.global_blocks.1.attn.hook_pattern"
    assert m.act_name("q_normed", 2) == "aggregator.frame_blocks.2.attn.hook_q_normed"
    assert m.act_name("pose", 1, stack="camera") == "camera_head.iters.1.hook_pose"
    with pytest.raises(ValueError, match="qk-norm"):
        m.act_name("q_normed", 0, stack="dino")
    sites = m.probe_sites(n_views=3)
    assert {s.n_prefix for s in sites} == {5} and len(sites) == 3 * (2 + 3 * 4)
    glob = [s for s in m.attention_sites(n_views=3) if s.name == "global2.self"][0]
    assert (glob.layer, glob.layout, glob.n_prefix) == (5, "global", 5)


def test_reference_frame_has_its_own_special_tokens(tiny_vggt):
    """Frame 1 gets token set 0: reordering the other frames permutes their outputs, moving a frame into
    first place changes it."""
    m = tiny_vggt.module
    a, b, c = frames(tiny_vggt)
    with torch.no_grad():
        o1, o2 = m(a, b, c), m(a, c, b)
        o3 = m(b, a, c)
    torch.testing.assert_close(o1[1]["pts3d"], o2[2]["pts3d"], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(o1[1]["pts3d"], o3[0]["pts3d"], atol=1e-4)


def test_pt_state_dict_and_saved_directory_load_to_the_same_model(tiny_vggt, tmp_path):
    m = tiny_vggt.module
    fr = frames(tiny_vggt)
    torch.save(m.state_dict(), tmp_path / "model.pt")  # upstream's model.pt: a plain state dict
    from_pt = mv_interp.load_model(str(tmp_path / "model.pt"), config=m.config)
    tiny_vggt.save_pretrained(tmp_path / "saved")
    from_dir = mv_interp.load_model(str(tmp_path / "saved"))
    with torch.no_grad():
        ref = m(*fr)
        for other in (from_pt, from_dir):
            torch.testing.assert_close(other(*fr)[2]["pts3d"], ref[2]["pts3d"])
    with pytest.raises(mv_interp.loading.CheckpointError, match="pass config="):
        mv_interp.load_model(str(tmp_path / "model.pt"))


def test_lenses(tiny_vggt):
    m = tiny_vggt.module
    fr = frames(tiny_vggt)
    site = [s for s in m.probe_sites(n_views=3) if s.name == "global1.mlp.v2"][0]
    out, cache = m.run_with_cache(*fr, names_filter=[site.hook])
    tokens = mv_interp.adapters.patch_tokens(cache[site.hook], site, 3)
    lens = m.pointmap_lens(site, tokens, GRID)
    assert lens["pts3d"].shape == (2, 28, 42, 3) and lens["conf"].shape == (2, 28, 42)
    cam = cache[site.hook].unflatten(1, (3, P))[:, :, 0]
    assert m.camera_lens(cam).shape == (2, 3, 9)


def test_register_heads_are_found_on_the_real_register_tokens(tiny_vggt):
    """A known answer: make head 1 of global block 1 attend to every frame's register tokens; the
    detector must report that head with key tokens among VGGT's register positions 1..4."""
    m = tiny_vggt.module
    regs = list(m.global_token_index("registers", 3, grid=GRID))

    def to_registers(scores, hook):
        scores = scores.clone()
        scores[:, 1, :, regs] += 8.0
        return scores

    with m.hooks([("aggregator.global_blocks.1.attn.hook_attn_scores", to_registers)]):
        scores = score_heads(tiny_vggt, list(frames(tiny_vggt, batch=4)), kinds=("register",), register_k=4,
                             sites=["global1.self"])
    found = {(r.ref.query_view, r.ref.key_view): r for r in scores.register_heads() if r.ref.head == 1}
    assert set(found) == {(q, k) for q in (1, 2, 3) for k in (1, 2, 3)}
    for (q, k), r in found.items():
        assert set(r.tokens) <= {1, 2, 3, 4} and r.tokens
        assert all(t in regs for t in r.pattern_key_index)  # indices along the global key axis


def test_query_patterns_equal_the_full_pattern_rows_on_sdpa(tiny_vggt):
    m = tiny_vggt.module
    fr = frames(tiny_vggt)
    name = "aggregator.global_blocks.2.attn.hook_pattern"
    out, cache = m.run_with_cache(*fr, names_filter=name)
    rows = [0, 7, 19, 32]
    rec = QueryPatterns(m, {name: rows}, heads=[1])
    calls = []
    with m.hooks(rec.hooks() + [(name, lambda x, hook: calls.append(1))]):
        pass
    with m.hooks(rec.hooks()):
        assert not m.aggregator.global_blocks[2].attn.needs_pattern()  # the forward stays on SDPA
        again = m(*fr)
    torch.testing.assert_close(rec.patterns[name], cache[name][:, [1]][:, :, rows], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(again[0]["pts3d"], out[0]["pts3d"])


def test_head_scores_on_sampled_queries(tiny_vggt):
    """``max_queries`` scores the sampled patch queries exactly as the full pattern's rows would."""
    m = tiny_vggt.module
    views = list(frames(tiny_vggt))
    cfg = ScoreConfig(kinds=("register", "local"), max_queries=3, sites=["global1.self", "frame1.self"])
    scorer = HeadScorer(tiny_vggt, cfg)
    qsel = scorer.sampled_queries(6)
    scorer.update(views)
    _, cache = m.run_with_cache(*views, names_filter=["*blocks.1.attn.hook_pattern"])
    full = cache["aggregator.global_blocks.1.attn.hook_pattern"]
    block = full[:, :, P + 5 + qsel][..., 2 * P : 3 * P]  # queries of frame 2, keys of frame 3
    ref = block_statistics(block, GRID, 14, scorer.thresholds, cfg.kinds, cfg.register_k, cfg.local_radius,
                           n_prefix=5, query_index=qsel)
    for key, value in ref.sums.items():
        torch.testing.assert_close(scorer.sums[("global1.self", 2, 3)][key], value, rtol=1e-4, atol=1e-5)
    frame = cache["aggregator.frame_blocks.1.attn.hook_pattern"].unflatten(0, (3, 2))[0][:, :, 5 + qsel]
    ref = block_statistics(frame, GRID, 14, scorer.thresholds, cfg.kinds, cfg.register_k, cfg.local_radius,
                           n_prefix=5, query_index=qsel)
    torch.testing.assert_close(scorer.sums[("frame1.self", 1, 1)]["local_mass"], ref.sums["local_mass"])


def test_knockout_of_token_groups(tiny_vggt):
    """Cut every patch's access to the registers (all global blocks), and each frame's access to the
    camera tokens of the other frames."""
    m = tiny_vggt.module
    fr = frames(tiny_vggt)
    patches = m.global_token_index("patches", 3, grid=GRID)
    layers = [s.layer for s in m.attention_sites(n_views=3) if s.name.startswith("global")]
    ko = AttentionKnockout(layers=layers, kind="self", stack="dec", queries=patches,
                           keys=m.global_token_index("registers", 3, grid=GRID))
    name = "aggregator.global_blocks.2.attn.hook_pattern"
    out, cache = ko.run_with_cache(tiny_vggt, *fr, names_filter=[name], n_views=3)
    pat = cache[name]
    regs = list(m.global_token_index("registers", 3, grid=GRID))
    assert float(pat[:, :, list(patches)][..., regs].abs().max()) == 0
    assert float(pat[:, :, [0]][..., regs].abs().max()) > 0  # camera-token queries keep them
    with torch.no_grad():
        clean = m(*fr)
    assert not torch.allclose(out[0]["pts3d"], clean[0]["pts3d"])
    cams = Composite([AttentionKnockout(layers=layers, view=v, queries=m.token_groups(GRID)["patches"],
                                        keys=m.global_token_index("camera", 3, frames=[f for f in (1, 2, 3) if f != v],
                                                                  grid=GRID))
                      for v in (1, 2, 3)])
    out2, cache2 = cams.run_with_cache(tiny_vggt, *fr, names_filter=[name], n_views=3)
    pat = cache2[name]
    assert float(pat[:, :, 5:11][..., [11, 22]].abs().max()) == 0  # frame 1's patches: cameras of frames 2, 3
    assert float(pat[:, :, 5:11][..., [0]].abs().min()) > 0  # … but its own camera token stays
    with torch.no_grad(), tiny_vggt.trace(*fr):
        cams.apply_nnsight(tiny_vggt, n_views=3)
        traced = tiny_vggt.output.save()
    torch.testing.assert_close(traced[1]["pts3d"], out2[1]["pts3d"])


def test_patching_one_frame_across_runs(tiny_vggt):
    """Clean and corrupted runs differ in frame 2 only. Until the first global block a frame's tokens
    depend on that frame alone, so patching frame 2's tokens there (frames stacked on the batch axis)
    restores the clean outputs exactly; in a global block (frames concatenated on the token axis)
    the patch replaces exactly frame 2's token span."""
    m = tiny_vggt.module
    clean = frames(tiny_vggt, seed=0)
    corrupted = (clean[0], frames(tiny_vggt, seed=5)[1], clean[2])
    hooks = ["aggregator.frame_blocks.0.hook_resid_mid", "aggregator.global_blocks.1.hook_resid_mid"]
    with torch.no_grad():
        ref, cache = m.run_with_cache(*clean, names_filter=hooks)
        _, bad = m.run_with_cache(*corrupted, names_filter=hooks)
    out = ActivationPatch(hook=hooks[0], view=2).run(tiny_vggt, *corrupted, source=cache, n_views=3)
    for v in range(3):
        torch.testing.assert_close(out[v]["pts3d"], ref[v]["pts3d"], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(out[v]["pose_enc"], ref[v]["pose_enc"], rtol=1e-4, atol=1e-5)
    wrong = ActivationPatch(hook=hooks[0], view=3).run(tiny_vggt, *corrupted, source=cache, n_views=3)
    assert not torch.allclose(wrong[1]["pts3d"], ref[1]["pts3d"], atol=1e-4)
    _, patched = ActivationPatch(hook=hooks[1], view=2, positions=[0, 7]).run_with_cache(
        tiny_vggt, *corrupted, names_filter=[hooks[1]], source=cache, n_views=3)
    got, want = patched[hooks[1]].clone(), bad[hooks[1]].clone()
    want[:, [P, P + 7]] = cache[hooks[1]][:, [P, P + 7]]
    torch.testing.assert_close(got, want)


def test_report_fast_on_a_vggt_checkpoint_with_three_views(tmp_path):
    """``mv-interp report --fast --views 3 --model DIR`` on a VGGT saved in mv_interp's HF layout
    (112 x 112 frames: the synthetic renderer's sizes are multiples of 16): every step runs on
    examples of three frames — probes at the sites of all three, head scores across frames, the
    knockout, patching with frames 2 and 3 corrupted, and a 4D view of the three frames."""
    from mv_interp.cli import main

    torch.manual_seed(0)
    model = HookedVGGT(VGGTConfig(**{**TINY, "img_size": 112}))
    mv_interp.hub.save_pretrained(model, tmp_path / "vggt")
    rc = main(["report", "--fast", "--model", str(tmp_path / "vggt"), "--out", str(tmp_path / "out"), "--quiet",
               "--views", "3", "--pairs", "4", "--probe-steps", "2", "--no-control", "--batch-size", "2",
               "--bootstrap", "100"])
    assert rc == 0
    out = tmp_path / "out"
    html = (out / "report.html").read_text()
    assert "global1.self" in html and "vggt" in html
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"] == "vggt"
    assert set(summary["steps"]) == {"probes", "evaluate", "heads", "knockout", "patching", "views"}
    probes = json.loads((out / "probes" / "model" / "probes.json").read_text())
    assert {s["view"] for s in probes["sites"]} == {1, 2, 3}  # probes read every frame's sites
    assert sorted(p.name for p in (out / "views").glob("pair_easy_view*.png")) == [
        f"pair_easy_view{v}.png" for v in (1, 2, 3)]
    viewer = json.loads((out / "views" / "viewer_easy_lens.json").read_text())
    assert len(viewer["frames"][0]["views"]) == 3
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["steps"]["patching"]["info"]["corrupted_view2_from"]  # frames 2..N of another scene


def test_vggt_tour_example(tmp_path):
    """examples/vggt_tour.py runs on a tiny random VGGT: register-style scores named by token group,
    a camera-token knockout that moves the poses, a 4D lens view of 4 frames."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "vggt_tour.py"
    spec = importlib.util.spec_from_file_location("vggt_tour", path)
    tour = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tour)
    res = tour.main(["--out", str(tmp_path), "--scenes", "1", "--device", "cpu"])
    assert res["html"].is_file() and len(res["frames"]) == 2 + 4 * 4
    assert all(len(f.views) == 4 for f in res["frames"])
    assert res["pose_change"] > 0 and res["rows"]


def test_frame_attention_of_any_frame_is_addressable_beyond_the_default_view_count():
    """Frame attention is declared for the default two frames but runs on any number: a head
    ablation of frame 3's frame-attention heads changes frame 3 alone, and a per-head patching sweep
    over three frames has cells for frame 3's frame-attention heads."""
    from mv_interp.interventions import HeadAblation, patching_sweep

    torch.manual_seed(0)
    m = mv_interp.MVModel(HookedVGGT(VGGTConfig(**TINY)).eval())
    frames = [torch.rand(1, 3, 28, 42, generator=torch.Generator().manual_seed(i)) * 2 - 1 for i in range(3)]
    hook = "aggregator.frame_blocks.0.hook_resid_post"  # [frames · batch, P, d]
    _, clean = m.run_with_cache(*frames, names_filter=[hook])
    with torch.no_grad():
        _, cache = HeadAblation(layers=[0], view=3, heads=[0]).run_with_cache(m, *frames, names_filter=[hook], n_views=3)
    change = (cache[hook] - clean[hook]).abs().flatten(1).amax(1)
    assert change[:2].max() == 0 and change[2] > 0
    corrupted = frames[:1] + [f.flip(-1) for f in frames[1:]]
    sweep = patching_sweep(m, frames, corrupted, per="head", layers=[0])
    assert "self.v3" in sweep.sites

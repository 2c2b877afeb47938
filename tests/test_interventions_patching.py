"""Activation patching: whole / per token / per head, three ways of running, sweeps and heatmaps."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from torch.testing import assert_close

from interventions_helpers import GlobalToy, GlobalToyConfig, cache_with, inputs, one_thread  # noqa: F401
from mv_interp.interventions import (
    ActivationPatch,
    AttentionKnockout,
    distance_to,
    patching_sweep,
    pointmap_distance,
    run_patched,
    scale_invariant_pointmap_distance,
)

RESID = "dec_blocks2.0.hook_resid_mid"


@pytest.fixture()
def pairs(tiny_model):
    return inputs(tiny_model, 0, batch=2), inputs(tiny_model, 1, batch=2)


def test_whole_hook_patch_copies_the_clean_activation(tiny_model, pairs):
    m, (clean, corrupt) = tiny_model, pairs
    hook = "dec_blocks2.0.hook_resid_mid_cross"
    names = [hook, "dec_blocks2.0.hook_mlp_out"]
    _, c_clean = cache_with(m, clean, names=names)
    _, c_corrupt = cache_with(m, corrupt, names=names)
    spec = ActivationPatch(hook=hook)
    _, got = cache_with(m, corrupt, spec.fwd_hooks(m, source=c_clean), names=names)
    assert torch.equal(got[hook], c_clean[hook])
    # downstream of the patch, the run follows the clean activation: the MLP reads only it
    assert_close(got["dec_blocks2.0.hook_mlp_out"], c_clean["dec_blocks2.0.hook_mlp_out"], atol=1e-6, rtol=0)
    assert not torch.allclose(c_corrupt["dec_blocks2.0.hook_mlp_out"], c_clean["dec_blocks2.0.hook_mlp_out"])


def test_patching_the_last_residual_of_both_views_restores_the_output(tiny_model, pairs):
    m, (clean, corrupt) = tiny_model, pairs
    spec = ActivationPatch(hook="dec_blocks.1.hook_resid_post") + ActivationPatch(hook="dec_blocks2.1.hook_resid_post")
    out = run_patched(m, spec, clean, corrupt)
    with torch.no_grad():
        ref = m.forward(*clean)
    for a, b in zip(out, ref):
        assert_close(a["pts3d"], b["pts3d"], atol=1e-5, rtol=1e-5)


def test_per_token_and_per_head_patches(tiny_model, pairs):
    m, (clean, corrupt) = tiny_model, pairs
    hooks = [RESID, "dec_blocks2.1.attn.hook_z", "dec_blocks2.1.cross_attn.hook_q", "dec_blocks2.1.attn.hook_pattern"]
    _, c_clean = cache_with(m, clean, names=hooks)
    _, c_corrupt = cache_with(m, corrupt, names=hooks)

    def patched(spec, hook):
        # record the same hooks as the reference caches, so every run takes the same attention path
        return cache_with(m, corrupt, spec.fwd_hooks(m, source=c_clean), names=hooks)[1][hook]

    got = patched(ActivationPatch(hook=RESID, positions=[1, 4]), RESID)
    assert torch.equal(got[:, [1, 4]], c_clean[RESID][:, [1, 4]])
    assert torch.equal(got[:, [0, 2, 3, 5]], c_corrupt[RESID][:, [0, 2, 3, 5]])
    z = "dec_blocks2.1.attn.hook_z"  # [batch, pos, head, d_head]; upstream of it nothing changed
    got = patched(ActivationPatch(hook=z, heads=[1], positions=[2]), z)
    expect = c_corrupt[z].clone()
    expect[:, 2, 1] = c_clean[z][:, 2, 1]
    assert torch.equal(got, expect)
    q = "dec_blocks2.1.cross_attn.hook_q"  # [batch, head, pos, d_head]
    got = patched(ActivationPatch(hook=q, heads=[0]), q)
    assert torch.equal(got[:, 0], c_clean[q][:, 0])
    pat = "dec_blocks2.1.attn.hook_pattern"  # positions are query rows
    got = patched(ActivationPatch(hook=pat, heads=[1], positions=[3]), pat)
    assert torch.equal(got[:, 1, 3], c_clean[pat][:, 1, 3])
    assert torch.equal(got[:, 0], c_corrupt[pat][:, 0])
    with pytest.raises(ValueError, match="has no head axis"):
        ActivationPatch(hook=RESID, heads=[0]).validate(m)
    with pytest.raises(IndexError, match=r"token index 6 out of range for the tokens of .* \(valid: 0..5\)"):
        run_patched(m, ActivationPatch(hook=RESID, positions=[6]), clean, corrupt)


def test_patching_one_view_of_a_stacked_encoder_hook(tiny_model, pairs):
    m, (clean, corrupt) = tiny_model, pairs
    hook = "enc_blocks.1.hook_resid_post"  # [views * batch, pos, d]
    _, c_clean = cache_with(m, clean, names=[hook])
    _, c_corrupt = cache_with(m, corrupt, names=[hook])
    spec = ActivationPatch(hook=hook, view=2, positions=[0])
    _, got = cache_with(m, corrupt, spec.fwd_hooks(m, source=c_clean), names=[hook])
    expect = c_corrupt[hook].clone()
    expect[2:, 0] = c_clean[hook][2:, 0]
    assert torch.equal(got[hook], expect)
    with pytest.raises(IndexError, match=r"view 3 is not held by enc_blocks.1.hook_resid_post \(valid views: 1, 2\)"):
        run_patched(m, ActivationPatch(hook=hook, view=3), clean, corrupt)
    with pytest.raises(KeyError, match="No hook point named 'enc_blocks.9.hook_resid_post'"):
        ActivationPatch(hook="enc_blocks.9.hook_resid_post").validate(m)


@pytest.mark.parametrize("method", ["traces", "invokes"])
def test_patching_methods_agree(tiny_model, pairs, method):
    m, (clean, corrupt) = tiny_model, pairs
    spec = (ActivationPatch(hook="enc_blocks.0.hook_resid_post", view=1, positions=[2])
            + ActivationPatch(hook="dec_blocks.0.attn.hook_pattern", heads=[0])
            + AttentionKnockout(layers=1, view=2, keys=[0], mode="pre")
            + ActivationPatch(hook="dec_blocks2.1.attn.hook_z", heads=[1]))
    ref = run_patched(m, spec, clean, corrupt, method="hooks")
    out = run_patched(m, spec, clean, corrupt, method=method)
    for a, b in zip(out, ref):
        # invokes batch clean and corrupted in one forward: equal up to batched-matmul rounding
        assert_close(a["pts3d"], b["pts3d"], atol=1e-5, rtol=1e-5)
        assert_close(a["conf"], b["conf"], atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        plain = m.forward(*corrupt)
    assert not torch.allclose(plain[1]["pts3d"], ref[1]["pts3d"], atol=1e-3)


def test_output_metrics_known_answers(tiny_model):
    m = tiny_model
    with torch.no_grad():
        out = m.forward(*inputs(m, 2, batch=2))
    shift = torch.tensor([3.0, 4.0, 0.0])
    moved = [{"pts3d": o["pts3d"] + shift, "conf": o["conf"]} for o in out]
    assert_close(pointmap_distance(moved, out), torch.full((2,), 5.0))
    assert_close(pointmap_distance(moved, out, views=[2]), torch.full((2,), 5.0))
    scaled = [{"pts3d": o["pts3d"] * 7.5, "conf": o["conf"]} for o in out]
    assert_close(scale_invariant_pointmap_distance(scaled, out), torch.zeros(2), atol=1e-6, rtol=0)
    assert (pointmap_distance(scaled, out) > 0.1).all()
    with pytest.raises(IndexError, match=r"view 3 out of range: the outputs hold 2 views \(valid: 1..2\)"):
        pointmap_distance(out, out, views=[3])


def test_site_sweep_shape_labels_and_known_cells(tiny_model, pairs, tmp_path):
    m, (clean, corrupt) = tiny_model, pairs
    with torch.no_grad():
        clean_out = m.forward(*clean)
    metric = distance_to(clean_out, views=[1])
    sweep = patching_sweep(m, clean, corrupt, metric=metric, kinds=["self", "cross", "mlp"])
    assert sweep.sites == ["self.v1", "cross.v1", "mlp.v1", "self.v2", "cross.v2", "mlp.v2"]
    assert sweep.layers == [0, 1] and sweep.values.shape == (6, 2)
    assert sweep.hooks[2][1] == "dec_blocks.1.hook_resid_post"
    assert sweep.clean_value == 0.0 and sweep.corrupted_value > 0
    # the last residual of view 1 feeds view 1's head alone: patching it restores view 1 exactly
    assert sweep.cell("mlp.v1", 1) == pytest.approx(0.0, abs=1e-5)
    # view 2's last residual never reaches view 1's output
    assert sweep.cell("mlp.v2", 1) == pytest.approx(1.0, abs=1e-5)
    assert 0.0 < sweep.cell("self.v1", 0) < 1.0
    files = sweep.save(tmp_path)
    with Image.open(files["heatmap"]) as im:
        assert im.format == "PNG" and im.size[0] > 100
    assert files["json"].read_text().count('"sites"') == 1


def test_head_sweep_methods_agree(tiny_model, pairs):
    m, (clean, corrupt) = tiny_model, pairs
    kw = dict(per="head", kinds=["cross"], views=[2])
    a = patching_sweep(m, clean, corrupt, method="hooks", **kw)
    b = patching_sweep(m, clean, corrupt, method="invokes", **kw)
    assert a.values.shape == (1, 2, 2) and a.sites == ["cross.v2"] and a.inner == [0, 1]
    assert_close(a.values, b.values, atol=1e-4, rtol=0)
    assert (a.values - 1).abs().max() > 1e-3  # patching a head moves the output


def test_position_sweep_and_errors(tiny_model, pairs, tmp_path):
    m, (clean, corrupt) = tiny_model, pairs
    sweep = patching_sweep(m, clean, corrupt, per="position", kinds=["mlp"], views=[2], layers=[1], method="traces")
    assert sweep.values.shape == (1, 1, 6) and sweep.inner == list(range(6))
    sweep.heatmap(tmp_path / "pos.png")
    assert (tmp_path / "pos.png").stat().st_size > 0
    with pytest.raises(ValueError, match=r"kind 'attn' is not a site kind of the dec stack; valid kinds: \["):
        patching_sweep(m, clean, corrupt, kinds=["attn"])
    with pytest.raises(IndexError, match=r"layer 4 out of range for the dec sweep \(valid: 0..1\)"):
        patching_sweep(m, clean, corrupt, layers=[4])
    with pytest.raises(ValueError, match="same on the clean and the corrupted run"):
        patching_sweep(m, clean, clean, layers=[1])


def test_sweep_on_a_model_with_views_concatenated_on_tokens():
    torch.manual_seed(0)
    model = GlobalToy(GlobalToyConfig()).eval()
    clean, corrupt = model.example_inputs(batch=1, seed=0), model.example_inputs(batch=1, seed=1)
    with torch.no_grad():
        ref = model(*clean)
    sweep = patching_sweep(model, clean, corrupt, metric=distance_to(ref, views=[3]), kinds=["mlp"], layers=[1])
    # the head decodes view 3 from view 3's slice of the last residual only
    assert sweep.cell("mlp.v3", 1) == pytest.approx(0.0, abs=1e-5)
    assert sweep.cell("mlp.v1", 1) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("family", ["dust3r", "fast3r", "vggt"])
def test_cells_batched_in_one_forward_equal_one_forward_per_cell(family):
    """``cells_per_forward``: K cells in one forward of the corrupted inputs repeated K times (each
    cell's hooks patch only its copy) give the one-forward-per-cell values, per site, head and
    position, for per-view hooks (DUSt3R), views stacked on the batch axis and concatenated on the
    token axis (Fast3R, VGGT frames / global) and three views."""
    import mv_interp
    from mv_interp.adapters.dust3r import DUSt3RConfig, HookedDUSt3R
    from mv_interp.adapters.fast3r import Fast3RConfig, HookedFast3R
    from mv_interp.adapters.vggt import HookedVGGT, VGGTConfig
    from mv_interp.interventions import patching_sweep

    tiny = dict(img_size=(32, 48), enc_embed_dim=32, enc_depth=2, enc_num_heads=2, dec_embed_dim=32, dec_depth=2,
                dec_num_heads=2)
    torch.manual_seed(0)
    if family == "dust3r":
        module, n_views, hw = HookedDUSt3R(DUSt3RConfig(**tiny)), 2, (32, 48)
    elif family == "fast3r":
        module, n_views, hw = HookedFast3R(Fast3RConfig(**tiny)), 3, (32, 48)
    else:
        module, n_views, hw = HookedVGGT(VGGTConfig(
            img_size=28, embed_dim=32, depth=2, num_heads=2, dino_depth=1, dino_num_heads=2, camera_trunk_depth=1,
            camera_num_heads=4, camera_num_iterations=2, dpt_features=16, dpt_out_channels=(8, 8, 16, 16),
            dpt_layers=(0, 1, 1, 1))), 3, (28, 42)
    model = mv_interp.MVModel(module.eval())
    g = torch.Generator().manual_seed(1)
    clean = [torch.rand(2, 3, *hw, generator=g) * 2 - 1 for _ in range(n_views)]
    corrupted = clean[:1] + [torch.rand(2, 3, *hw, generator=g) * 2 - 1 for _ in range(n_views - 1)]
    for per, kw in (("site", {}), ("head", {}), ("position", {"layers": [0], "views": [2]})):
        one = patching_sweep(model, clean, corrupted, per=per, **kw)
        many = patching_sweep(model, clean, corrupted, per=per, cells_per_forward=5, **kw)
        assert torch.equal(one.values.isnan(), many.values.isnan())
        torch.testing.assert_close(many.values.nan_to_num(), one.values.nan_to_num(), atol=1e-5, rtol=1e-4)
        if per == "site":  # some site restores the clean output: the batched copies were patched
            assert one.values.nan_to_num(2).min() < 0.95
        assert many.extra["n_forwards"] < one.extra["n_forwards"]
    with pytest.raises(ValueError, match="method='hooks'"):
        patching_sweep(model, clean, corrupted, cells_per_forward=2, method="traces")

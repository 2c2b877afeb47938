"""Attribution patching and direct pointmap attribution: known answers and agreement with real patching."""

from __future__ import annotations

import math

import pytest
import torch

import mv_interp
from mv_interp.adapters.dust3r import DUSt3RConfig, HookedDUSt3R
from mv_interp.interventions import attribution_patching, direct_pointmap_attribution, patching_sweep

TINY = dict(img_size=(32, 48), enc_embed_dim=32, enc_depth=2, enc_num_heads=2,
            dec_embed_dim=32, dec_depth=2, dec_num_heads=2)
LINEAR = ("linear", -math.inf, math.inf)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return mv_interp.MVModel(HookedDUSt3R(DUSt3RConfig(**TINY)).eval())


@pytest.fixture(scope="module")
def linear_head_model():
    """pts3d = the head's raw xyz: the output is exactly linear in the head input."""
    torch.manual_seed(1)
    return mv_interp.MVModel(HookedDUSt3R(DUSt3RConfig(**TINY, depth_mode=LINEAR)).eval())


def z_of_view2(outs):
    return outs[1]["pts3d"][..., 2].mean(dim=(1, 2))  # smooth, per example


def test_attribution_patching_has_the_sweeps_format(model):
    clean, corrupted = model.example_inputs(batch=2), model.example_inputs(batch=2, seed=1)
    for per, subset in (("site", {}), ("head", {}), ("position", dict(kinds=["mlp"], views=[2]))):
        real = patching_sweep(model, clean, corrupted, per=per, layers=[1], **subset)
        approx = attribution_patching(model, clean, corrupted, per=per, layers=[1], **subset)
        assert approx.method == "attribution" and approx.metric == real.metric
        assert (approx.sites, approx.layers, approx.inner, approx.hooks) == (real.sites, real.layers, real.inner,
                                                                            real.hooks)
        assert approx.values.shape == real.values.shape
        assert torch.equal(torch.isnan(approx.values), torch.isnan(real.values))
        assert approx.clean_value == pytest.approx(real.clean_value)
        assert approx.corrupted_value == pytest.approx(real.corrupted_value)
        assert approx.to_dict()["n_backwards"] == 1
    same = patching_sweep(model, clean, corrupted, per="site", layers=[1], method="attribution")
    assert torch.equal(same.values, attribution_patching(model, clean, corrupted, per="site", layers=[1]).values)


def test_attribution_patching_is_first_order_exact_for_a_small_corruption(model):
    """Corrupted = clean + 1e-3 noise: the first-order estimate of every patch's effect matches real patching."""
    clean = model.example_inputs(batch=2)
    g = torch.Generator().manual_seed(3)
    corrupted = tuple(v + 1e-3 * torch.randn(v.shape, generator=g) for v in clean)
    for per in ("site", "head"):
        real = patching_sweep(model, clean, corrupted, per=per, metric=z_of_view2, normalize=False)
        approx = attribution_patching(model, clean, corrupted, per=per, metric=z_of_view2, normalize=False)
        ok = ~torch.isnan(real.raw)
        want = (real.raw - real.corrupted_value)[ok]
        got = (approx.raw - approx.corrupted_value)[ok]
        assert (got - want).abs().max() <= 0.03 * want.abs().max(), per
        if per == "site":  # view 1's last MLP cannot reach view 2's points: exactly no effect either way
            cell = real.sites.index("mlp.v1"), real.layers.index(1)
            assert approx.raw[cell] == approx.corrupted_value == real.raw[cell]


def test_direct_attribution_of_a_linear_head_sums_to_the_change(linear_head_model):
    model = linear_head_model
    views, ref = model.example_inputs(batch=2), model.example_inputs(batch=2, seed=1)
    for reference in (None, ref):
        dpa = direct_pointmap_attribution(model, views, view=2, reference=reference)
        assert dpa.contributions.shape == (len(dpa.labels), 2, 32, 48, 3)
        assert dpa.relative_error < 1e-5
        assert torch.allclose(dpa.total, dpa.change, atol=1e-5, rtol=1e-4)
        assert sum(r["share"] for r in dpa.summary()) == pytest.approx(1.0, abs=1e-4)
    with torch.no_grad():
        ref_out = model.forward(*ref)[1]["pts3d"]
    assert torch.allclose(dpa.change, dpa.output - ref_out, atol=1e-5)
    assert "dec1.cross.v2.h1" in dpa.labels and "dec0.self.v2.bias" in dpa.labels
    # whole sublayers = the sum of their heads and bias
    whole = direct_pointmap_attribution(model, views, view=2, reference=ref, heads=False)
    parts = [i for i, lab in enumerate(dpa.labels) if lab.startswith("dec1.cross.v2.")]
    assert torch.allclose(whole.contributions[whole.labels.index("dec1.cross_out.v2")],
                          dpa.contributions[parts].sum(0), atol=1e-5)
    patch = dpa.per_patch()
    assert patch.shape == (len(dpa.labels), 2, 6, 3)
    assert torch.allclose(patch[:, :, 0], dpa.contributions[:, :, :16, :16].mean(dim=(2, 3)), atol=1e-6)


def test_direct_attribution_of_the_confidence_and_bad_targets(linear_head_model):
    model = linear_head_model
    views = model.example_inputs(batch=1)
    near = tuple(v + 1e-4 * torch.randn_like(v) for v in views)
    conf = direct_pointmap_attribution(model, views, view=1, target="conf", reference=near, heads=False)
    assert conf.contributions.shape[-1] == 1 and conf.relative_error < 0.02
    with pytest.raises(KeyError, match="not an output of view 1"):
        direct_pointmap_attribution(model, views, view=1, target="depth")
    with pytest.raises(IndexError, match="view 3 out of range"):
        direct_pointmap_attribution(model, views, view=3)


def test_direct_attribution_on_the_bundled_model_sums_to_the_head_output_change():
    model = mv_interp.load_model("dust3r-toy")
    views = model.example_inputs(batch=1, seed=4)
    g = torch.Generator().manual_seed(5)
    near = tuple(v + 1e-2 * torch.randn(v.shape, generator=g) for v in views)
    dpa = direct_pointmap_attribution(model, views, view=2, reference=near, heads=False)
    assert dpa.relative_error < 0.05  # first order through the exp depth map
    assert dpa.extra["head_input_error"] < 1e-4
    top = dpa.summary()[0]
    assert top["component"] in dpa.labels and top["mean_norm"] > 0


@pytest.mark.slow
def test_attribution_patching_ranks_sites_like_real_patching_on_the_bundled_model():
    """The figure in docs/interventions.md: Spearman ρ over sites ≥ 0.8 on dust3r-toy."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    from bench_attribution import pairs, spearman

    from mv_interp.interventions import distance_to

    model = mv_interp.load_model("dust3r-toy")
    clean, corrupted = pairs(4, model.config.img_size[0], 1000)
    with torch.no_grad():
        metric = distance_to(model.view_outputs(model.forward(*clean)), scale_invariant=True)
    real = patching_sweep(model, clean, corrupted, per="site", metric=metric)
    approx = attribution_patching(model, clean, corrupted, per="site", metric=metric)
    ok = ~torch.isnan(real.values.flatten())
    assert spearman(approx.values.flatten()[ok], real.values.flatten()[ok]) >= 0.8


def test_sweeps_of_a_three_view_fast3r_cover_every_view():
    from mv_interp.adapters.fast3r import Fast3RConfig, HookedFast3R

    torch.manual_seed(0)
    model = mv_interp.MVModel(HookedFast3R(Fast3RConfig(**TINY)).eval())
    clean = model.example_inputs(batch=1, n_views=3, size=(16, 32))
    corrupted = model.example_inputs(batch=1, n_views=3, size=(16, 32), seed=1)
    real = patching_sweep(model, clean, corrupted, per="site", kinds=["mlp"], layers=[1])
    approx = attribution_patching(model, clean, corrupted, per="site", kinds=["mlp"], layers=[1])
    assert real.sites == approx.sites == ["mlp.v1", "mlp.v2", "mlp.v3"]
    assert torch.isfinite(approx.values).all()

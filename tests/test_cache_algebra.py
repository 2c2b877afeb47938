"""Known-answer tests of the cache algebra (mv_interp.cache) on tiny models of every family."""

from __future__ import annotations

import pytest
import torch

import mv_interp
from mv_interp.adapters.base import view_tokens
from mv_interp.adapters.dust3r import DUSt3RConfig, HookedDUSt3R
from mv_interp.adapters.fast3r import Fast3RConfig, HookedFast3R
from mv_interp.adapters.mast3r import HookedMASt3R, MASt3RConfig
from mv_interp.cache import final_resid_site
from mv_interp.hooks import ActivationCache

TINY = dict(img_size=(32, 48), enc_embed_dim=32, enc_depth=2, enc_num_heads=2,
            dec_embed_dim=32, dec_depth=2, dec_num_heads=2)


@pytest.fixture(scope="module")
def run():
    torch.manual_seed(0)
    model = mv_interp.MVModel(HookedDUSt3R(DUSt3RConfig(**TINY)).eval())
    views = model.example_inputs(batch=2)
    with torch.no_grad():
        _, cache = model.run_with_cache(*views)
    return model, cache


def close(a, b, tol=1e-5):
    return torch.allclose(a, b, atol=tol, rtol=tol)


def test_accumulated_resid_is_the_residual_after_every_skip_in_execution_order(run):
    model, cache = run
    resid, labels = cache.accumulated_resid(view=2, return_labels=True)
    assert labels == ["dec_in.v2", "dec0.self.v2", "dec0.cross.v2", "dec0.mlp.v2",
                      "dec1.self.v2", "dec1.cross.v2", "dec1.mlp.v2"]
    hooks = ["dec_blocks2.0.hook_resid_pre", "dec_blocks2.0.hook_resid_mid", "dec_blocks2.0.hook_resid_mid_cross",
             "dec_blocks2.0.hook_resid_post", "dec_blocks2.1.hook_resid_mid", "dec_blocks2.1.hook_resid_mid_cross",
             "dec_blocks2.1.hook_resid_post"]
    assert torch.equal(resid, torch.stack([cache[h] for h in hooks]))
    pre, labels = cache.accumulated_resid(layer=1, view=1, incl_mid=False, return_labels=True)
    assert labels == ["dec_in.v1", "dec0.mlp.v1"] and pre.shape == (2, 2, 6, 32)
    normed = cache.accumulated_resid(view=1, apply_ln=True)  # the logit lens's input: dec_norm of each
    assert close(normed[-1], cache["hook_dec_out1"])
    with pytest.raises(IndexError, match="layer 5 out of range"):
        cache.accumulated_resid(layer=5)


@pytest.mark.parametrize("view", [1, 2])
def test_decompose_resid_sums_back_to_the_residual_at_every_layer(run, view):
    model, cache = run
    for layer, hook in ((None, f"{model.act_name('resid_post', 1, view=view)}"),
                        (1, model.act_name("resid_pre", 1, view=view)), (0, model.act_name("resid_pre", 0, view=view))):
        parts, labels = cache.decompose_resid(layer=layer, view=view, return_labels=True)
        assert labels[0] == f"dec_in.v{view}"
        assert close(parts.sum(0), cache[hook])
    heads, labels = cache.decompose_resid(view=view, split_heads=True, return_labels=True)
    assert f"dec1.cross.v{view}.h1" in labels and f"dec0.self.v{view}.bias" in labels
    assert close(heads.sum(0), cache[model.act_name("resid_post", 1, view=view)])
    attn = cache.decompose_resid(view=view, mode="attn", incl_embeds=False)
    mlp = cache.decompose_resid(view=view, mode="mlp", incl_embeds=False)
    embed = cache[model.act_name("resid_pre", 0, view=view)]
    assert close(attn.sum(0) + mlp.sum(0) + embed, cache[model.act_name("resid_post", 1, view=view)])
    with pytest.raises(ValueError, match="mode must be one of"):
        cache.decompose_resid(mode="heads")


def test_stack_head_results_go_through_the_out_projection_and_sum_to_the_attention_output(run):
    model, cache = run
    for kind, hook in (("self", "attn_out"), ("cross", "cross_attn_out")):
        res, labels = cache.stack_head_results(layer=2, view=2, kinds=[kind], incl_bias=True, return_labels=True)
        assert labels[:3] == [f"dec0.{kind}.v2.h0", f"dec0.{kind}.v2.h1", f"dec0.{kind}.v2.bias"]
        assert close(res[:3].sum(0), cache[model.act_name(hook, 0, view=2)])
        # by hand: head h's slice of z times its columns of the out-projection
        attn = getattr(model.module.dec_blocks2[1], "attn" if kind == "self" else "cross_attn")
        z = cache[f"dec_blocks2.1.{'attn' if kind == 'self' else 'cross_attn'}.hook_z"]
        d = z.shape[-1]
        want = z[:, :, 1] @ attn.proj.weight[:, d : 2 * d].T
        assert close(res[labels.index(f"dec1.{kind}.v2.h1")], want)
    no_bias = cache.stack_head_results(view=1)
    assert no_bias.shape == (8, 2, 6, 32)  # 2 layers × (self, cross) × 2 heads


def test_apply_ln_to_stack_uses_the_norm_of_each_read_out(run):
    model, cache = run
    m = model.module
    parts = cache.decompose_resid(view=2)
    normed = cache.apply_ln_to_stack(parts, view=2)  # the heads' read-out: dec_norm
    assert close(normed.sum(0) + m.dec_norm.bias, cache["hook_dec_out2"])
    reads = {"self": ("resid_pre", m.dec_blocks2[1].norm1), "cross": ("resid_mid", m.dec_blocks2[1].norm2),
             "mlp": ("resid_mid_cross", m.dec_blocks2[1].norm3)}
    full = torch.cat([cache.decompose_resid(layer=1, view=2),
                      cache[model.act_name("attn_out", 1, view=2)][None],
                      cache[model.act_name("cross_attn_out", 1, view=2)][None]])
    for kind, (resid, norm) in reads.items():
        n = {"self": -2, "cross": -1, "mlp": None}[kind]
        stack = full[:n] if n else full
        out = cache.apply_ln_to_stack(stack, layer=1, view=2, kind=kind)
        assert close(out.sum(0) + norm.bias, norm(cache[model.act_name(resid, 1, view=2)])), kind
    with pytest.raises(ValueError, match="no 'bogus' sublayer"):
        cache.apply_ln_to_stack(parts, layer=1, view=2, kind="bogus")


def test_stack_activation_stacks_one_hook_over_layers(run):
    model, cache = run
    stacked, labels = cache.stack_activation("cross_pattern", view=2, return_labels=True)
    assert labels == [0, 1]
    assert torch.equal(stacked, torch.stack([cache["dec_blocks2.0.cross_attn.hook_pattern"],
                                             cache["dec_blocks2.1.cross_attn.hook_pattern"]]))
    assert cache.stack_activation("resid_post", layer=2, stack="enc").shape == (2, 4, 6, 32)
    with pytest.raises(IndexError):
        cache.stack_activation("resid_post", layer=3, view=1)


def test_batch_slicing_is_view_aware(run):
    model, cache = run
    one = cache.apply_slice_to_batch_dim(1)
    assert not one.has_batch_dim
    # encoder hooks stack views on the batch axis: the slice takes example 1 of each view
    assert torch.equal(one["hook_enc_out"], cache["hook_enc_out"][[1, 3]])
    assert torch.equal(one["dec_blocks2.1.hook_resid_post"], cache["dec_blocks2.1.hook_resid_post"][1])
    parts = one.decompose_resid(view=2)
    assert parts.shape == (7, 6, 32) and close(parts.sum(0), cache["dec_blocks2.1.hook_resid_post"][1])
    assert one.stack_head_results(view=2).shape == (8, 6, 32)
    lens = one.accumulated_resid(view=2, apply_ln=True)
    assert lens.shape == (7, 6, 32) and close(lens[-1], cache["hook_dec_out2"][1])
    normed = one.decompose_resid(view=2, apply_ln=True)
    assert normed.shape == (7, 6, 32) and torch.equal(normed, one.apply_ln_to_stack(parts, view=2))
    assert close(normed.sum(0) + model.module.dec_norm.bias, cache["hook_dec_out2"][1])
    sub = cache.apply_slice_to_batch_dim([1, 0])
    assert sub.batch_size == 2 and torch.equal(sub["hook_enc_out"], cache["hook_enc_out"][[1, 0, 3, 2]])
    assert torch.equal(cache.apply_slice_to_batch_dim(slice(0, 1)).remove_batch_dim()["hook_dec_out1"],
                       cache["hook_dec_out1"][0])
    with pytest.raises(ValueError, match="batch of one"):
        cache.remove_batch_dim()
    with pytest.raises(IndexError, match="out of range"):
        cache.apply_slice_to_batch_dim(2)


def test_a_cache_without_its_model_says_what_is_missing():
    with pytest.raises(ValueError, match="make the cache with model.run_with_cache"):
        ActivationCache({"x": torch.zeros(1)}).decompose_resid()


def test_missing_hooks_name_the_filter_to_widen(run):
    model, _ = run
    with torch.no_grad():
        _, cache = model.run_with_cache(*model.example_inputs(), names_filter="*resid_post")
    with pytest.raises(KeyError, match="names_filter"):
        cache.decompose_resid(view=1)


@pytest.mark.parametrize("family", ["mast3r", "fast3r"])
def test_the_algebra_runs_unchanged_on_other_families(family):
    torch.manual_seed(0)
    if family == "mast3r":
        module = HookedMASt3R(MASt3RConfig(**TINY, output_mode="pts3d+desc8"))
    else:
        module = HookedFast3R(Fast3RConfig(**TINY))
    model = mv_interp.MVModel(module.eval())
    views = model.example_inputs(batch=2, size=(16, 32), n_views=3 if family == "fast3r" else 2)
    with torch.no_grad():
        _, cache = model.run_with_cache(*views)
    n = len(views)
    for view in range(1, n + 1):
        site = final_resid_site(module, view, n)
        final = view_tokens(cache[site.hook], site, n)
        parts = cache.decompose_resid(view=view, split_heads=True)
        assert close(parts.sum(0), final)
        normed = cache.apply_ln_to_stack(cache.decompose_resid(view=view), view=view)
        head_in = view_tokens(cache[module.head_input_hook(view)], site, n)
        assert close(normed.sum(0) + module.resid_norm(view).bias, head_in)


def test_vggt_heads_include_layerscale_and_the_global_attention_splits():
    from test_vggt import TINY as VGGT_TINY

    from mv_interp.adapters.vggt import HookedVGGT, VGGTConfig

    torch.manual_seed(0)
    module = HookedVGGT(VGGTConfig(**VGGT_TINY)).eval()
    with torch.no_grad():  # LayerScale away from its all-ones init, so folding it in matters
        for mod in module.modules():
            if hasattr(mod, "gamma"):
                mod.gamma.mul_(torch.rand_like(mod.gamma) + 0.5)
    model = mv_interp.MVModel(module)
    views = model.example_inputs(2, (28, 42), n_views=3)
    with torch.no_grad():
        _, cache = model.run_with_cache(*views)
    parts, labels = cache.decompose_resid(view=2, split_heads=True, return_labels=True)
    assert "dec1.cross.v2.h1" in labels and "dec0.self.v2.bias" in labels  # global attention = the views' meeting
    site = final_resid_site(module, 2, 3)
    assert close(parts.sum(0), view_tokens(cache[site.hook], site, 3))
    with pytest.raises(NotImplementedError, match="not one normed residual"):
        module.resid_norm(2)

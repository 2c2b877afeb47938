"""Backward hooks, gradient caches, gradients in nnsight traces, shape inference, and TL runs
refusing to ignore nnsight (known answers: autograd's gradients, a real run's shapes)."""

from __future__ import annotations

import pytest
import torch

import mv_interp  # noqa: F401 - before nnsight (see mv_interp._compat)
import nnsight  # noqa: I001

HOOKS = ["hook_enc_out", "dec_blocks.0.hook_resid_pre", "dec_blocks2.0.hook_memory",
         "dec_blocks2.1.cross_attn.hook_pattern", "dec_blocks2.1.attn.hook_z", "dec_blocks2.1.hook_resid_mid",
         "hook_dec_out2"]


def metric(outs):
    return outs[1]["pts3d"].norm(dim=-1).mean(dim=(1, 2))  # per example


@pytest.fixture(scope="module")
def model(tiny_model_shared):
    return tiny_model_shared


@pytest.fixture(scope="module")
def views(model):
    return model.example_inputs(batch=2)


def autograd_grad(model, views, name):
    """The gradient of the metric with respect to hook ``name``'s output, with that output made a leaf."""
    leaf = []

    def cut(x, hook):
        leaf.append(x.detach().requires_grad_(True))
        return leaf[-1]

    with model.hooks([(name, cut)]):
        loss = metric(model.view_outputs(model.module(*views))).mean()
    return torch.autograd.grad(loss, leaf)[0]


def test_bwd_hooks_see_autograds_gradient_of_the_hook_output(model, views):
    got = {}
    with model.hooks(bwd_hooks=[(n, lambda g, hook: got.setdefault(hook.name, g.clone())) for n in HOOKS]):
        metric(model.view_outputs(model.module(*views))).mean().backward()
    model.module.zero_grad(set_to_none=True)
    for name in HOOKS:
        assert torch.allclose(got[name], autograd_grad(model, views, name), atol=1e-7, rtol=1e-5), name
    # view 1's decoder input is also view 2's memory: the hook's gradient is its own output's only
    assert got["dec_blocks.0.hook_resid_pre"].abs().sum() > 0


def test_a_bwd_hook_can_replace_the_gradient(model, views):
    grads = {}

    def keep(g, hook):
        grads.setdefault(hook.name, g.clone())

    def double(g, hook):
        return 2 * g

    for hooks in ([("dec_blocks2.1.hook_resid_post", keep)],
                  [("hook_dec_out2", double), ("dec_blocks2.1.hook_resid_post", keep)]):
        grads.clear()
        with model.hooks(bwd_hooks=hooks):
            metric(model.view_outputs(model.module(*views))).mean().backward()
        if len(hooks) == 1:
            plain = grads["dec_blocks2.1.hook_resid_post"]
    model.module.zero_grad(set_to_none=True)
    # hook_dec_out2 is the only way from that residual to view 2's points
    assert torch.allclose(grads["dec_blocks2.1.hook_resid_post"], 2 * plain)


def test_run_with_cache_incl_bwd_records_grads_under_tl_names(model, views):
    params = [p.grad for p in model.module.parameters()]
    out, cache = model.run_with_cache(*views, names_filter=HOOKS, incl_bwd=True, metric=metric)
    assert sorted(cache) == sorted(HOOKS + [h + "_grad" for h in HOOKS])
    for name in HOOKS:
        assert cache[name + "_grad"].shape == cache[name].shape
        assert torch.allclose(cache[name + "_grad"], autograd_grad(model, views, name), atol=1e-7, rtol=1e-5)
    assert [p.grad for p in model.module.parameters()] == params  # parameters' .grad untouched
    assert not out[0]["pts3d"].requires_grad
    # view 1's last block does not reach view 2's points: a zero gradient, not a missing one
    _, cache = model.run_with_cache(*views, names_filter="dec_blocks.1.hook_resid_post", incl_bwd=True, metric=metric)
    assert cache["dec_blocks.1.hook_resid_post_grad"].abs().max() == 0
    with pytest.raises(ValueError, match="needs metric="):
        model.run_with_cache(*views, incl_bwd=True)


def test_gradients_inside_an_nnsight_trace_are_autograds(model, views):
    _, cache = model.run_with_cache(*views, names_filter=HOOKS, incl_bwd=True, metric=metric)
    with model.trace(*views):
        shared = model.dec_blocks[0].hook_resid_pre.output  # reads in execution order
        mid = model.dec_blocks2[1].hook_resid_mid.output
        loss = metric(model.view_outputs(model.output)).mean()
        with loss.backward():  # gradients in reverse order
            g_mid = mid.grad.save()
            g_shared = shared.grad.save()
    model.module.zero_grad(set_to_none=True)
    assert torch.allclose(g_mid, cache["dec_blocks2.1.hook_resid_mid_grad"], atol=1e-7, rtol=1e-5)
    # nnsight's .grad is the tensor's: it includes view 2's cross-attention reading that tensor as
    # memory, where a bwd hook (TransformerLens semantics) sees the hook output's uses only
    retained = []

    def keep(x, hook):
        x.retain_grad()
        retained.append(x)

    with model.hooks([("dec_blocks.0.hook_resid_pre", keep)]):
        metric(model.view_outputs(model.module(*views))).mean().backward()
    model.module.zero_grad(set_to_none=True)
    assert torch.allclose(g_shared, retained[0].grad, atol=1e-7, rtol=1e-5)
    assert not torch.allclose(g_shared, cache["dec_blocks.0.hook_resid_pre_grad"])


def test_hook_shapes_and_scan_infer_shapes_without_computing(model, views):
    inferred = model.hook_shapes(*views)
    assert inferred == model.module.record_hook_order(*views)
    with model.scan(*views):
        shape = nnsight.save(model.dec_blocks2[1].cross_attn.hook_pattern.output.shape)
    assert tuple(shape) == (2, 2, 6, 6)


def test_tl_runs_refuse_inside_a_trace_and_on_an_edited_model(model, views):
    with pytest.raises(RuntimeError, match="inside an open nnsight trace"):
        with model.trace(*views):
            model.run_with_cache(*views)
    with model.edit() as (_, edited):
        edited.dec_blocks2[1].hook_resid_post.output[:] = 0
    with pytest.raises(RuntimeError, match=r"1 nnsight edit\(s\).*clear_edits"):
        edited.run_with_hooks(*views)
    with pytest.raises(RuntimeError, match="nnsight edit"):
        edited.run_with_cache(*views)
    edited.clear_edits()
    assert edited.run_with_hooks(*views)[1]["pts3d"].shape == (2, 32, 48, 3)
    assert model.run_with_cache(*views, names_filter="hook_enc_out")[1]["hook_enc_out"].shape == (4, 6, 32)


def test_dir_must_be_fwd_or_bwd(model):
    with pytest.raises(ValueError, match="dir must be 'fwd' or 'bwd'"):
        model.add_hook("hook_enc_out", lambda x, hook: None, dir="both")

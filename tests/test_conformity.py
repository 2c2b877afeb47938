"""The conformity suite (mv_interp.testing.check_adapter): every family passes it, and each check
catches the defect it is there for."""

from __future__ import annotations

import pytest
import torch

import mv_interp
from mv_interp.adapters.base import AttentionSite, ProbeSite
from mv_interp.adapters.dust3r import DUSt3RConfig, HookedDUSt3R
from mv_interp.adapters.fast3r import Fast3RConfig, HookedFast3R
from mv_interp.adapters.mast3r import HookedMASt3R, MASt3RConfig
from mv_interp.layers import SelfAttention
from mv_interp.testing import CheckContext, SkipCheck, _check_data_path, check_adapter, list_checks, register_check

TINY = dict(img_size=(32, 48), enc_embed_dim=32, enc_depth=2, enc_num_heads=2, dec_embed_dim=32, dec_depth=2,
            dec_num_heads=2)
ALL = ["hook_table", "hook_order", "data_path", "attention_rows", "sites", "view_outputs", "nnsight_cache",
       "invokes", "sdpa", "pointmap_lens", "knockout", "probe_step", "head_scores", "cache_algebra", "bwd_hooks",
       "attribution"]


def tiny(cls, cfg_cls, **kw):
    torch.manual_seed(0)
    return mv_interp.MVModel(cls(cfg_cls(**{**TINY, **kw})).eval())


# -- every family conforms -------------------------------------------------------------------


def test_dust3r_linear_conforms(linear_model):
    """The foundation's DUSt3R conformity test: edits every hook and checks the output moves,
    attention rows sum to 1, and the rest of the contract (reference-fixture weights)."""
    report = check_adapter(linear_model)
    assert [r.name for r in report.results] == ALL
    assert all(r.status == "passed" for r in report.results), str(report)
    text = str(report)
    assert text.splitlines()[0] == "check_adapter(HookedDUSt3R): 16 passed"
    assert all(f"PASS  {name}" in text for name in ALL)


# DPT heads cost ~1 GFLOP per 16×16 patch on CPU; the DPT families run on 1×2-patch images.
def test_dust3r_dpt_conforms():
    report = check_adapter(tiny(HookedDUSt3R, DUSt3RConfig, head_type="dpt"), size=(16, 32))
    assert all(r.status == "passed" for r in report.results), str(report)


def test_mast3r_conforms():
    report = check_adapter(tiny(HookedMASt3R, MASt3RConfig, output_mode="pts3d+desc8"), size=(16, 32))
    assert all(r.status == "passed" for r in report.results), str(report)


def test_fast3r_conforms_with_two_and_three_views():
    model = tiny(HookedFast3R, Fast3RConfig)
    report = check_adapter(model, size=(16, 32))  # default: 3 views for a model of any number of views
    assert all(r.status == "passed" for r in report.results), str(report)
    report = check_adapter(model, size=(16, 32), n_views=2, checks=["sites"])
    assert [r.status for r in report.results] == ["passed"]


# -- each check catches its defect ------------------------------------------------------------


class DiscardsAHook(HookedDUSt3R):
    """ViT-Prisma's bug: the hook is called but its return value is dropped."""

    def encode(self, imgs, pos):
        x = self.patch_embed(imgs)
        self.hook_patch_embed(x)  # value discarded: edits do nothing
        for blk in self.enc_blocks:
            x = blk(x, pos)
        return self.hook_enc_out(self.enc_norm(x))


def test_data_path_catches_a_discarded_hook():
    model = tiny(DiscardsAHook, DUSt3RConfig)
    report = check_adapter(model, checks=["data_path"], raise_on_failure=False)
    assert not report.ok
    assert len(report["data_path"].messages) == 1 and report["data_path"].messages[0].startswith("hook_patch_embed:")
    with pytest.raises(AssertionError, match="hook_patch_embed: adding noise to it does not change any output"):
        check_adapter(model, checks=["data_path"])
    # a model may declare such a hook read-only
    DiscardsAHook.read_only_hooks = ("hook_patch_embed",)
    try:
        assert check_adapter(model, checks=["data_path"]).ok
    finally:
        DiscardsAHook.read_only_hooks = ()


def test_data_path_noise_stage_alone_agrees():
    """Without the gradient screen, batched noise edits reach the same verdicts."""
    small = dict(enc_depth=1, dec_depth=1)
    good = CheckContext(tiny(HookedDUSt3R, DUSt3RConfig, **small), batch=2, n_views=2, size=(16, 32), seed=0)
    assert _check_data_path(good, screen=False) == []
    bad = CheckContext(tiny(DiscardsAHook, DUSt3RConfig, **small), batch=2, n_views=2, size=(16, 32), seed=0)
    fails = _check_data_path(bad, screen=False, group=40)
    assert [f.split(":")[0] for f in fails] == ["hook_patch_embed"]


class UnnormalisedPattern(HookedDUSt3R):
    def __init__(self, config):
        super().__init__(config)
        core = self.dec_blocks2[1].cross_attn
        core.hook_pattern.add_hook(lambda x, hook: x * 1.5, is_permanent=True)


def test_attention_rows_catches_an_unnormalised_pattern():
    report = check_adapter(tiny(UnnormalisedPattern, DUSt3RConfig), checks=["attention_rows"], raise_on_failure=False)
    assert [m.split(":")[0] for m in report["attention_rows"].messages] == ["dec_blocks2.1.cross_attn.hook_pattern"]


class WrongOrder(HookedDUSt3R):
    def hook_names(self):
        names = super().hook_names()
        return names[:5] + [names[6], names[5]] + names[7:]


def test_hook_order_catches_a_wrong_declared_order():
    report = check_adapter(tiny(WrongOrder, DUSt3RConfig), checks=["hook_order"], raise_on_failure=False)
    assert "hook_names()[5]" in report["hook_order"].messages[0]


class BadSites(HookedDUSt3R):
    def probe_sites(self, encoder_blocks=False, sublayers=False, n_views=None):
        sites = super().probe_sites(encoder_blocks, sublayers, n_views)
        sites = [s for s in sites if not s.hook.startswith("enc_blocks.1.")]  # block left uncovered
        s = sites[-1]
        sites[-1] = ProbeSite(s.name, s.hook, s.view, s.layer, s.kind, s.stack, s.order, 999, s.layout)
        return sites

    def attention_sites(self, n_views=None):
        sites = super().attention_sites(n_views)[1:]  # drop enc_blocks.0's site
        s = sites[-1]
        sites[-1] = AttentionSite(s.name, s.pattern_hook, s.scores_hook, s.z_hook, s.kind, s.stack, s.layer,
                                  s.query_view, s.key_views, 7, s.layout)
        return sites


def test_sites_catch_wrong_metadata_and_uncovered_blocks():
    report = check_adapter(tiny(BadSites, DUSt3RConfig), checks=["sites"], raise_on_failure=False)
    text = "\n".join(report["sites"].messages)
    assert "d_model 999 but dec_blocks2.1.hook_resid_post has width 32" in text
    assert "block 'enc_blocks.1' has no probe site" in text
    assert "pattern hook 'enc_blocks.0.attn.hook_pattern' belongs to no attention site" in text
    assert "expected [batch, 7 heads, q, k]" in text
    assert len(report["sites"].messages) == 4


class MixesSamples(HookedDUSt3R):
    """Leaks information across the batch (a batch-statistics bug)."""

    def encode(self, imgs, pos):
        x = super().encode(imgs, pos)
        return x + 0.1 * x.mean(dim=0, keepdim=True)


def test_invokes_catch_samples_leaking_into_each_other():
    report = check_adapter(tiny(MixesSamples, DUSt3RConfig), checks=["invokes"], raise_on_failure=False)
    assert not report.ok and "differs from a separate run" in report["invokes"].messages[0]


class EagerPathDiffers(SelfAttention):
    """An attention whose explicit path (taken when a pattern is read) computes something else."""

    def attend(self, q, k, v, qpos, kpos):
        if self.needs_pattern():
            q = q * 2
        return super().attend(q, k, v, qpos, kpos)


def test_sdpa_catches_paths_that_disagree():
    model = tiny(HookedDUSt3R, DUSt3RConfig)
    model.module.dec_blocks[0].attn.__class__ = EagerPathDiffers
    report = check_adapter(model, checks=["sdpa"], raise_on_failure=False)
    assert not report.ok and "SDPA and explicit attention differ" in report["sdpa"].messages[0]


class FiresTwice(HookedDUSt3R):
    def decode(self, enc1, enc2, pos):
        feats1, feats2 = super().decode(enc1, enc2, pos)
        feats1[-1] = self.hook_dec_out1(feats1[-1])  # a second call of the same hook
        return feats1, feats2


def test_hook_table_catches_a_hook_called_twice():
    report = check_adapter(tiny(FiresTwice, DUSt3RConfig), checks=["hook_table"], raise_on_failure=False)
    assert report["hook_table"].messages == [
        "hook_dec_out1: ran 2 times in one forward (expected once; a hook called twice cannot be read or edited "
        "unambiguously, one never called is dead)"]


class ZOfAnotherLayer(HookedDUSt3R):
    """Attention sites whose z hook belongs to the next block: metadata a knockout would trust."""

    def attention_sites(self, n_views=None):
        sites = super().attention_sites(n_views)
        out = []
        for s in sites:
            z = s.z_hook.replace(f".{s.layer}.", f".{(s.layer + 1) % 2}.") if s.stack == "dec" else s.z_hook
            out.append(AttentionSite(s.name, s.pattern_hook, s.scores_hook, z, s.kind, s.stack, s.layer,
                                     s.query_view, s.key_views, s.n_heads, s.layout))
        return out


def test_knockout_runs_the_generic_tool_and_catches_wrong_site_metadata(tiny_model):
    assert check_adapter(tiny_model, checks=["knockout"]).ok
    report = check_adapter(tiny(ZOfAnotherLayer, DUSt3RConfig), checks=["knockout"], raise_on_failure=False)
    assert "left its head outputs" in report["knockout"].messages[0]


# -- the registry of checks ------------------------------------------------------------------


def test_checks_are_a_named_registry_that_takes_new_checks(tiny_model):
    assert list_checks()[: len(ALL)] == ALL
    calls = []

    def probe_step(ctx):
        calls.append((ctx.batch, ctx.n_views, len(ctx.module.probe_sites(n_views=ctx.n_views))))
        return ["one message"]

    def not_applicable(ctx):
        raise SkipCheck("no such tool for this model")

    register_check("_test_extra", probe_step)
    register_check("_test_skip", not_applicable)
    try:
        with pytest.raises(ValueError, match="exists"):
            register_check("_test_extra", probe_step)
        report = check_adapter(tiny_model, checks=["_test_extra", "_test_skip"], raise_on_failure=False)
        assert calls == [(2, 2, len(tiny_model.probe_sites()))]
        assert [(r.name, r.status) for r in report.results] == [("_test_extra", "failed"), ("_test_skip", "skipped")]
        assert "SKIP  _test_skip" in str(report) and "- no such tool for this model" in str(report)
    finally:
        from mv_interp import testing

        testing._CHECKS.pop("_test_extra", None)
        testing._CHECKS.pop("_test_skip", None)


def test_a_check_that_raises_is_reported_not_fatal(tiny_model):
    register_check("_test_boom", lambda ctx: 1 / 0)
    try:
        report = check_adapter(tiny_model, checks=["_test_boom", "hook_order"], raise_on_failure=False)
    finally:
        from mv_interp import testing

        testing._CHECKS.pop("_test_boom", None)
    assert [r.status for r in report.results] == ["error", "passed"]
    assert "ZeroDivisionError" in report.results[0].messages[0]


def test_bad_arguments_name_the_problem(tiny_model):
    with pytest.raises(KeyError, match="unknown conformity check"):
        check_adapter(tiny_model, checks=["nope"])
    with pytest.raises(ValueError, match="batch must be at least 2"):
        check_adapter(tiny_model, batch=1)
    with pytest.raises(ValueError, match="exactly 2 views"):
        check_adapter(tiny_model, n_views=3)
    with pytest.raises(TypeError, match="MultiViewModel"):
        check_adapter(torch.nn.Linear(2, 2))

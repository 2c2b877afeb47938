"""The hooked MASt3R reproduces every tensor the reference implementation recorded, and loads
official-format checkpoints (.pth with a constructor string, HF-style directories)."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from fixture_utils import assert_close, fixture, formula_state_dict
from safetensors.torch import save_file
from test_dust3r_parity import check_croco_tensors

import mv_interp
from mv_interp.adapters.mast3r import HookedMASt3R, MASt3RConfig, mast3r_config_from_constructor
from mv_interp.loading import parse_constructor


@pytest.fixture(scope="module")
def mast3r_fixture():
    return fixture("mast3r/mast3r_tiny")


@pytest.fixture(scope="module")
def mast3r_sd(mast3r_fixture):
    """The upstream-format state dict (computing the formula takes seconds: once per module)."""
    return formula_state_dict(mast3r_fixture[0])


@pytest.fixture(scope="module")
def mast3r_model(mast3r_fixture, mast3r_sd):
    meta, _ = mast3r_fixture
    return mv_interp.load_model(mast3r_sd, config=meta["config"])


@pytest.fixture(scope="module")
def mast3r_run(mast3r_fixture, mast3r_model):
    """(outputs, every hook) on the fixture inputs, shared: the DPT heads make a forward cost seconds."""
    _, tensors = mast3r_fixture
    with torch.no_grad():
        return mast3r_model.run_with_cache(tensors["img1"], tensors["img2"])


def assert_same_weights(model, reference):
    """Same class, config and every parameter: the same function as the reference (which passed parity)."""
    assert type(model.module) is type(reference.module) and model.config == reference.config
    a, b = model.module.state_dict(), reference.module.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_config_from_json_equals_config_from_constructor(mast3r_fixture, mast3r_model):
    meta, _ = mast3r_fixture
    name, kwargs = parse_constructor(meta["constructor"])
    assert name == "AsymmetricMASt3R"
    cfg = mast3r_config_from_constructor(kwargs)
    assert cfg == mast3r_model.config
    assert (cfg.desc_dim, cfg.two_confs, cfg.desc_conf_mode) == (24, True, ("exp", 0, float("inf")))
    # and back: our constructor string parses to the same config
    assert mast3r_config_from_constructor(parse_constructor(cfg.to_constructor())[1]) == cfg


def test_every_fixture_tensor_matches(mast3r_fixture, mast3r_model, mast3r_run):
    meta, tensors = mast3r_fixture
    assert type(mast3r_model.module) is HookedMASt3R
    out, cache = mast3r_run
    assert check_croco_tensors(tensors, out, cache) == len(meta["keys"]) - 4
    # the descriptor outputs are among them, and really unit-norm
    assert {"out.desc.1", "out.desc.2", "out.desc_conf.1", "out.desc_conf.2"} <= set(tensors)
    assert torch.allclose(out[1]["desc"].norm(dim=-1), torch.ones(()), atol=1e-5)


def test_local_feature_hooks_hold_the_mlp_input_and_output(mast3r_model, mast3r_run):
    c = mast3r_model.config
    _, cache = mast3r_run
    for v in (1, 2):
        local_in = cache[mast3r_model.act_name("local_in", view=v)]
        assert local_in.shape == (2, 12, c.enc_embed_dim + c.dec_embed_dim)
        # encoder output first, then the final (normed) decoder output, as upstream concatenates
        enc = cache["hook_enc_out"][(v - 1) * 2 : v * 2]
        assert torch.equal(local_in[..., : c.enc_embed_dim], enc)
        assert torch.equal(local_in[..., c.enc_embed_dim :], cache[f"hook_dec_out{v}"])
        local_out = cache[f"downstream_head{v}.hook_local_out"]
        assert local_out.shape == (2, 12, 25 * 16 * 16)
        raw = cache[f"downstream_head{v}.hook_raw"]
        assert raw.shape == (2, 4 + 25, 48, 64)
        # channel 4 + j at pixel (0, 0) of patch 0 is MLP output channel j·256 (pixel shuffle)
        assert torch.allclose(raw[:, 4:, 0, 0], local_out[:, 0, ::256])


def test_sdpa_path_matches_explicit_path(mast3r_fixture, mast3r_model, mast3r_run):
    _, tensors = mast3r_fixture
    with torch.no_grad():
        fast = mast3r_model.forward(tensors["img1"], tensors["img2"])
    slow, _ = mast3r_run
    for v in range(2):
        for k in ("pts3d", "conf", "desc", "desc_conf"):
            assert_close(fast[v][k], slow[v][k], f"view{v + 1}.{k}")


def test_official_pth_round_trip(tmp_path, mast3r_fixture, mast3r_sd, mast3r_model):
    meta, _ = mast3r_fixture
    path = tmp_path / "mast3r.pth"
    torch.save({"model": mast3r_sd, "args": argparse.Namespace(model=meta["constructor"])}, path)
    assert_same_weights(mv_interp.load_model(path), mast3r_model)


def test_upstream_hf_directory(tmp_path, mast3r_fixture, mast3r_sd, mast3r_model):
    """An HF-style directory as upstream publishes it: config.json of constructor kwargs, upstream keys."""
    meta, _ = mast3r_fixture
    # safetensors refuses shared storage: the DPT alias pairs are one tensor upstream
    save_file({k: v.clone().contiguous() for k, v in mast3r_sd.items()}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(meta["config"]))
    assert_same_weights(mv_interp.load_model(tmp_path), mast3r_model)


def test_save_pretrained_round_trip(tmp_path, mast3r_model):
    mast3r_model.save_pretrained(tmp_path / "m")
    assert json.loads((tmp_path / "m" / "config.json").read_text())["mv_interp_family"] == "mast3r"
    assert_same_weights(mv_interp.load_model(tmp_path / "m"), mast3r_model)


def test_two_confs_off_copies_conf_and_shrinks_the_mlp():
    cfg = MASt3RConfig(img_size=(16, 32), enc_embed_dim=32, enc_depth=1, enc_num_heads=2, dec_embed_dim=32,
                       dec_depth=2, dec_num_heads=2, output_mode="pts3d+desc8", two_confs=False)
    model = HookedMASt3R(cfg).eval()
    assert model.downstream_head1.head_local_features.fc2.out_features == 8 * 16 * 16
    with torch.no_grad():
        out = model(*model.example_inputs(batch=2))
    assert torch.equal(out[0]["desc_conf"], out[0]["conf"])
    assert out[0]["desc"].shape == (2, 16, 32, 8)


@pytest.mark.parametrize("bad, match", [
    (dict(output_mode="pts3d"), "pts3d\\+desc"),
    (dict(head_type="dpt"), "head_type"),
    (dict(desc_mode="l1"), "desc_mode"),
])
def test_bad_configs_name_the_problem(bad, match):
    with pytest.raises(ValueError, match=match):
        MASt3RConfig(**bad)


def test_constructor_defaults_follow_upstream():
    """Keywords left out of an AsymmetricMASt3R string take upstream's defaults (two_confs=False,
    desc_conf_mode = conf_mode)."""
    _, kw = parse_constructor("AsymmetricMASt3R(pos_embed='RoPE100', img_size=(512, 512), head_type='catmlp+dpt', "
                              "output_mode='pts3d+desc24', enc_embed_dim=1024, enc_depth=24, enc_num_heads=16, "
                              "dec_embed_dim=768, dec_depth=12, dec_num_heads=12)")
    cfg = mast3r_config_from_constructor(kw)
    assert cfg.two_confs is False and cfg.desc_conf_mode is None
    assert cfg.resolved_desc_conf_mode == cfg.conf_mode

"""The hooked VGGT reproduces every tensor the upstream implementation recorded (3 frames, tiny
config), through ``mv_interp.load_model`` on a checkpoint written in the official layout; the key
conversion covers the official VGGT-1B key set; loading is strict and runs no code."""

from __future__ import annotations

import json
import re

import pytest
import torch
from einops import rearrange
from fixture_utils import FIXTURES, assert_close, fixture, formula_state_dict
from safetensors.torch import save_file

import mv_interp
from mv_interp.adapters.vggt import HookedVGGT, VGGTConfig, convert_state_dict, token_positions
from mv_interp.loading import CheckpointError, config_from_hf


@pytest.fixture(scope="module")
def vggt_fixture():
    return fixture("vggt/vggt_tiny")


@pytest.fixture(scope="module")
def vggt_config(vggt_fixture):
    return VGGTConfig.from_upstream(vggt_fixture[0]["config"])


@pytest.fixture(scope="module")
def vggt_checkpoint(vggt_fixture, tmp_path_factory):
    """The fixture's weights in the official hub layout: model.safetensors + config.json."""
    meta, _ = vggt_fixture
    d = tmp_path_factory.mktemp("vggt_tiny_hub")
    sd = formula_state_dict(meta)
    save_file(sd, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps({"img_size": 518, "patch_size": 14, "embed_dim": 32,
                                               "enable_track": False}))
    return d, sd


@pytest.fixture(scope="module")
def vggt_run(vggt_fixture, vggt_config, vggt_checkpoint):
    _, tensors = vggt_fixture
    model = mv_interp.load_model(str(vggt_checkpoint[0] / "model.safetensors"), config=vggt_config)
    images = tensors["images"]
    frames = [images[:, s] * 2 - 1 for s in range(images.shape[1])]  # mv_interp views are in [-1, 1]
    with torch.no_grad():
        out, cache = model.run_with_cache(*frames)
    return model, out, cache


def fixture_value(key: str, out, cache, sd, S: int) -> torch.Tensor:
    """What our model computed for fixture key ``key`` (upstream's layouts: frames on axis 1)."""
    per_frame = lambda x: rearrange(x, "(s b) ... -> b s ...", s=S)  # noqa: E731
    split = lambda x: rearrange(x, "b (s p) c -> b s p c", s=S)  # noqa: E731
    roots = {"dino.patch_proj": "aggregator.patch_embed.hook_patch_proj", "dino.embed": "aggregator.patch_embed.hook_embed",
             "dino.norm": "aggregator.patch_embed.hook_norm", "agg.tokens_in": "aggregator.frame_blocks.0.hook_resid_pre"}
    if key in roots:
        return per_frame(cache[roots[key]])
    if m := re.fullmatch(r"(dino|agg\.frame|agg\.global)\.(?:blocks\.)?(\d+)\.(\w+)", key):
        stack = {"dino": "aggregator.patch_embed.blocks", "agg.frame": "aggregator.frame_blocks",
                 "agg.global": "aggregator.global_blocks"}[m[1]]
        prefix, name = f"{stack}.{m[2]}", m[3]
        tokens = split if m[1] == "agg.global" else per_frame
        heads = (lambda x: x) if m[1] == "agg.global" else per_frame
        if name == "pattern":
            return heads(cache[f"{prefix}.attn.hook_pattern"])
        if name in ("q", "k", "v", "q_normed", "k_normed"):
            hook = {"q": "hook_rot_q", "k": "hook_rot_k"}.get(name, f"hook_{name}")
            return heads(cache[f"{prefix}.attn.{hook}"])
        return tokens(cache[f"{prefix}.hook_{name}"])
    if m := re.fullmatch(r"agg\.out\.(\d+)", key):
        i = m[1]
        return torch.cat([per_frame(cache[f"aggregator.frame_blocks.{i}.hook_resid_post"]),
                          split(cache[f"aggregator.global_blocks.{i}.hook_resid_post"])], -1)
    if key == "cam.tokens":
        return cache["camera_head.hook_tokens"]
    if m := re.fullmatch(r"cam\.iter\.(\d+)\.trunk\.(\d+)\.pattern", key):
        return cache[f"camera_head.iters.{m[1]}.trunk.{m[2]}.attn.hook_pattern"]
    if m := re.fullmatch(r"cam\.iter\.(\d+)\.(modulated|trunk_out|delta)", key):
        return cache[f"camera_head.iters.{m[1]}.hook_{m[2]}"]
    if m := re.fullmatch(r"out\.pose_enc_list\.(\d+)", key):
        return torch.stack([o["pose_enc_list"][:, int(m[1])] for o in out], 1)
    outputs = {"out.pose_enc": "pose_enc", "out.depth": "depth", "out.depth_conf": "depth_conf",
               "out.world_points": "pts3d", "out.world_points_conf": "conf"}
    assert key in outputs, f"fixture key {key} has no hook"
    return torch.stack([o[outputs[key]] for o in out], 1)


def test_every_fixture_tensor_matches(vggt_fixture, vggt_checkpoint, vggt_run):
    meta, tensors = vggt_fixture
    model, out, cache = vggt_run
    sd = vggt_checkpoint[1]
    S = meta["num_frames"]
    checked = 0
    for key, expected in tensors.items():
        if key == "images":
            continue
        if key == "agg.pos":
            h, w = tensors["images"].shape[-2] // 14, tensors["images"].shape[-1] // 14
            pos = token_positions(h, w, model.config.n_special)
            assert torch.equal(pos.expand_as(expected), expected)
        elif key == "dino.pos_embed":
            assert_close(model.module.aggregator.patch_embed.pos_table(2, 3), expected, key)
        elif m := re.fullmatch(r"(dino\.blocks|agg\.frame|agg\.global)\.(\d+)\.(attn_out|mlp_out)", key):
            # the fixture records the sublayer before LayerScale; our hooks sit after it
            part = {"dino.blocks": "aggregator.patch_embed.blocks", "agg.frame": "aggregator.frame_blocks",
                    "agg.global": "aggregator.global_blocks"}[m[1]]
            gamma = sd[f"{part}.{m[2]}.{'ls1' if m[3] == 'attn_out' else 'ls2'}.gamma"]
            assert_close(fixture_value(key, out, cache, sd, S), expected * gamma, key)
            # and the hook is the residual bookkeeping: resid_mid − resid_pre (resp. post − mid)
            pre, post = ("resid_pre", "resid_mid") if m[3] == "attn_out" else ("resid_mid", "resid_post")
            diff = cache[f"{part}.{m[2]}.hook_{post}"] - cache[f"{part}.{m[2]}.hook_{pre}"]
            assert_close(cache[f"{part}.{m[2]}.hook_{m[3]}"], diff, key)
        else:
            assert_close(fixture_value(key, out, cache, sd, S), expected, key)
        checked += 1
    assert checked == len(tensors) - 1 == 214


def test_official_key_set_converts_exactly():
    """The official VGGT-1B state dict (1797 keys, track head included) maps onto the hooked 1B model
    key for key and shape (meta tensors: no weights needed)."""
    shapes = json.loads((FIXTURES / "vggt" / "VGGT-1B.state_dict_shapes.json").read_text())["state_dict_shapes"]
    assert len(shapes) == 1797
    with torch.device("meta"):
        model = HookedVGGT(mv_interp.loading.resolve_config("vggt:1b", None)[1])
        official = {k: torch.empty(s) for k, s in shapes.items()}
    converted = convert_state_dict(official, model.config)
    own = model.state_dict()
    assert set(converted) == set(own)
    assert all(tuple(converted[k].shape) == tuple(own[k].shape) for k in own)
    assert set(official) - set(converted) == {k for k in official if k.startswith("track_head.")}
    assert len(official) - len(converted) == 394
    assert convert_state_dict({"module." + k: v for k, v in official.items()}, model.config).keys() == converted.keys()


def test_hub_config_json_builds_the_1b_geometry():
    adapter, cfg = config_from_hf({"embed_dim": 1024, "img_size": 518, "patch_size": 14})
    assert adapter.name == "vggt" and cfg == VGGTConfig()
    _, cfg = config_from_hf({"img_size": 518, "patch_size": 14, "embed_dim": 1024, "enable_track": False})
    assert cfg == VGGTConfig(enable_track=False)


def test_from_upstream_rejects_what_it_does_not_implement(vggt_fixture):
    base = vggt_fixture[0]["config"]
    with pytest.raises(ValueError, match="qk_norm"):
        VGGTConfig.from_upstream({**base, "aggregator": {**base["aggregator"], "qk_norm": False}})
    with pytest.raises(ValueError, match="unknown_kw"):
        VGGTConfig.from_upstream({**base, "camera_head": {**base["camera_head"], "unknown_kw": 1}})
    with pytest.raises(ValueError, match="contradicts"):
        VGGTConfig.from_upstream({**base, "patch_embed_vit": {**base["patch_embed_vit"], "embed_dim": 64}})
    with pytest.raises(ValueError, match="dim_in"):
        VGGTConfig.from_upstream({**base, "point_head": {**base["point_head"], "dim_in": 32}})


def test_loading_is_strict(vggt_checkpoint, vggt_config, tmp_path):
    _, sd = vggt_checkpoint
    small = {k: v for k, v in sd.items() if not k.startswith("aggregator.frame_blocks.3.")}
    with pytest.raises(CheckpointError, match="missing keys"):
        mv_interp.load_model(small, config=vggt_config)
    with pytest.raises(CheckpointError, match="unexpected keys"):
        mv_interp.load_model({**sd, "aggregator.extra.weight": torch.zeros(1)}, config=vggt_config)

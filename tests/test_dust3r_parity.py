"""The hooked DUSt3R reproduces every tensor the reference implementation recorded."""

from __future__ import annotations

import re

import pytest
import torch

from fixture_utils import assert_close

SUBLAYER = {
    "self_out": "hook_attn_out", "cross_out": "hook_cross_attn_out", "mlp_out": "hook_mlp_out",
    "resid_mid_self": "hook_resid_mid", "resid_mid_cross": "hook_resid_mid_cross", "resid_post": "hook_resid_post",
    "self_pattern": "attn.hook_pattern", "cross_pattern": "cross_attn.hook_pattern",
}
ENC = {"attn_out": "hook_attn_out", "mlp_out": "hook_mlp_out", "resid_post": "hook_resid_post"}


def fixture_to_hook(key: str, batch: int):
    """Map a fixture key to (hook name, slicer) or (output key) for DUSt3R/MASt3R fixtures."""
    m = re.fullmatch(r"enc\.blocks\.(\d+)\.(\w+)\.(\d)", key)
    if m:
        j, what, v = int(m[1]), m[2], int(m[3])
        return f"enc_blocks.{j}.{ENC[what]}", slice((v - 1) * batch, v * batch)
    m = re.fullmatch(r"enc\.(out|embed)\.(\d)", key)
    if m:
        v = int(m[2])
        return ("hook_enc_out" if m[1] == "out" else "hook_patch_embed"), slice((v - 1) * batch, v * batch)
    m = re.fullmatch(r"dec\.embed\.(\d)", key)
    if m:
        return f"{'dec_blocks' if m[1] == '1' else 'dec_blocks2'}.0.hook_resid_pre", slice(None)
    m = re.fullmatch(r"dec\.blocks\.(\d+)\.(\w+)\.(\d)", key)
    if m:
        prefix = "dec_blocks" if m[3] == "1" else "dec_blocks2"
        return f"{prefix}.{m[1]}.{SUBLAYER[m[2]]}", slice(None)
    m = re.fullmatch(r"dec\.norm\.(\d)", key)
    if m:
        return f"hook_dec_out{m[1]}", slice(None)
    return None


def output_value(out, key: str):
    m = re.fullmatch(r"out\.(\w+)\.(\d)", key)
    name, v = m[1], int(m[2]) - 1
    name = {"pts3d_in_other_view": "pts3d"}.get(name, name)
    return out[v][name]


@pytest.mark.parametrize("which", ["linear", "dpt"])
def test_every_fixture_tensor_matches(which, request):
    meta, tensors = request.getfixturevalue(f"{which}_fixture")
    model = request.getfixturevalue(f"{which}_model")
    with torch.no_grad():
        out, cache = model.run_with_cache(tensors["img1"], tensors["img2"])
    assert check_croco_tensors(tensors, out, cache) == len(meta["keys"]) - 4  # all but img1/2, true_shape1/2


def check_croco_tensors(tensors, out, cache) -> int:
    """Compare every fixture tensor but the inputs with our run (outputs and hooks, through the key
    mapping above); returns how many were compared."""
    batch = tensors["img1"].shape[0]
    checked = 0
    for key, expected in tensors.items():
        if key.startswith(("img", "true_shape")):
            continue
        if key.startswith("out."):
            actual = output_value(out, key)
        else:
            mapped = fixture_to_hook(key, batch)
            assert mapped is not None, f"fixture key {key} has no hook"
            hook, sl = mapped
            actual = cache[hook][sl]
        assert_close(actual, expected, key)
        checked += 1
    return checked


@pytest.mark.parametrize("which", ["linear", "dpt"])
def test_sdpa_path_matches_explicit_path(which, request):
    _, tensors = request.getfixturevalue(f"{which}_fixture")
    model = request.getfixturevalue(f"{which}_model")
    with torch.no_grad():
        fast = model.forward(tensors["img1"], tensors["img2"])
        slow, _ = model.run_with_cache(tensors["img1"], tensors["img2"], names_filter="*hook_pattern")
    for v in range(2):
        for k in ("pts3d", "conf"):
            assert_close(fast[v][k], slow[v][k], f"view{v + 1}.{k}")

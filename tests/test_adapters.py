"""The adapter API: registry and entry points, config detection, constructor strings, and the
one-file example adapter (examples/custom_adapter.py) passing the conformity suite."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

import mv_interp
from mv_interp.adapters import base
from mv_interp.adapters.base import (Adapter, adapter_for_model, get_adapter, list_adapters, pattern_blocks,
                                     register_adapter)
from mv_interp.loading import CheckpointError, config_from_hf, parse_constructor
from mv_interp.testing import check_adapter

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture(scope="module")
def example():
    """examples/custom_adapter.py imported as a module (it registers "tiny_alt")."""
    spec = importlib.util.spec_from_file_location("custom_adapter", EXAMPLES / "custom_adapter.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["custom_adapter"] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("custom_adapter", None)
    base._REGISTRY.pop("tiny_alt", None)


# -- registry ------------------------------------------------------------------------------


def test_builtin_families_are_registered():
    assert {"dust3r", "mast3r", "fast3r", "vggt"} <= set(list_adapters())
    assert get_adapter("fast3r").constructor_names == ("Fast3R",)
    assert get_adapter("mast3r").constructor_names == ("AsymmetricMASt3R",)
    assert get_adapter("vggt").constructor_names == ("VGGT",)
    with pytest.raises(KeyError, match="registered: .*'dust3r'.*entry point"):
        get_adapter("no_such_family")


def test_adapter_declarations_are_validated():
    dust3r = get_adapter("dust3r")
    with pytest.raises(TypeError, match="model_cls must subclass"):
        Adapter("x", dust3r.config_cls, torch.nn.Linear, dust3r.convert_state_dict)
    with pytest.raises(TypeError, match="config_cls must be a"):
        Adapter("x", dict, dust3r.model_cls, dust3r.convert_state_dict)
    with pytest.raises(ValueError, match="family is 'dust3r'"):
        Adapter("other", dust3r.config_cls, dust3r.model_cls, dust3r.convert_state_dict)
    with pytest.raises(ValueError, match="identifier"):
        Adapter("two words", dust3r.config_cls, dust3r.model_cls, dust3r.convert_state_dict)
    with pytest.raises(TypeError):  # (under pytest the runtime type checker answers first)
        register_adapter("dust3r")


def test_adapter_for_model_picks_the_exact_family():
    from mv_interp.adapters.dust3r import DUSt3RConfig, HookedDUSt3R
    from mv_interp.adapters.mast3r import HookedMASt3R, MASt3RConfig

    tiny = dict(img_size=(16, 16), enc_embed_dim=16, enc_depth=1, enc_num_heads=1, dec_embed_dim=16, dec_depth=1,
                dec_num_heads=1)
    assert adapter_for_model(HookedDUSt3R(DUSt3RConfig(**tiny))).name == "dust3r"
    # HookedMASt3R subclasses HookedDUSt3R: the exact class wins
    assert adapter_for_model(mv_interp.MVModel(HookedMASt3R(MASt3RConfig(**tiny)))).name == "mast3r"


def test_entry_points_register_third_party_families(monkeypatch, tmp_path):
    pkg = tmp_path / "thirdparty_adapter.py"
    pkg.write_text((EXAMPLES / "custom_adapter.py").read_text())
    monkeypatch.syspath_prepend(str(tmp_path))
    good = importlib.metadata.EntryPoint("tiny_alt", "thirdparty_adapter", base.ENTRY_POINT_GROUP)
    broken = importlib.metadata.EntryPoint("broken", "no_such_module_here", base.ENTRY_POINT_GROUP)

    def fake_entry_points(group=None, **kw):
        return [good, broken] if group == base.ENTRY_POINT_GROUP else []

    monkeypatch.setattr(importlib.metadata, "entry_points", fake_entry_points)
    monkeypatch.setattr(base, "_ENTRY_POINTS_LOADED", False)
    monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))
    base._REGISTRY.pop("tiny_alt", None)
    with pytest.warns(RuntimeWarning, match="could not load adapter entry point 'broken'"):
        adapter = get_adapter("tiny_alt")  # loads the entry points on first use
    assert adapter.model_cls.__module__ == "thirdparty_adapter"
    assert "dust3r" in list_adapters()  # a broken plug-in does not take the built-ins down
    sys.modules.pop("thirdparty_adapter", None)


# -- configs and constructor strings ------------------------------------------------------------


@pytest.mark.parametrize("name, family", [
    ("dust3r/dust3r_tiny_dpt", "dust3r"), ("mast3r/mast3r_tiny", "mast3r"), ("fast3r/fast3r_tiny", "fast3r"),
])
def test_hf_configs_are_recognised_by_family(name, family):
    meta = json.loads((Path(__file__).parent / "fixtures" / f"{name}.json").read_text())
    adapter, cfg = config_from_hf(dict(meta["config"]))
    assert adapter.name == family and type(cfg) is adapter.config_cls
    # the upstream constructor string gives the same config
    cls_name, kwargs = parse_constructor(meta["constructor"])
    assert cls_name in adapter.constructor_names and adapter.config_from_kwargs(kwargs) == cfg


def test_constructor_strings_take_dict_calls_of_literals_only():
    _, kw = parse_constructor("Fast3R(encoder_args=dict(embed_dim=64, depth=2), "
                              "head_args=dict(depth_mode=['exp', -inf, inf]))")
    inf = float("inf")
    assert kw == {"encoder_args": {"embed_dim": 64, "depth": 2}, "head_args": {"depth_mode": ["exp", -inf, inf]}}
    with pytest.raises(CheckpointError, match="not a literal"):
        parse_constructor("Fast3R(encoder_args=dict(depth=__import__('os').getpid()))")
    with pytest.raises(CheckpointError, match="not a literal"):
        parse_constructor("Fast3R(encoder_args=dict(**x))")


def test_n_views_of_sites_is_checked(tiny_model):
    with pytest.raises(ValueError, match="exactly 2 views"):
        tiny_model.probe_sites(n_views=3)
    assert tiny_model.attention_sites(n_views=2) == tiny_model.attention_sites()


def test_pattern_blocks_of_stacked_and_global_patterns():
    stacked = torch.arange(2 * 3 * 1 * 4 * 4, dtype=torch.float).reshape(2 * 3, 1, 4, 4)  # [views·batch, head, q, k]
    site = base.AttentionSite("x", "p", "s", "z", "self", "enc", 0, 0, (1, 2), 1, "stacked")
    blocks = pattern_blocks(stacked, site, 2)
    assert sorted(blocks) == [(1, 1), (2, 2)] and torch.equal(blocks[(2, 2)], stacked[3:])
    joint = torch.arange(3 * 1 * 6 * 6, dtype=torch.float).reshape(3, 1, 6, 6)  # [batch, head, 3·2, 3·2]
    site = base.AttentionSite("y", "p", "s", "z", "self", "dec", 0, 0, (1, 2, 3), 1, "global")
    blocks = pattern_blocks(joint, site, 3)
    assert len(blocks) == 9 and torch.equal(blocks[(3, 2)], joint[:, :, 4:6, 2:4])


# -- the one-file example ---------------------------------------------------------------------------


def test_example_adapter_passes_the_conformity_suite(example):
    torch.manual_seed(0)
    model = mv_interp.MVModel(example.HookedTinyAlt(example.TinyAltConfig()).eval())
    for n_views in (2, 4):
        report = check_adapter(model, n_views=n_views)
        assert all(r.status == "passed" for r in report.results), str(report)


def test_example_adapter_loads_upstream_keys_and_round_trips(example, tmp_path):
    torch.manual_seed(0)
    ref = example.HookedTinyAlt(example.TinyAltConfig()).eval()
    upstream = {f"model.{k.replace('blocks.', 'transformer.layers.')}": v for k, v in ref.state_dict().items()}
    model = mv_interp.load_model(upstream, config="tiny_alt:tiny")  # named config, through convert_state_dict
    views = model.example_inputs(batch=2, n_views=3)
    with torch.no_grad():
        want = ref(*views)
        got = model.forward(*views)
    assert torch.equal(got[1]["pts3d"], want[1]["pts3d"])
    model.save_pretrained(tmp_path / "tiny")
    again = mv_interp.load_model(tmp_path / "tiny")
    assert type(again.module) is example.HookedTinyAlt and again.config == ref.config
    # a directory without the family name is recognised by matches_hf_config
    cfg = json.loads((tmp_path / "tiny" / "config.json").read_text())
    del cfg["mv_interp_family"]
    (tmp_path / "tiny" / "config.json").write_text(json.dumps(cfg))
    assert type(mv_interp.load_model(tmp_path / "tiny").module) is example.HookedTinyAlt


def test_example_main_runs(example, capsys):
    example.main()
    out = capsys.readouterr().out
    assert "check_adapter(HookedTinyAlt): 16 passed" in out
    assert "global attention of block 1: (1, 4, 72, 72)" in out

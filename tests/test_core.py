"""The typed core: model handle, I/O policy, batch of views, site records, config base, RoPE cache."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

import mv_interp
from mv_interp.adapters.base import AttentionSite, ModelConfig, ProbeSite
from mv_interp.data.views import Views, as_views
from mv_interp.io import atomic_write, dumps_json, from_jsonable, nan_if_none, read_json, write_csv, write_json
from mv_interp.layers import RoPE2D, patch_positions, rope2d_cos_sin
from mv_interp.types import as_module, is_traced


@pytest.fixture(scope="module")
def toy():
    return mv_interp.load_model("dust3r-toy")


def test_as_module_unwraps_once(toy):
    module = as_module(toy)
    assert module is toy.module and as_module(module) is module
    assert is_traced(toy) and not is_traced(module)
    with pytest.raises(TypeError, match="mv_interp.load_model"):
        as_module(torch.nn.Linear(2, 2))


def test_json_has_one_nan_policy(tmp_path):
    obj = {"a": math.nan, "b": [math.inf, -math.inf, 1.5], "c": torch.tensor(2.0), "d": (1, 2)}
    text = dumps_json(obj)
    assert "NaN" not in text and "Infinity" not in text
    back = read_json(write_json(tmp_path / "x.json", obj))
    assert back == {"a": None, "b": ["inf", "-inf", 1.5], "c": 2.0, "d": [1, 2]}
    assert from_jsonable(back["b"]) == [math.inf, -math.inf, 1.5] and math.isnan(nan_if_none(back["a"]))
    # files written before the policy (bare NaN tokens) still load
    (tmp_path / "old.json").write_text(json.dumps({"a": math.nan}))
    assert math.isnan(read_json(tmp_path / "old.json")["a"])


def test_atomic_write_leaves_nothing_half_written(tmp_path):
    target = tmp_path / "t.txt"
    target.write_text("old")

    def boom(p):
        open(p, "w").write("half")
        raise RuntimeError("crash")

    with pytest.raises(RuntimeError):
        atomic_write(target, boom)
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["t.txt"]
    assert write_csv(tmp_path / "r.csv", [{"x": 1.0 / 3, "y": "a"}]).read_text() == "x,y\n0.333333,a\n"
    assert mv_interp.loading.atomic_write is atomic_write  # the old home re-exports it


def _sample(b: int) -> list[dict[str, torch.Tensor]]:
    return [{"img": torch.full((3, 4, 4), float(b)), "valid": torch.ones(4, 4, dtype=torch.bool)} for _ in range(2)]


def test_views_batch_operations():
    views = Views.collate([_sample(b) for b in range(5)])
    assert isinstance(views, list) and len(views) == views.n_views == 2 and views.batch_size == 5
    assert [c.batch_size for c in views.batches(2)] == [2, 2, 1]
    assert views.slice(1, 3)[0]["img"][:, 0, 0, 0].tolist() == [1.0, 2.0]
    assert views.select([4, 0])[1]["img"][:, 0, 0, 0].tolist() == [4.0, 0.0]
    again = Views.concat(list(views.batches(2)))
    assert all(torch.equal(again[v][k], views[v][k]) for v in range(2) for k in views[v])
    assert len(views.samples()) == 5 and views.samples()[3][0]["img"].shape == (3, 4, 4)
    assert as_views((torch.zeros(3, 3, 4, 4), torch.zeros(3, 3, 4, 4))).batch_size == 3
    assert as_views([{"img": torch.zeros(3, 4, 4)}] * 2).batch_size == 1  # unbatched views get a batch axis
    with pytest.raises(ValueError, match="lacks \\['pts3d'\\]"):
        views.validate(need=("img", "pts3d"))
    with pytest.raises(ValueError, match="one view dict"):
        as_views({"img": torch.zeros(1, 3, 4, 4)})


def test_site_records_validate_their_kinds():
    # under pytest the jaxtyping/beartype hook checks the Literal annotations before __post_init__
    # runs (a TypeError); without it, __post_init__ raises the ValueError: either names the value
    ProbeSite("dec0.self.v1", "h", 1, 0, "self", "dec", 0, 8)
    with pytest.raises((ValueError, TypeError), match="selff"):
        ProbeSite("x", "h", 1, 0, "selff", "dec", 0, 8)
    with pytest.raises((ValueError, TypeError), match="row"):
        ProbeSite("x", "h", 1, 0, "self", "dec", 0, 8, "row")
    with pytest.raises((ValueError, TypeError), match="decoder"):
        AttentionSite("x", "p", "s", "z", "self", "decoder", 0, 1, (1,), 2)
    site = ProbeSite("x", "h", 1, 0, "self", "dec", 0, 8)
    object.__setattr__(site, "kind", "selff")
    with pytest.raises(ValueError, match="kind='selff' is not one of"):
        site.__post_init__()


def test_model_config_base():
    assert ModelConfig(img_size=(32, 32), patch_size=16).img_size == (32, 32)
    with pytest.raises(ValueError, match="multiple of patch_size"):
        ModelConfig(img_size=(40, 32), patch_size=16)
    cfg = mv_interp.get_adapter("fast3r").config_cls(enc_embed_dim=32, enc_num_heads=2, dec_embed_dim=32,
                                                     dec_num_heads=2, img_size=(32, 32))
    assert type(cfg).from_dict(json.loads(cfg.to_json())) == cfg  # inf round-trips through "inf"


def test_rope_cache_is_keyed_by_the_patch_grid():
    rope = RoPE2D()
    grid = patch_positions(2, 3)
    # same shape, same max y / max x and the same sum as the grid: the old cache key collided
    other = grid[[0, 4, 2, 3, 1, 5]]
    assert other.shape == grid.shape and int(other.sum()) == int(grid.sum())
    assert torch.equal(rope.tables(grid, 8)[0], rope2d_cos_sin(grid, 8)[0])
    assert torch.equal(rope.tables(other, 8)[0], rope2d_cos_sin(other, 8)[0])
    assert not torch.equal(rope.tables(other, 8)[0], rope.tables(grid, 8)[0])


def _same_rows(a, b):
    def same(x, y):
        if isinstance(x, float) and isinstance(y, float):
            return (math.isnan(x) and math.isnan(y)) or math.isclose(x, y, rel_tol=1e-5, abs_tol=1e-7)
        return x == y

    return len(a) == len(b) and all(r.keys() == q.keys() and all(same(r[k], q[k]) for k in r) for r, q in zip(a, b))


def test_score_heads_resumes_from_its_checkpoint(toy, tmp_path):
    from mv_interp.data import SceneConfig, render_views
    from mv_interp.heads import score_heads

    cfg = SceneConfig(image_size=(64, 64))
    batches = [render_views(2, cfg, seed=s) for s in (0, 2)]
    kw = dict(kinds=("register", "local"), sites=["dec1.*"])
    whole = score_heads(toy, batches, **kw).table()

    def interrupted():
        yield batches[0]
        raise KeyboardInterrupt

    ckpt = tmp_path / "progress.pt"
    with pytest.raises(KeyboardInterrupt):
        score_heads(toy, interrupted(), checkpoint=ckpt, **kw)
    seen = []
    resumed = score_heads(toy, (seen.append(i) or b for i, b in enumerate(batches)), checkpoint=ckpt, **kw)
    assert len(seen) == 2 and resumed.n_pairs == 4  # batch 0 came from the checkpoint, not a new forward
    assert _same_rows(resumed.table(), whole)
    # other settings: the checkpoint is not reused
    other = score_heads(toy, batches, checkpoint=ckpt, kinds=("local",), sites=["dec1.*"])
    assert other.n_pairs == 4


def test_open_source_reads_every_form_of_data(tmp_path):
    from PIL import Image

    from mv_interp.data.sources import ImageSource, SyntheticSource, TensorSource, open_source, save_pairs

    synth = open_source(None, (32, 32), seed=5)
    assert isinstance(synth, SyntheticSource)
    a, b = synth.take(1, 2), synth.batch(0, 3, "cpu")
    assert torch.equal(a[0]["img"], b[0]["img"][1:3])  # take() and batch() agree on the scene order
    pairs = save_pairs(tmp_path / "p.safetensors", synth.take(0, 3))
    from_file = open_source(pairs, (32, 32))
    assert isinstance(from_file, TensorSource) and torch.equal(from_file.take(0, 3)[1]["pts3d"], synth.take(0, 3)[1]["pts3d"])
    files = []
    for i in range(4):
        path = tmp_path / f"im{i}.png"
        Image.fromarray((torch.rand(40, 48, 3) * 255).byte().numpy()).save(path)
        files.append(path)
    images = open_source(files, (32, 32))
    assert isinstance(images, ImageSource) and images.describe()["files"][1] == [str(files[2]), str(files[3])]
    batch = images.take(0, 2)
    assert len(batch) == 2 and set(batch[0]) == {"img"} and batch[0]["img"].shape[:2] == (2, 3)
    assert max(batch[0]["img"].shape[-2:]) == 32 and all(s % 16 == 0 for s in batch[0]["img"].shape[-2:])
    with pytest.raises(ValueError, match="do not split"):
        open_source(files[:3], (32, 32))

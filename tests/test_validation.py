"""Bad input gives a correct result or one clear error (issue 17): images, checkpoints, configs,
devices, hooks, capture data and the command line's error policy — one table per entry point."""

from __future__ import annotations

import argparse
import errno
import json
import os
import pickle
import shutil
import warnings

import numpy as np
import pytest
import torch

import mv_interp
from mv_interp import cli
from mv_interp.adapters.dust3r import DUSt3RConfig
from mv_interp.data import CaptureError, SceneConfig, check_capture, load_tuple, render_views, write_capture
from mv_interp.errors import ConfigError, OutOfRangeError, UnknownNameError, UserError, WrongTypeError
from mv_interp.images import ImageRangeWarning, load_images
from mv_interp.loading import CheckpointError

from conftest import TINY



@pytest.fixture(scope="module")
def model(tiny_model_shared):
    return tiny_model_shared


@pytest.fixture(scope="module")
def views(model):
    return model.example_inputs()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, model):
    return mv_interp.save_pretrained(model, tmp_path_factory.mktemp("m") / "tiny")


# --------------------------------------------------------------------------------------
# images: every way in (plain module, nnsight wrapper, TL-style helpers) checks the same
# --------------------------------------------------------------------------------------

def _u8(x):
    return ((x + 1) * 127.5).round().to(torch.uint8)


IMAGE_ERRORS = [
    # (case, how view 1 is spoilt, error type, message part)
    ("uint8", _u8, UserError, r"dtype torch\.uint8.*load_images.*127\.5"),
    ("int64", lambda x: _u8(x).long(), UserError, r"dtype torch\.int64.*127\.5"),
    ("nan", lambda x: x.clone().index_fill_(3, torch.tensor([0]), float("nan")), UserError, "NaN or infinite"),
    ("inf", lambda x: x.clone().index_fill_(2, torch.tensor([1]), float("inf")), UserError, "NaN or infinite"),
    ("one channel", lambda x: x[:, :1], UserError, r"1 channel.*expand"),
    ("channels-last", lambda x: x.permute(0, 2, 3, 1), UserError, r"channels-last.*permute\(0, 3, 1, 2\)"),
    ("numpy", lambda x: x.numpy(), WrongTypeError, r"numpy array.*torch\.from_numpy"),
    ("list", lambda x: x.tolist(), WrongTypeError, "is a list"),
    ("empty batch", lambda x: x[:0], UserError, "empty batch"),
    ("no batch axis", lambda x: x[0, 0], UserError, r"add a batch axis"),
    ("other device", lambda x: x.to("meta"), UserError, r"on meta but the model is on cpu.*\.to\(model\.device\)"),
    ("not a patch multiple", lambda x: x[..., :30], UserError, "multiple of the patch size"),
]


@pytest.mark.parametrize("case,spoil,err,match", IMAGE_ERRORS, ids=[c[0] for c in IMAGE_ERRORS])
@pytest.mark.parametrize("entry", ["module", "wrapper", "run_with_cache"])
def test_bad_images_raise_one_clear_error(model, views, case, spoil, err, match, entry):
    if entry == "module" and case == "no batch axis":
        pytest.skip("covered by the wrapper (it adds the batch axis to [3, H, W] views)")
    bad = spoil(views[0])
    call = {"module": lambda: model.module(bad, views[1]), "wrapper": lambda: model(bad, views[1]),
            "run_with_cache": lambda: model.run_with_cache(bad, views[1], names_filter="hook_enc_out")}[entry]
    with pytest.raises(err, match=match):
        call()


@pytest.mark.parametrize("scale,shift,match", [(127.5, 1, "0-255 pixels"), (1.5, 0, r"normalise to \[-1, 1\]"),
                                               (0.5, 1, r"looks like \[0, 1\] pixels.*x \* 2 - 1")])
def test_images_outside_minus_one_one_warn(model, views, scale, shift, match):
    x = (views[0] + shift) * scale
    with pytest.warns(ImageRangeWarning, match=match):
        out = model.module(x, views[1])
    assert torch.isfinite(out[0]["pts3d"]).all()  # legal: it still runs


def test_normalised_images_run_without_a_warning(model, views):
    with warnings.catch_warnings():
        warnings.simplefilter("error", ImageRangeWarning)
        model.module(*views)


@pytest.mark.parametrize("n", [1, 3])
def test_wrong_number_of_views(model, views, n):
    args = (views[0],) * n
    for call in (lambda: model.module(*args), lambda: model(*args)):
        with pytest.raises(UserError, match=f"takes 2 views.*got {n}"):
            call()


def test_batch_of_zero_inside_a_trace(model, views):
    with pytest.raises(UserError, match="empty batch"):
        with model.trace(views[0][:0], views[1][:0]):
            model.dec_blocks[0].hook_resid_post.output.save()


@pytest.mark.parametrize("kwargs,match", [
    (dict(size=0), r"size=0 must be an integer of at least one patch"),
    (dict(size=-224), r"size=-224"),
    (dict(size=224, patch=0), r"patch=0"),
])
def test_load_images_arguments(tmp_path, kwargs, match):
    from PIL import Image

    path = tmp_path / "a.png"
    Image.new("RGB", (64, 48)).save(path)
    with pytest.raises(UserError, match=match):
        load_images([path], **kwargs)
    with pytest.raises(WrongTypeError, match=r"single path .*pass \[path\]"):
        load_images(str(path))


# --------------------------------------------------------------------------------------
# checkpoints, configs, devices
# --------------------------------------------------------------------------------------

def _copy_dir(model_dir, tmp_path, edit=None, weights=None):
    d = tmp_path / "m"
    shutil.copytree(model_dir, d)
    if edit:
        cfg = json.loads((d / "config.json").read_text())
        cfg.update(edit)
        (d / "config.json").write_text(json.dumps(cfg))
    if weights is not None:
        (d / "model.safetensors").write_bytes(weights(d / "model.safetensors"))
    return d


CONFIG_ERRORS = [
    ({"enc_depth": "six"}, r"DUSt3RConfig\.enc_depth must be a positive integer, got 'six'"),
    ({"enc_depth": 0}, r"enc_depth must be a positive integer, got 0"),
    ({"mlp_ratio": -1}, r"mlp_ratio must be a positive number, got -1"),
    ({"mlp_ratio": "four"}, r"mlp_ratio must be a positive number, got 'four'"),
    ({"pos_embed": "RoPE-banana"}, r"pos_embed='RoPE-banana' is not supported.*RoPE100"),
    ({"img_size": [32, "48"]}, r"img_size must be a positive integer or a pair"),
    ({"landscape_only": "yes"}, r"landscape_only must be true or false"),
    ({"conf_mode": ["exp", 5, 1]}, r"conf_mode=.* must be \(mode, vmin, vmax\)"),
    ({"head_type": 3}, r"head_type must be a string"),
    ({"enc_dpeth": 2}, r"(unknown field\(s\)|keyword\(s\)) \['enc_dpeth'\].*Did you mean 'enc_depth'"),
]


@pytest.mark.parametrize("edit,match", CONFIG_ERRORS, ids=[next(iter(e)) + "=" + repr(next(iter(e.values())))
                                                          for e, _ in CONFIG_ERRORS])
def test_config_json_fields_are_checked_at_construction(model_dir, tmp_path, edit, match):
    d = _copy_dir(model_dir, tmp_path, edit=edit)
    with pytest.raises(ConfigError, match=match):
        mv_interp.load_model(d)
    with pytest.raises(ConfigError, match=match):  # the same check when the config is built directly
        DUSt3RConfig.from_dict({**TINY, **edit})


def _nan_weights(path):
    from safetensors.torch import load_file, save

    sd = load_file(str(path))
    sd["dec_blocks.1.mlp.fc1.weight"][0, 0] = float("nan")
    return save(sd)


CHECKPOINT_ERRORS = [
    # (case, how model.safetensors is spoilt, message part)
    ("truncated", lambda p: p.read_bytes()[:1000], r"model\.safetensors: not a valid safetensors file.*truncated"),
    ("random bytes", lambda p: os.urandom(4000), r"model\.safetensors: not a valid safetensors file"),
    ("a pickle", lambda p: pickle.dumps({"a": 1}), r"model\.safetensors: not a valid safetensors file"),
    ("NaN weight", _nan_weights, r"1 weight tensor\(s\) hold NaN or inf \(dec_blocks\.1\.mlp\.fc1\.weight\)"),
]


@pytest.mark.parametrize("case,spoil,match", CHECKPOINT_ERRORS, ids=[c[0] for c in CHECKPOINT_ERRORS])
def test_damaged_weights_name_the_file_or_tensor(model_dir, tmp_path, case, spoil, match):
    d = _copy_dir(model_dir, tmp_path, weights=spoil)
    with pytest.raises(CheckpointError, match=match):
        mv_interp.load_model(d)


def _legacy_pickle(path):
    with open(path, "wb") as f:
        pickle.dump({"model": {"w": np.zeros(3)}}, f)


def _random_bytes(path):
    path.write_bytes(np.random.default_rng(0).bytes(5000))


def _truncated_zip(path):
    torch.save({"w": torch.zeros(1000)}, path)
    path.write_bytes(path.read_bytes()[:600])


@pytest.mark.parametrize("write,match", [
    (_random_bytes, r"(cannot read|refusing) .*junk\.pth: (not a PyTorch checkpoint|the weights-only unpickler)"),
    (_truncated_zip, r"cannot read .*junk\.pth: a truncated or damaged zip checkpoint"),
    (_legacy_pickle, r"refusing .*junk\.pth: (it pickles objects beyond tensors|the weights-only unpickler rejects)"),
])
def test_unreadable_pth_files_are_refused_without_unsafe_advice(tmp_path, write, match):
    path = tmp_path / "junk.pth"
    write(path)
    with pytest.raises(CheckpointError, match=match) as info:
        mv_interp.load_model(path, config="224_linear")
    assert "weights_only=False" not in str(info.value) and "weights_only` set to `False" not in str(info.value)


@pytest.mark.parametrize("device,match", [
    ("foo", r"device='foo' is not a torch device"),
    ("cuda:99", r"device='cuda:99'"),
    pytest.param("cuda", r"no CUDA GPU is available here.*device='cpu'",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")),
])
def test_devices(model_dir, device, match):
    with pytest.raises(UserError, match=match):
        mv_interp.load_model(model_dir, device=device)


def test_family_of_a_model_directory_is_checked(model_dir):
    with pytest.raises(UnknownNameError, match=r"no adapter \(model family\) named 'foo'"):
        mv_interp.load_model(model_dir, family="foo")
    with pytest.raises(CheckpointError, match=r"family='fast3r' contradicts the config\.json.*'dust3r'"):
        mv_interp.load_model(model_dir, family="fast3r")
    assert mv_interp.load_model(model_dir, family="dust3r").module.family == "dust3r"


# --------------------------------------------------------------------------------------
# hooks
# --------------------------------------------------------------------------------------

HOOK = "dec_blocks2.1.hook_resid_mid"


def broadcastable(x, hook):
    return torch.zeros(1, 1, x.shape[-1])


def half(x, hook):
    return x.half()


def not_a_tensor(x, hook):
    return x.tolist()


@pytest.mark.parametrize("fn,err,match", [
    (broadcastable, UserError, rf"hook broadcastable on {HOOK} returned a tensor \[1, 1, 32\].*hooked value is \[1, 6, 32\]"),
    (half, UserError, r"hook half on .* torch\.float16 .* torch\.float32"),
    (not_a_tensor, WrongTypeError, r"hook not_a_tensor on .* returned a list"),
])
def test_hook_returns_must_match_the_hooked_value(model, views, fn, err, match):
    with pytest.raises(err, match=match):
        model.run_with_hooks(*views, fwd_hooks=[(HOOK, fn)])
    assert not model.hook_dict[HOOK]._forward_hooks  # removed after the error


def test_hook_returning_an_edited_value_of_the_same_shape_still_works(model, views):
    clean = model(*views)[1]["pts3d"]
    out = model.run_with_hooks(*views, fwd_hooks=[(HOOK, lambda x, hook: x * 0)])[1]["pts3d"]
    assert not torch.allclose(clean, out)


@pytest.mark.parametrize("fwd_hooks,match", [
    ((HOOK, broadcastable), r"single \(name, fn\) pair; wrap it in a list"),
    ({HOOK: broadcastable}, r"must be a list of \(names, fn\) pairs.*got a dict"),
    ([HOOK], r"fwd_hooks\[0\] is 'dec_blocks2\.1\.hook_resid_mid'; each entry must be a \(names, fn\) pair"),
    ([(HOOK, "fn")], r"fwd_hooks\[0\]"),
    (42, r"got a int"),
])
def test_fwd_hooks_must_be_pairs(model, views, fwd_hooks, match):
    with pytest.raises(WrongTypeError, match=match):
        model.run_with_hooks(*views, fwd_hooks=fwd_hooks)


@pytest.mark.parametrize("names_filter,err,match", [
    (42, WrongTypeError, r"names_filter must be None.*got 42 \(int\)"),
    ([HOOK, 3], WrongTypeError, r"names_filter must be"),
    ([HOOK, "dec_blocks2.1.hook_resid_mdi"], UnknownNameError,
     r"entry 'dec_blocks2\.1\.hook_resid_mdi'.*Did you mean 'dec_blocks2\.1\.hook_resid_mid'"),
    (["dec_blocks9.*.hook_resid_post"], UnknownNameError, r"entry 'dec_blocks9\.\*\.hook_resid_post'"),
    ("dec_blocks2.1.hook_resid_mdi", UnknownNameError, r"Did you mean 'dec_blocks2\.1\.hook_resid_mid'"),
])
def test_names_filter_entries_must_match_a_hook(model, views, names_filter, err, match):
    with pytest.raises(err, match=match):
        model.run_with_cache(*views, names_filter=names_filter)


def test_names_filter_lists_and_globs_that_match(model, views):
    _, cache = model.run_with_cache(*views, names_filter=[HOOK, "dec_blocks.*.hook_resid_post"])
    assert sorted(cache) == ["dec_blocks.0.hook_resid_post", "dec_blocks.1.hook_resid_post", HOOK]


def test_nnsight_block_index_out_of_range(model, views):
    with pytest.raises(OutOfRangeError, match=r"dec_blocks\[9\] is out of range: dec_blocks has 2 blocks \(valid: 0\.\.1"):
        with model.trace(*views):
            model.dec_blocks[9].hook_resid_post.output.save()
    with model.trace(*views):
        last = model.dec_blocks[-1].hook_resid_post.output.save()
    assert last.shape == (1, 6, 32)


# --------------------------------------------------------------------------------------
# capture data
# --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def scene():
    return render_views(1, SceneConfig(image_size=(48, 64)), seed=3)


@pytest.fixture()
def capture(tmp_path, scene):
    write_capture(scene, tmp_path / "cap")
    return tmp_path / "cap"


STEM = "scene_000000/view2"


def _edit_index(capture, fn):
    path = capture / "index.json"
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


def _scale_intrinsics(factor):
    def edit(capture):
        path = capture / f"{STEM}.json"
        cam = json.loads(path.read_text())
        K = np.asarray(cam["intrinsics"])
        K[:2] *= factor  # the K of an image `factor` times the size
        K[:2, 2] += (factor - 1) / 2  # pixel-centre convention
        cam["intrinsics"] = K.tolist()
        path.write_text(json.dumps(cam))
    return edit


def _all_nan_depth(capture):
    np.save(capture / f"{STEM}.depth.npy", np.full((48, 64), np.nan, np.float32))
    (capture / f"{STEM}.mask.png").unlink(missing_ok=True)


def _empty_mask(capture):
    from PIL import Image

    Image.fromarray(np.zeros((48, 64), np.uint8)).save(capture / f"{STEM}.mask.png")


def _escape(capture):
    other = capture.parent / "other"
    shutil.copytree(capture / "scene_000000", other)
    _edit_index(capture, lambda d: d["tuples"][0].__setitem__(1, "../other/view2"))


CAPTURE_ERRORS = [
    ("all-NaN depth, no mask", _all_nan_depth, r"view2\.depth\.npy: the view has no valid pixel"),
    ("empty mask", _empty_mask, r"no valid pixel .*mask view2\.mask\.png"),
    ("intrinsics for 2x", _scale_intrinsics(2.0), r"view2\.json: principal point .*another resolution"),
    ("intrinsics for 0.5x", _scale_intrinsics(0.5), r"view2\.json: principal point .*another resolution"),
    ("stem escaping the root", _escape, r"view stem '\.\./other/view2' must be a relative path inside"),
    ("absolute stem", lambda c: _edit_index(c, lambda d: d["tuples"][0].__setitem__(1, str(c / STEM))),
     r"must be a relative path inside the capture root"),
    ("unknown version", lambda c: _edit_index(c, lambda d: d.__setitem__("version", 7)),
     r"index version 7 is not supported \(this mv_interp reads version 1\)"),
    ("foreign format", lambda c: _edit_index(c, lambda d: d.__setitem__("format", "colmap")),
     r"\"format\" is 'colmap'"),
]


@pytest.mark.parametrize("case,spoil,match", CAPTURE_ERRORS, ids=[c[0] for c in CAPTURE_ERRORS])
def test_capture_data_checks(capture, case, spoil, match):
    check_capture(capture)  # clean before
    spoil(capture)
    with pytest.raises(CaptureError, match=match):
        check_capture(capture)
    if "stem" not in case and "version" not in case and "format" not in case:
        with pytest.raises(CaptureError, match=match):
            load_tuple(capture, ["scene_000000/view1", STEM], size=64)


def test_stem_through_a_symlink_out_of_the_root(capture):
    (capture / "link").symlink_to(capture.parent)
    shutil.copytree(capture / "scene_000000", capture.parent / "outside")
    _edit_index(capture, lambda d: d["tuples"][0].__setitem__(1, "link/outside/view2"))
    with pytest.raises(CaptureError, match="leads outside the capture root"):
        check_capture(capture)


def test_data_check_cli_flags_a_view_without_valid_pixels(capture, capsys):
    _all_nan_depth(capture)
    assert cli.main(["data", "check", str(capture)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no valid pixel" in err[0]


# --------------------------------------------------------------------------------------
# the command line's error policy
# --------------------------------------------------------------------------------------

def _parser_raising(exc):
    def build():
        p = argparse.ArgumentParser(prog="mv-interp")
        sub = p.add_subparsers(dest="command")
        c = sub.add_parser("boom")
        c.add_argument("--out", default=None)

        def run(args):
            raise exc

        c.set_defaults(func=run)
        return p

    return build


@pytest.mark.parametrize("exc,line", [
    (UserError("enc_depth must be a positive integer"), "error: enc_depth must be a positive integer"),
    (UnknownNameError("no hook 'x'"), "error: no hook 'x'"),  # a KeyError subclass, printed unquoted
    (OutOfRangeError("layer 9 out of range"), "error: layer 9 out of range"),
    (OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/data/out/checkpoint.pt"),
     "error: /data/out/checkpoint.pt: No space left on device (ENOSPC); free some space"),
    (OSError(errno.EROFS, os.strerror(errno.EROFS), "/ro/out"), "/ro/out: Read-only file system (EROFS)"),
    (FileNotFoundError("image file not found: a.png"), "error: image file not found: a.png"),
])
def test_user_and_os_errors_print_one_line(monkeypatch, capsys, exc, line):
    monkeypatch.setattr(cli, "build_parser", _parser_raising(exc))
    assert cli.main(["boom"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mv-interp boom: error:") and line in err[0], err


@pytest.mark.parametrize("exc", [KeyError("dec_blocks"), TypeError("unsupported operand"), IndexError("list index"),
                                 RuntimeError("shape mismatch")])
def test_library_bugs_keep_their_traceback(monkeypatch, exc):
    monkeypatch.setattr(cli, "build_parser", _parser_raising(exc))
    with pytest.raises(type(exc)):
        cli.main(["boom"])


def test_value_error_from_a_library_keeps_its_traceback(monkeypatch):
    def from_numpy():
        np.zeros(3).reshape(2)  # ValueError raised inside numpy: a bug in the caller, not bad input

    monkeypatch.setattr(cli, "build_parser", _parser_raising(None))
    p = cli.build_parser()
    p._subparsers._group_actions[0].choices["boom"].set_defaults(func=lambda a: from_numpy())
    monkeypatch.setattr(cli, "build_parser", lambda: p)
    with pytest.raises(ValueError, match="reshape"):
        cli.main(["boom"])


def test_intervene_cli_no_longer_hides_type_errors(monkeypatch, tmp_path):
    from mv_interp.interventions import specs

    def buggy(path):
        raise TypeError("a bug")

    monkeypatch.setattr(specs, "load_spec", buggy)
    with pytest.raises(TypeError, match="a bug"):
        cli.main(["intervene", str(tmp_path / "s.json"), "--pair", "a.png", "b.png", "--out", str(tmp_path / "o")])


def test_out_is_probed_before_any_work(monkeypatch, capsys, tmp_path):
    a_file = tmp_path / "taken"
    a_file.write_text("x")
    assert cli.main(["report", "--fast", "--out", str(a_file), "--model", "no-such-model"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{a_file}: --out names an existing file, not a folder (ENOTDIR)" in err[0]

    import mv_interp.errors as errors_mod

    def read_only(path, mode="r", *a, **k):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

    monkeypatch.setattr(errors_mod, "open", read_only, raising=False)
    for argv in (["report", "--fast"], ["probes", "train"], ["heads", "classify"], ["train"]):
        out = tmp_path / ("ro_" + argv[0])
        code = cli.main([*argv, "--out", str(out), "--model", "no-such-model"] if argv[0] != "train"
                        else ["train", "--out", str(out)])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 1 and "Read-only file system (EROFS)" in err[-1], (argv, err)


def test_hooks_cli_family_on_a_model_directory(model_dir, capsys):
    assert cli.main(["hooks", "--model", str(model_dir), "--family", "foo"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no adapter (model family) named 'foo'" in err[0]

"""Hub ids: ``load_model("org/name")`` / ``MVModel.from_pretrained`` for every family from a local hub
cache built in the hub's layout (``HF_HUB_OFFLINE=1``: nothing is downloaded), the errors when a repo
is not cached, and ``push_to_hub`` (a mocked ``HfApi``) writing what ``from_pretrained`` reads back."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mv_interp
from mv_interp import hub
from mv_interp.loading import resolve_config
from mv_interp.model import MVModel

from fixture_utils import FIXTURES, fixture
from hub_cache import add_repo, safetensors_bytes, upstream_config_json


@pytest.fixture()
def offline_cache(tmp_path, monkeypatch):
    """An empty hub cache under ``HF_HOME``, offline; any attempt to reach a hub fails at once."""
    home = tmp_path / "hf"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    return home / "hub"


def _same_weights(a, b) -> None:
    sa, sb = a.module.state_dict(), b.module.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0, msg=k)


def _upstream_repo(name: str, tmp_path: Path) -> tuple[dict, dict, dict]:
    """(files of an upstream-layout repo, the config's kwargs, the state dict) for fixture ``name``:
    DUSt3R's official checkpoint's own keys and constructor kwargs; MASt3R and Fast3R the fixtures'
    constructor kwargs with seeded random weights (their formula weights take seconds to compute)."""
    if name == "dust3r":
        ckpt = torch.load(FIXTURES / "dust3r" / "dust3r_tiny_linear.pth", weights_only=False)
        _, kwargs = mv_interp.parse_constructor(ckpt["args"].model)
        kwargs = {k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()}
        sd = ckpt["model"]
    else:
        meta, _ = fixture(f"{name}/{name}_tiny")
        kwargs = meta["config"]
        adapter, cfg = resolve_config(kwargs, None)
        torch.manual_seed(0)
        sd = adapter.build(cfg).state_dict()
    extra = {"freeze": "none"} if name != "fast3r" else {}  # upstream DUSt3R/MASt3R mixins store it
    files = {"config.json": upstream_config_json(kwargs, **extra), "model.safetensors": safetensors_bytes(sd, tmp_path),
             "README.md": b"# tiny\n"}
    return files, kwargs, sd


@pytest.mark.parametrize("family", ["dust3r", "mast3r", "fast3r"])
def test_mixin_layout_repo_of_every_family_loads_offline(family, offline_cache, tmp_path):
    """The upstream repos' layout (PyTorchModelHubMixin): config.json of constructor kwargs + model.safetensors;
    the family is recognised from the config alone."""
    files, kwargs, sd = _upstream_repo(family, tmp_path)
    repo = f"upstream/{family}-tiny"
    add_repo(offline_cache, repo, files)
    model = MVModel.from_pretrained(repo)
    assert model.module.family == family
    expected = mv_interp.load_model(sd, config=kwargs).module.state_dict() if family == "dust3r" else sd
    got = model.module.state_dict()
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in got)


def test_vggt_repo_loads_offline(offline_cache, tmp_path):
    """VGGT through the same path: a repository as ``push_to_hub`` writes it (config.json with
    ``mv_interp_family`` + model.safetensors; the upstream VGGT-1B config describes a 1B model only)."""
    from mv_interp.adapters.vggt import HookedVGGT, VGGTConfig

    torch.manual_seed(0)
    tiny = mv_interp.MVModel(HookedVGGT(VGGTConfig(
        img_size=28, embed_dim=32, depth=2, num_heads=2, dino_depth=1, dino_num_heads=2, camera_trunk_depth=1,
        camera_num_heads=4, camera_num_iterations=2, dpt_features=16, dpt_out_channels=(8, 8, 16, 16),
        dpt_layers=(0, 1, 1, 1))).eval())
    tiny.save_pretrained(tmp_path / "saved")
    add_repo(offline_cache, "facebook/vggt-tiny", {p.name: p for p in (tmp_path / "saved").iterdir()})
    model = MVModel.from_pretrained("facebook/vggt-tiny")
    assert model.module.family == "vggt"
    _same_weights(model, tiny)


def test_pth_repo_and_revisions(offline_cache):
    """An official .pth checkpoint repo; ``@rev`` / ``revision=`` pick a cached branch."""
    pth = FIXTURES / "dust3r" / "dust3r_tiny_linear.pth"
    add_repo(offline_cache, "naver/tiny-linear", {"tiny_linear.pth": pth, "README.md": b"x"})
    add_repo(offline_cache, "naver/tiny-linear", {"tiny_linear.pth": pth}, revision="v2")
    direct = mv_interp.load_model(pth)
    _same_weights(mv_interp.load_model("naver/tiny-linear"), direct)
    _same_weights(mv_interp.load_model("naver/tiny-linear@v2"), direct)
    _same_weights(MVModel.from_pretrained("naver/tiny-linear", revision="v2"), direct)
    with pytest.raises(FileNotFoundError, match="revision 'v3'.*not in the local hub cache"):
        mv_interp.load_model("naver/tiny-linear", revision="v3")


def test_not_cached_offline_is_one_clear_error(offline_cache):
    with pytest.raises(hub.HubError) as e:
        mv_interp.load_model("nobody/not-cached")
    msg = str(e.value)
    assert "nobody/not-cached is not in the local hub cache" in msg and str(offline_cache) in msg
    assert "HF_HUB_OFFLINE" in msg and "hf download nobody/not-cached" in msg
    # the CLI prints it as one line (a FileNotFoundError)
    from mv_interp.cli import main

    assert main(["hooks", "--model", "nobody/not-cached"]) == 1


def test_repo_file_choice_and_bare_state_dicts(offline_cache, tmp_path, tiny_model, tiny_config):
    sd = safetensors_bytes(tiny_model.module.state_dict(), tmp_path)
    add_repo(offline_cache, "me/bare", {"weights.safetensors": sd})
    with pytest.raises(ValueError, match="bare state dict weights.safetensors without config.json: pass config="):
        mv_interp.load_model("me/bare")
    _same_weights(mv_interp.load_model("me/bare", config=tiny_config.to_dict()), tiny_model)
    # a config.json beside a differently named weights file is used for it
    cfg = json.dumps({"mv_interp_family": "dust3r", **tiny_config.to_dict()}).encode()
    add_repo(offline_cache, "me/sidecar", {"config.json": cfg, "weights.safetensors": sd})
    _same_weights(mv_interp.load_model("me/sidecar"), tiny_model)
    add_repo(offline_cache, "me/two", {"a.pth": FIXTURES / "dust3r" / "dust3r_tiny_linear.pth",
                                       "b.pth": FIXTURES / "dust3r" / "dust3r_tiny_linear.pth"})
    with pytest.raises(FileNotFoundError, match=r"several weight files \['a.pth', 'b.pth'\].*pass filename="):
        mv_interp.load_model("me/two")
    assert mv_interp.load_model("me/two", filename="b.pth").module.family == "dust3r"
    # a missing local path that looks like a file stays a missing file, never a hub lookup
    with pytest.raises(FileNotFoundError, match="no checkpoint at 'runs/model.pth'"):
        mv_interp.load_model("runs/model.pth")
    assert hub.parse_repo_id("org/name@v1.0") == ("org/name", "v1.0")
    assert hub.parse_repo_id("a/b/c") is None and hub.parse_repo_id("./x") is None


class FakeApi:
    """Records what push_to_hub sends; ``upload_folder`` keeps a copy of the folder it is given."""

    calls: list = []

    def __init__(self, token=None):
        self.token = token

    def create_repo(self, repo_id, **kw):
        FakeApi.calls.append(("create_repo", repo_id, kw))

    def upload_folder(self, *, repo_id, folder_path, **kw):
        files = {p.name: p.read_bytes() for p in Path(folder_path).iterdir()}
        FakeApi.calls.append(("upload_folder", repo_id, kw, files))
        return "commit-info"

    def list_repo_files(self, *a, **k):
        raise AssertionError("no network in tests")


def test_push_to_hub_then_from_pretrained(offline_cache, monkeypatch, tiny_model):
    import huggingface_hub

    FakeApi.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    assert tiny_model.push_to_hub("me/tiny", private=True, commit_message="first") == "commit-info"
    (_, repo, create), (_, repo2, upload, files) = FakeApi.calls
    assert repo == repo2 == "me/tiny" and create["private"] is True and create["exist_ok"] is True
    assert upload["commit_message"] == "first"
    assert set(files) == {"config.json", "model.safetensors", "README.md"}
    assert json.loads(files["config.json"])["mv_interp_family"] == "dust3r"
    assert 'load_model("me/tiny")' in files["README.md"].decode()
    # symmetric: the pushed files, as the hub would serve them, load back to the same model
    add_repo(offline_cache, "me/tiny", files)
    _same_weights(MVModel.from_pretrained("me/tiny"), tiny_model)
    with pytest.raises(ValueError, match="not a repository id"):
        tiny_model.push_to_hub("me/tiny@branch")


def test_cli_model_by_hub_id_in_a_fresh_process(tmp_path):
    """HF_HOME and HF_HUB_OFFLINE set before anything is imported, as a user's shell would."""
    home = tmp_path / "hf"
    add_repo(home / "hub", "naver/tiny-linear", {"tiny_linear.pth": FIXTURES / "dust3r" / "dust3r_tiny_linear.pth"})
    env = {**os.environ, "HF_HOME": str(home), "HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9",
           "PYTHONPATH": str(Path(mv_interp.__file__).parents[1])}
    env.pop("HF_HUB_CACHE", None)
    r = subprocess.run([sys.executable, "-m", "mv_interp", "hooks", "--model", "naver/tiny-linear",
                        "--filter", "dec_blocks2.2.cross_attn.hook_pattern"],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "dec_blocks2.2.cross_attn.hook_pattern" in r.stdout and "hook points of HookedDUSt3R" in r.stdout

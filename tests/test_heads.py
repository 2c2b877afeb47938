"""Head scores and labels with known answers: planted patterns through the scoring core and
through TL hooks on real models, streaming, layouts, files and figures."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import pytest
import torch
from einops import rearrange
from torch import nn

from mv_interp.adapters.base import AttentionSite, ModelConfig, MultiViewModel, ProbeSite
from mv_interp.heads import (
    Correspondence,
    HeadRef,
    HeadScores,
    HeadThresholds,
    ScoreConfig,
    block_statistics,
    correspondence_targets,
    plot_attention_overlays,
    plot_heatmaps,
    score_heads,
)
from mv_interp.heads.targets import centre_distance, grid_distance
from mv_interp.hooks import HookPoint
from mv_interp.metrics import correspondence_recall

GRID = (3, 4)  # the tiny fixture model's 48×64 input
N = 12
P = 16
THR = (0.0, 16.0, 32.0)


def _match(batch: int) -> torch.Tensor:
    """A hand-made correspondence: query q of view b matches key (5q + 3) mod 12 of view a,
    queries 2 and 9 have none."""
    m = (torch.arange(N) * 5 + 3) % N
    m[[2, 9]] = -1
    return m.expand(batch, -1).clone()


def _onehot_pattern(match: torch.Tensor, heads: int) -> torch.Tensor:
    B = match.shape[0]
    pat = torch.full((B, heads, N, N), 1 / N)
    rows = match >= 0
    one = torch.nn.functional.one_hot(match.clamp_min(0), N).float()
    return torch.where(rows[:, None, :, None], one[:, None], pat)


def _stats(pattern, corr=None, **kw):
    kw.setdefault("register_k", 3)
    return block_statistics(pattern, GRID, P, THR, correspondence=corr, **kw).sums


def _chance_brute(match: torch.Tensor, t: float) -> float:
    """Expected recall of a uniformly random key, by loops."""
    h, w = GRID
    cen = [((k % w) * P + 7.5, (k // w) * P + 7.5) for k in range(N)]
    vals = []
    for g in match.flatten().tolist():
        if g < 0:
            continue
        vals.append(sum(math.dist(cen[k], cen[g]) <= t for k in range(N)) / N)
    return sum(vals) / len(vals)


# --------------------------------------------------------------------------------------
# The scoring core on hand-made patterns
# --------------------------------------------------------------------------------------


def test_planted_correspondence_head_has_recall_one_and_uniform_head_scores_chance():
    match = _match(2)
    corr = Correspondence.from_match(match, N)
    pat = _onehot_pattern(match, 2)
    pat[:, 1] = 1 / N  # head 1: uniform
    s = _stats(pat, corr)
    n = s["corr_rows"]
    assert n == 2 * 10
    recall = s["corr_hits"] / n
    assert torch.allclose(recall[0], torch.ones(3))
    chance = s["corr_chance"] / n
    for i, t in enumerate(THR):
        assert chance[i].item() == pytest.approx(_chance_brute(match, t), abs=1e-6)
    assert torch.allclose(recall[1], chance, atol=1e-6)  # uniform = chance, not "whatever key 0 gives"
    mul = s["corr_mul_num"] / s["corr_mul_den"]
    assert mul[0].item() == pytest.approx(1.0) and mul[1].item() == pytest.approx(float(s["corr_mul_chance"] / n))
    absv = s["corr_abs"] / n
    assert absv[0].item() == pytest.approx(1.0)
    assert absv[1].item() == pytest.approx(float(s["corr_abs_chance"] / n)) and absv[1].item() < 0


def test_recall_matches_metrics_correspondence_recall_on_tie_free_patterns():
    g = torch.Generator().manual_seed(0)
    pat = torch.rand(3, 4, N, N, generator=g).softmax(-1)
    match = _match(3)
    s = _stats(pat, Correspondence.from_match(match, N))
    for h in range(4):
        ref = correspondence_recall(pat[:, h].argmax(-1), match, GRID, P, THR).recall
        assert torch.allclose(s["corr_hits"][h] / s["corr_rows"], ref, atol=1e-6)


def test_same_position_baseline_and_soft_overlap_abs():
    # a soft target: each query spreads 0.75 / 0.25 over two keys; the majority is the match
    match = _match(1)
    second = (match + 1) % N
    overlap = 0.75 * torch.nn.functional.one_hot(match.clamp_min(0), N).float() \
        + 0.25 * torch.nn.functional.one_hot(second.clamp_min(0), N).float()
    overlap = overlap * (match >= 0)[..., None]
    corr = Correspondence(match, overlap)
    pat = torch.where((match >= 0)[:, None, :, None], overlap[:, None], torch.full((1, 1, N, N), 1 / N))
    s = _stats(pat, corr)
    assert (s["corr_abs"] / s["corr_rows"]).item() == pytest.approx(1.0)  # attention = overlap distribution
    assert (s["corr_hits"] / s["corr_rows"])[0, 0].item() == 1.0          # its argmax is the match
    assert (s["corr_mul_num"] / s["corr_mul_den"]).item() == pytest.approx(1.0)
    # same-grid-position baseline: exact-patch hits are queries whose match is themselves
    ident = Correspondence.from_match(torch.arange(N)[None], N)
    s2 = _stats(pat, ident)
    assert (s2["corr_same_pos"] / s2["corr_rows"]).tolist() == [1.0, 1.0, 1.0]
    expected0 = sum(int(m) == q for q, m in enumerate(match[0].tolist()) if m >= 0) / 10
    assert (s["corr_same_pos"][0] / s["corr_rows"]).item() == pytest.approx(expected0)


def test_register_head_fixed_key_and_local_head_own_position():
    pat = torch.full((2, 3, N, N), 1 / N)
    pat[:, 0] = 0
    pat[:, 0, :, 7] = 1.0  # head 0: every query attends to key 7
    pat[:, 1] = torch.eye(N)  # head 1: own position
    s = _stats(pat, register_k=1)
    reg = s["register_mass"] / s["samples"]
    reg_chance = s["register_chance"] / s["samples"]
    assert reg[0].item() == 1.0 and reg_chance.item() == pytest.approx(1 / N)
    assert reg[1].item() == pytest.approx(1 / N) and reg[2].item() == pytest.approx(1 / N)
    assert s["register_counts"][0].argmax().item() == 7 and s["register_counts"][0, 7].item() == 2
    local = s["local_mass"] / s["rows"]
    local_chance = s["local_chance"] / s["rows"]
    window = (grid_distance(*GRID) <= 1).float().sum(-1).mean() / N
    assert local_chance.item() == pytest.approx(window.item())
    assert local[1].item() == pytest.approx(1.0) and local[2].item() == pytest.approx(window.item())
    diag = s["diag_mass"] / s["rows"]
    assert diag[1].item() == pytest.approx(1.0) and diag[0].item() == pytest.approx(1 / N)


def test_block_of_a_global_pattern_is_normalised_within_the_block():
    pat = 0.25 * torch.eye(N).expand(1, 2, N, N)  # a quarter of each row's mass is in this block
    s = _stats(pat)
    assert torch.allclose(s["block_mass"] / s["rows"], torch.full((2,), 0.25))
    assert torch.allclose(s["diag_mass"] / s["rows"], torch.ones(2))


def test_block_sums_add_over_batches():
    g = torch.Generator().manual_seed(1)
    pat = torch.rand(4, 2, N, N, generator=g).softmax(-1)
    corr = Correspondence.from_match(_match(4), N)
    whole = _stats(pat, corr)
    a = _stats(pat[:2], Correspondence(corr.match[:2], corr.overlap[:2]))
    b = _stats(pat[2:], Correspondence(corr.match[2:], corr.overlap[2:]))
    assert whole.keys() == a.keys()
    for k in whole:
        assert torch.allclose(whole[k], a[k] + b[k], atol=1e-5), k


def test_block_statistics_rejects_extra_tokens():
    with pytest.raises(ValueError, match="patch tokens only"):
        block_statistics(torch.rand(1, 1, N + 1, N + 1), GRID, P, THR)


def test_grid_tables():
    d = centre_distance(*GRID, P)
    assert d[0, 1].item() == 16 and d[0, 4].item() == 16 and d[0, 5].item() == pytest.approx(16 * math.sqrt(2))
    assert grid_distance(*GRID)[0, 5].item() == 1 and grid_distance(*GRID)[0, 11].item() == 3


def test_config_validation():
    with pytest.raises(ValueError, match="kinds"):
        ScoreConfig(kinds=("corr",))
    with pytest.raises(ValueError, match="register_k"):
        ScoreConfig(register_k=0)
    with pytest.raises(ValueError, match="fraction"):
        HeadThresholds(correspondence_recall=1.5)
    assert ScoreConfig(thresholds_px=(32, 0, 16)).thresholds_px == (0.0, 16.0, 32.0)


# --------------------------------------------------------------------------------------
# Planted heads through TL hooks on the tiny DUSt3R fixture model
# --------------------------------------------------------------------------------------

CORR_SITE, SELF_SITE = "dec1.cross.v2", "dec1.self.v2"


def _hand_made(view_b, view_a, patch):
    return Correspondence.from_match(_match(view_b["img"].shape[0]).to(view_b["img"].device), N)


def _plant(cross_hook, self_hook):
    def plant_cross(pattern, hook):
        pattern = pattern.clone()
        pattern[:, 2] = _onehot_pattern(_match(pattern.shape[0]), 1)[:, 0]
        pattern[:, 3] = 1 / N
        return pattern

    def plant_self(pattern, hook):
        pattern = pattern.clone()
        pattern[:, 0] = 0
        pattern[:, 0, :, 7] = 1.0
        pattern[:, 1] = torch.eye(N)
        return pattern

    return [(cross_hook, plant_cross), (self_hook, plant_self)]


@pytest.fixture(scope="module")
def pairs():
    g = torch.Generator().manual_seed(3)
    return [{"img": torch.rand(4, 3, 48, 64, generator=g) * 2 - 1} for _ in range(2)]


def _plant_encoder(pattern, hook):
    # the encoder stacks views on the batch axis ([view-1 items; view-2 items]): plant a register
    # head (key 5) in head 3 of view 2's items only
    pattern = pattern.clone()
    half = pattern.shape[0] // 2
    pattern[half:, 3] = 0
    pattern[half:, 3, :, 5] = 1.0
    return pattern


def _all_plants():
    return _plant("dec_blocks2.1.cross_attn.hook_pattern", "dec_blocks2.1.attn.hook_pattern") + [
        ("enc_blocks.1.attn.hook_pattern", _plant_encoder)]


@pytest.fixture(scope="module")
def planted_scores(linear_model, pairs):
    with linear_model.hooks(_all_plants()):
        return score_heads(linear_model, pairs, batch_size=2, correspondence_fn=_hand_made)


def test_planted_heads_are_found_through_hooks(planted_scores):
    s = planted_scores
    rows = {(r["site"], r["head"]): r for r in s.table()}
    corr, uni = rows[(CORR_SITE, 2)], rows[(CORR_SITE, 3)]
    assert [corr[f"corr_recall@{t:g}px"] for t in THR] == [1.0, 1.0, 1.0]
    assert corr["labels"] == "correspondence"
    for t in THR:
        assert uni[f"corr_recall@{t:g}px"] == pytest.approx(uni[f"corr_chance@{t:g}px"], abs=1e-6)
        assert uni[f"corr_chance@{t:g}px"] == pytest.approx(_chance_brute(_match(1), t), abs=1e-6)
    assert uni["corr_mul"] == pytest.approx(uni["corr_mul_chance"]) and uni["labels"] == "other"
    assert uni["register_lift"] == pytest.approx(0.0, abs=1e-6)
    reg, loc = rows[(SELF_SITE, 0)], rows[(SELF_SITE, 1)]
    assert reg["labels"] == "register" and reg["register_mass"] == 1.0 and reg["register_tokens"][0] == 7
    assert reg["register_token_freq"][0] == 1.0
    assert loc["labels"] == "local" and loc["local_mass"] == pytest.approx(1.0) and loc["diag_mass"] == 1.0
    assert HeadRef(CORR_SITE, 2, 1, 2) in s.heads("correspondence")
    best = {b.site: b for b in s.best_per_layer()}[CORR_SITE]
    assert best.head == 2 and best.recall[16.0] == 1.0
    curve = s.curve()[("dec", "cross", 2, 1)]
    assert curve["layer"] == [0, 1, 2] and curve["head"][1] == 2 and curve["recall"][0.0][1] == 1.0
    assert curve["chance"][16.0][1] == pytest.approx(_chance_brute(_match(1), 16.0), abs=1e-6)
    regs = {r.ref: r for r in s.register_heads()}
    r = regs[HeadRef(SELF_SITE, 2, 2, 0)]
    assert r.tokens[0] == 7 and r.pattern_key_index[0] == 7 and r.pattern_hook == "dec_blocks2.1.attn.hook_pattern"


def test_stacked_encoder_blocks_are_split_by_view(planted_scores):
    regs = {r.ref: r for r in planted_scores.register_heads()}
    assert regs[HeadRef("enc1.self", 2, 2, 3)].tokens == (5,)
    assert regs[HeadRef("enc1.self", 2, 2, 3)].layout == "stacked"
    assert HeadRef("enc1.self", 1, 1, 3) not in regs
    # the encoder's first block has no residual site before it; block 1 reads enc_blocks.0's output
    assert math.isnan(regs[HeadRef("enc1.self", 2, 2, 3)].norm_ratio) is False
    assert planted_scores.unit("enc0.self", 1, 1).resid_hook is None
    assert planted_scores.unit("enc1.self", 2, 2).resid_hook == "enc_blocks.0.hook_resid_post"


def test_reclassify_with_other_thresholds(planted_scores):
    strict = planted_scores.classify(register_lift=1.01, local_lift=1.01)
    assert HeadRef(SELF_SITE, 2, 2, 0) not in strict.heads("register")
    assert HeadRef(SELF_SITE, 2, 2, 1) not in strict.heads("local")
    assert HeadRef(SELF_SITE, 2, 2, 0) in planted_scores.heads("register")  # the original is unchanged
    with pytest.raises(ValueError, match="was not scored"):
        planted_scores.classify(correspondence_px=8).best_per_layer()


def test_streaming_equals_one_big_batch(linear_model, pairs, planted_scores):
    with linear_model.hooks(_all_plants()):
        big = score_heads(linear_model, pairs, batch_size=4, correspondence_fn=_hand_made)
    assert big.n_pairs == planted_scores.n_pairs == 4
    for a, b in zip(big.table(), planted_scores.table()):
        assert a.keys() == b.keys()
        for k, v in a.items():
            if isinstance(v, float):
                assert (math.isnan(v) and math.isnan(b[k])) or v == pytest.approx(b[k], abs=1e-5), (a["site"], k)
            else:
                assert v == b[k], (a["site"], k)


def test_register_norm_ratio_reads_the_residual_entering_the_layer(linear_model, pairs):
    """Scale token 7 of the residual entering dec_blocks2[1] (= dec_blocks2.0.hook_resid_post)
    and plant a head on it: the norm ratio is ‖x_7‖ / median_n ‖x_n‖ of that residual."""
    resid = "dec_blocks2.0.hook_resid_post"

    def boost(x, hook):
        x = x.clone()
        x[:, 7] *= 10
        return x

    hooks = [(resid, boost)] + _plant("dec_blocks2.1.cross_attn.hook_pattern", "dec_blocks2.1.attn.hook_pattern")
    with linear_model.hooks(hooks):
        s = score_heads(linear_model, pairs, ("register",), batch_size=4, register_k=1, sites=[SELF_SITE])
        _, cache = linear_model.run_with_cache(pairs[0]["img"], pairs[1]["img"], names_filter=[resid])
    norms = cache[resid].norm(dim=-1)
    expected = (norms[:, 7] / norms.median(-1).values).mean().item()
    row = next(r for r in s.table() if r["site"] == SELF_SITE and r["head"] == 0)
    assert expected > 3
    assert row["register_norm_ratio"] == pytest.approx(expected, rel=1e-5)
    assert [u.resid_hook for u in s.units] == [resid]
    assert all(math.isnan(r["local_mass"]) and math.isnan(r["corr_mul"]) for r in s.table())  # kinds respected


def test_images_without_geometry_skip_correspondence(linear_model, pairs):
    with pytest.warns(UserWarning, match="no depth/cameras"):
        s = score_heads(linear_model, (pairs[0]["img"][:1], pairs[1]["img"][:1]), sites=["dec0.*"])
    assert s.n_pairs == 1 and s.n_pairs_with_geometry == 0 and s.best_per_layer() == []
    assert {r["site"] for r in s.table()} == {"dec0.self.v1", "dec0.self.v2", "dec0.cross.v1", "dec0.cross.v2"}


def test_bad_data_errors(linear_model, pairs):
    with pytest.raises(ValueError, match="not a multiple"):
        score_heads(linear_model, [{"img": torch.zeros(1, 3, 40, 64)}] * 2)
    with pytest.raises(ValueError, match="one view dict"):
        score_heads(linear_model, pairs[0])
    with pytest.raises(ValueError, match="matches sites"):
        score_heads(linear_model, pairs, sites=["nope*"])


def test_save_load_and_figures(planted_scores, linear_model, pairs, tmp_path):
    paths = planted_scores.save(tmp_path, figures=False)  # the CLI test draws every figure
    for key in ("csv", "json", "state"):
        assert paths[key].is_file() and paths[key].stat().st_size > 0, key
    (heat,) = plot_heatmaps(planted_scores, tmp_path, columns=["register_lift"])
    assert heat.name == "heatmap_register_lift.png" and heat.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads(paths["json"].read_text())
    assert "NaN" not in paths["json"].read_text()
    assert len(data["rows"]) == len(planted_scores.table()) == 16 * 4
    assert {tuple(r["tokens"]) for r in data["register_heads"]} == {(5,), (7,)}
    header = paths["csv"].read_text().splitlines()[0].split(",")
    assert {"site", "head", "labels", "corr_recall@16px", "register_lift", "local_lift"} <= set(header)
    again = HeadScores.load(tmp_path)
    assert again.labels() == planted_scores.labels()
    assert again.best_per_layer() == planted_scores.best_per_layer()
    out = plot_attention_overlays(linear_model, pairs, [HeadRef(CORR_SITE, 2, 1, h) for h in range(4)],
                                  tmp_path / "overlay.png", queries=[0, 5])
    assert out.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="one query view"):
        plot_attention_overlays(linear_model, pairs, [HeadRef(CORR_SITE, 2, 1, 0), HeadRef("dec0.cross.v1", 1, 2, 0)],
                                tmp_path / "x.png")


# --------------------------------------------------------------------------------------
# Nothing family-specific: a toy model with one global attention over three views
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ToyConfig(ModelConfig):
    img_size: tuple = (48, 64)
    patch_size: int = 16
    n_heads: int = 2
    d: int = 8


class ToyGlobal(MultiViewModel):
    """Patch embedding, then one attention over all views' tokens concatenated ("global")."""

    family = "toy_global"
    fixed_n_views = None

    def __init__(self, config: ToyConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Conv2d(3, config.d, config.patch_size, config.patch_size)
        self.qk = nn.Linear(config.d, 2 * config.d)
        self.hook_resid_pre = HookPoint()
        self.hook_pattern = HookPoint()
        self.setup()

    def forward(self, *imgs):
        x = self.hook_resid_pre(torch.cat([self.embed(i).flatten(2).transpose(1, 2) for i in imgs], 1))
        q, k = rearrange(self.qk(x), "b n (two h d) -> two b h n d", two=2, h=self.config.n_heads)
        pattern = self.hook_pattern((q @ k.transpose(-1, -2)).softmax(-1))
        return tuple({"attn": pattern.sum()} for _ in imgs)

    def attention_sites(self, n_views=None):
        views = tuple(range(1, (n_views or 2) + 1))
        return [AttentionSite("blk0.self", "hook_pattern", "hook_pattern", "hook_pattern", "self", "dec", 0, 0,
                              views, self.config.n_heads, "global")]

    def probe_sites(self, encoder_blocks=False, sublayers=False, n_views=None):
        return [ProbeSite(f"dec_in.v{v}", "hook_resid_pre", v, -1, "dec_in", "dec", 0, self.config.d, "concat")
                for v in range(1, (n_views or 2) + 1)]


def test_global_layout_three_views():
    torch.manual_seed(0)
    model = ToyGlobal(ToyConfig()).eval()
    V = 3

    def plant(pattern, hook):
        # head 0: view-2 queries put half their mass on the match in view 1 and half on themselves;
        # every other query view attends only to itself (own position)
        B = pattern.shape[0]
        out = torch.zeros_like(pattern)
        eye = torch.eye(N)
        for qv in range(V):
            out[:, 0, qv * N:(qv + 1) * N, qv * N:(qv + 1) * N] = eye
        m = _onehot_pattern(_match(B), 1)[:, 0]
        out[:, 0, N:2 * N, :N] = 0.5 * m
        out[:, 0, N:2 * N, N:2 * N] = 0.5 * eye
        # head 1: every query attends to token 4 of view 3
        out[:, 1, :, 2 * N + 4] = 1.0
        return out

    g = torch.Generator().manual_seed(5)
    views = [{"img": torch.rand(2, 3, 48, 64, generator=g) * 2 - 1} for _ in range(V)]
    with model.hooks([("hook_pattern", plant)]):
        s = score_heads(model, views, correspondence_fn=_hand_made, register_k=1)
    assert len(s.units) == V * V
    m21 = s.metrics(s.unit("blk0.self", 2, 1))
    assert m21["block_mass"][0].item() == pytest.approx(0.5)
    assert m21["corr_recall@0px"][0].item() == 1.0
    assert "correspondence" in s.labels()[HeadRef("blk0.self", 2, 1, 0)]
    assert "local" in s.labels()[HeadRef("blk0.self", 2, 2, 0)]
    assert s.labels()[HeadRef("blk0.self", 1, 2, 0)] == ("other",)  # no mass in that block
    regs = {r.ref: r for r in s.register_heads()}
    for qv in range(1, V + 1):
        r = regs[HeadRef("blk0.self", qv, 3, 1)]
        assert r.tokens == (4,) and r.pattern_key_index == (2 * N + 4,) and r.layout == "global"
    assert HeadRef("blk0.self", 1, 1, 1) not in regs  # the block gets no mass from head 1
    assert {(b.query_view, b.key_view) for b in s.best_per_layer()} == {(q, k) for q in (1, 2, 3) for k in (1, 2, 3)
                                                                       if q != k}
    # register norms come from the key view's slice of the concatenated residual
    assert {u.resid_site for u in s.units} == {"dec_in.v1", "dec_in.v2", "dec_in.v3"}
    assert not math.isnan(regs[HeadRef("blk0.self", 1, 3, 1)].norm_ratio)


# --------------------------------------------------------------------------------------
# The command line on the tiny fixture model, with synthetic pairs
# --------------------------------------------------------------------------------------


def test_cli_classify_writes_table_heatmaps_and_overlays(tmp_path, capsys):
    from mv_interp.cli import main

    from fixture_utils import FIXTURES

    model = str(FIXTURES / "dust3r" / "dust3r_tiny_linear.pth")
    out = tmp_path / "heads"
    argv = ["heads", "classify", "--model", model, "--pairs", "4", "--batch-size", "2", "--out", str(out), "--quiet"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "labels:" in printed and "best correspondence head" in printed
    for name in ("scores.csv", "scores.json", "state.pt", "labels.png", "correspondence_curve.png",
                 "correspondence_lines.png", "heatmaps/heatmap_corr_recall_at_16px.png",
                 "heatmaps/heatmap_register_lift.png", "heatmaps/heatmap_local_lift.png"):
        assert (out / name).is_file(), name
    overlays = sorted((out / "overlays").glob("overlay_*.png"))
    assert any(p.name.startswith("overlay_correspondence_dec") for p in overlays)
    data = json.loads((out / "scores.json").read_text())
    assert data["n_pairs"] == 4 and data["n_pairs_with_geometry"] == 4
    assert len(data["rows"]) == 16 * 4 and len(data["best_per_layer"]) == 6
    # the run is resumable: the same command finds every batch done and rescoring is skipped
    assert main(argv + ["--no-figures"]) == 0
    assert "resuming: 2 of 2 batches" in capsys.readouterr().out
    assert json.loads((out / "scores.json").read_text())["rows"] == data["rows"]
    # relabel without the model
    assert main(["heads", "relabel", str(out), "--register-lift", "1.01", "--no-figures"]) == 0
    rows = json.loads((out / "scores.json").read_text())["rows"]
    assert not any("register" in r["labels"] for r in rows)
    # bad input: one clear line
    assert main(["heads", "classify", "--model", model, "--out", str(out), "--data", str(tmp_path / "nope")]) == 1
    assert "not a directory" in capsys.readouterr().err


def test_correspondence_targets_agree_with_patch_correspondences():
    from mv_interp.data import SceneConfig, patch_correspondences, render_views

    v1, v2 = render_views(3, SceneConfig(image_size=(48, 64)), seed=11)
    t = correspondence_targets(v2, v1, P)
    match, _ = patch_correspondences(v2, v1, P)
    assert torch.equal(t.match, match)
    scored = match >= 0
    assert scored.any()
    sums = t.overlap.sum(-1)
    assert torch.allclose(sums[scored], torch.ones(int(scored.sum()))) and (sums[~scored] == 0).all()
    assert torch.equal(t.overlap.argmax(-1)[scored], match[scored])


def test_fast3r_global_attention_blocks_share_each_row():
    """Fast3R's decoder attends over all views at once ("global"): its V² blocks per layer hold
    the whole rows, so each query view's block masses add up to 1."""
    import mv_interp
    from mv_interp.data import SceneConfig, render_views

    from fixture_utils import fixture, formula_state_dict

    meta, _ = fixture("fast3r/fast3r_tiny")
    model = mv_interp.load_model(formula_state_dict(meta), config=meta["config"], family="fast3r")
    views = render_views(1, SceneConfig(image_size=(48, 64), n_views=3), seed=2)
    s = score_heads(model, views, sites=["dec1.*"])
    assert {(u.query_view, u.key_view) for u in s.units} == {(q, k) for q in (1, 2, 3) for k in (1, 2, 3)}
    for qv in (1, 2, 3):
        total = sum(s.metrics(s.unit("dec1.self", qv, kv))["block_mass"] for kv in (1, 2, 3))
        assert torch.allclose(total, torch.ones_like(total), atol=1e-5)
    assert len(s.best_per_layer()) == 6 and all(b.n_queries > 0 for b in s.best_per_layer())


def test_cli_reads_a_capture_directory(tmp_path, capsys):
    from mv_interp.cli import main
    from mv_interp.data import SceneConfig, render_views, write_capture

    from fixture_utils import FIXTURES

    write_capture(render_views(3, SceneConfig(image_size=(48, 64)), seed=4), tmp_path / "cap")
    out = tmp_path / "out"
    assert main(["heads", "classify", "--model", str(FIXTURES / "dust3r" / "dust3r_tiny_linear.pth"), "--data",
                 str(tmp_path / "cap"), "--out", str(out), "--no-figures", "--quiet", "--sites", "dec0.*"]) == 0
    data = json.loads((out / "scores.json").read_text())
    assert data["n_pairs"] == data["n_pairs_with_geometry"] == 3
    assert {r["site"] for r in data["rows"]} == {"dec0.self.v1", "dec0.self.v2", "dec0.cross.v1", "dec0.cross.v2"}


def test_many_view_figures_merge_view_pairs_and_keep_the_tables_whole():
    """N views give N·(N−1) cross-view groups: the heatmap panels merge them into within / across
    views (cell = mean over view pairs, a label where it holds in at least half), the per-group
    figures keep the queries into view 1; a pair model's panels are its groups, unchanged."""
    import math

    from mv_interp.heads.result import figure_groups, group_title, panel_rows, rows_by_group

    def rows(n_views):
        out = []
        for qv in range(1, n_views + 1):
            for kv in range(1, n_views + 1):
                for layer in (0, 1):
                    for head in (0, 1):
                        v = float(10 * qv + kv) if (layer, head) != (1, 1) or kv != 2 else math.nan
                        lab = "correspondence" if (head == 0 and qv != kv and (qv + kv) % 2) else ""
                        out.append({"stack": "dec", "kind": "self", "query_view": qv, "key_view": kv, "layer": layer,
                                    "head": head, "corr_abs": v, "labels": lab})
        return out

    pair = panel_rows(rows(2))
    assert [title for title, _ in pair.values()] == [group_title(g) for g in rows_by_group(rows(2))]
    many = panel_rows(rows(4))  # 16 groups > MAX_PANELS
    assert list(many) == [("dec", "self", True), ("dec", "self", False)]
    title, across = many[("dec", "self", False)]
    assert "mean of 12 view pairs" in title
    cell = next(r for r in across if (r["layer"], r["head"]) == (0, 0))
    pairs = [(q, k) for q in range(1, 5) for k in range(1, 5) if q != k]
    assert cell["corr_abs"] == sum(10 * q + k for q, k in pairs) / 12
    nan_aware = next(r for r in across if (r["layer"], r["head"]) == (1, 1))
    assert nan_aware["corr_abs"] == sum(10 * q + k for q, k in pairs if k != 2) / 9
    assert cell["labels"] == "correspondence"  # 8 of 12 pairs have it
    groups = [("dec", "self", q, k) for q, k in pairs]
    assert figure_groups(groups[:2]) == groups[:2]
    assert figure_groups(groups) == [("dec", "self", q, 1) for q in (2, 3, 4)]


def test_per_sample_sums_of_a_batch_equal_one_pair_at_a_time(linear_model):
    """``HeadScorer.per_sample``: one batched forward keeps each example's sums, equal to scoring the
    examples one at a time, and they add up to the batch's totals (what the report's intervals use)."""
    from mv_interp.data import SceneConfig, render_views
    from mv_interp.heads import HeadScorer
    from mv_interp.heads.scoring import PER_SAMPLE_SUMS

    views = render_views(3, SceneConfig(image_size=(48, 64)), seed=11)
    batched = HeadScorer(linear_model)
    batched.per_sample = {}
    batched.update(views)
    assert batched.per_sample and all(set(s) <= set(PER_SAMPLE_SUMS) for s in batched.per_sample.values())
    assert any("corr_hits" in s for s in batched.per_sample.values())  # geometry: correspondence sums too
    one = HeadScorer(linear_model)
    for i in range(3):
        before = {k: {s: t.clone() for s, t in v.items()} for k, v in one.sums.items()}
        one.update([{k: t[i : i + 1] for k, t in v.items()} for v in views])
        for key, stats in batched.per_sample.items():
            for stat, (part,) in stats.items():
                delta = one.sums[key][stat] - before.get(key, {}).get(stat, 0)
                torch.testing.assert_close(part[i], delta.double(), rtol=1e-4, atol=1e-5, msg=f"{key} {stat}")
    for key, stats in batched.per_sample.items():
        for stat, (part,) in stats.items():
            torch.testing.assert_close(part.sum(0), batched.sums[key][stat].double(), rtol=1e-5, atol=1e-6)

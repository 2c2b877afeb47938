"""``mv-interp report``: a --fast run of every step on the bundled model, step reuse, resume after an
interruption, and the page in a real browser (renders, the 4D slider moves the view, no script error)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mv_interp.cli import main
from mv_interp.report import STEP_NAMES, Manifest, ReportConfig, run_report

from browser import chromium, save_artifact, severe_console_errors

FAST = ReportConfig.preset("fast")


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report")
    assert main(["report", "--fast", "--out", str(out), "--quiet"]) == 0
    return out


def test_fast_report_writes_every_artefact(report):
    html = (report / "report.html").read_text()
    for section in ("summary", "geometry", "probes", "heads", "attention", "knockout", "patching", "run"):
        assert f'id="{section}"' in html
    # self-contained: no file or network references for scripts, styles or images
    assert "http://" not in html.replace("http://www.w3.org", "") and "<script src" not in html
    assert 'src="data:image/png;base64,' in html
    for rel in ("probes/eval/metrics.csv", "probes/eval/metrics.json", "probes/eval/curves.png",
                "probes/eval/contributions.png", "heads/scores.csv", "heads/scores.json",
                "heads/correspondence_curve.png", "knockout/knockout.csv", "knockout/knockout.png",
                "knockout/registers.json", "patching/site/patching.png", "patching/site/patching.json",
                "views/pair_easy.rrd", "views/pair_hard.rrd", "views/viewer_easy_mlp.json", "summary.json"):
        assert (report / rel).is_file(), rel
    summary = json.loads((report / "summary.json").read_text())
    assert set(summary["steps"]) == set(STEP_NAMES)
    assert not any(s["reused"] for s in summary["steps"].values())
    ex = summary["examples"]
    assert ex["easy"]["index"] != ex["hard"]["index"]
    assert ex["easy"]["overlap"] >= ex["hard"]["overlap"] or ex["easy"]["rotation_deg"] <= ex["hard"]["rotation_deg"]
    # the knockout spec written to disk is one the library reloads
    from mv_interp.interventions import AttentionKnockout, load_spec

    spec = load_spec(report / "knockout" / "registers.json")
    assert isinstance(spec, AttentionKnockout)
    assert spec.queries.kind == "others" and spec.keys.kind == "top_attended" and spec.mode == "post"
    # measured numbers are numbers, not placeholders
    rows = json.loads((report / "probes" / "eval" / "metrics.json").read_text())["rows"]
    assert all(r["e2_aligned_v2"] is not None and r["e2_aligned_v2"] > 0 for r in rows if r["method"] == "mlp")


def test_fast_report_is_honest_about_itself(report):
    import re

    html = (report / "report.html").read_text()
    summary = json.loads((report / "summary.json").read_text())
    # a smoke run says so, and no card is green
    assert 'id="smoke-banner"' in html and "not meaningful" in html and "--probe-steps" in html
    assert summary["smoke"] and not re.search(r'class="v good"', html)
    facts = summary["facts"]
    # the trend is computed from the site the card shows (decoder input), with its interval
    t = facts["e2_aligned_v2_trend"]
    assert t["from"] == "dec_in"
    rows = json.loads((report / "probes" / "eval" / "metrics.json").read_text())["rows"]
    at = {r["location"]: r["e2_aligned_v2"] for r in rows if r["method"] == "mlp"}
    assert t["start"]["estimate"] == pytest.approx(at["dec_in"], abs=1e-6)
    assert t["end"]["estimate"] == pytest.approx(at[t["to"]], abs=1e-6)
    ch = t["change"]
    assert ch["low"] <= ch["estimate"] <= ch["high"]
    assert ch["estimate"] == pytest.approx(at[t["to"]] - at["dec_in"], abs=1e-6)
    # "who fixes view 2" is the kind that fixes most, not the first listed
    by_kind = {k: v["estimate"] for k, v in facts["by_kind"].items()}
    assert facts["fixes_most"]["kind"] == min(by_kind, key=by_kind.get)
    # intervals everywhere: per site (CSV and JSON), per head, per block and kind, the knockout
    csv_rows = (report / "probes" / "eval" / "intervals.csv").read_text().splitlines()
    assert csv_rows[0].startswith("method,location,metric,estimate,low,high")
    assert len(csv_rows) > len(at)
    iv = json.loads((report / "probes" / "eval" / "intervals.json").read_text())
    assert set(iv["contributions"]["mlp"]["by_kind"]) == {"self", "cross", "mlp"}
    heads = json.loads((report / "heads" / "intervals.json").read_text())
    best = heads["best_per_layer"][0]
    assert best["recall_ci"]["low"] <= best["recall"]["16px"] <= best["recall_ci"]["high"]
    ko = json.loads((report / "knockout" / "knockout.json").read_text())
    assert "positive" in ko["specs"] and ko["positive"]["heads"]
    assert set(ko["intervals"]["contrasts"]) >= {"registers_vs_random_tokens", "positive_vs_registers"}
    # the paper side by side: every quantitative claim, judged or said why not
    assert len(facts["paper"]) == 6 and 'id="paper"' in html
    assert all(r["status"] in ("agree", "disagree", "inconclusive", "not measurable here", "not judged")
               for r in facts["paper"])
    assert 'class="ci"' in html or "class=ci" in html  # intervals rendered next to the numbers


def test_header_shows_the_pairs_used():
    from mv_interp.report.page import header_chips

    ctx = {"model": {"name": "m"}, "config": {"pairs": 8}, "pairs_used": 3, "data": {"source": "capture"},
           "environment": {}, "timings": {}}
    assert "3 held-out pairs" in header_chips(ctx)
    ctx["config"]["views"] = 4
    assert "3 held-out examples of 4 views" in " ".join(header_chips(ctx))


def test_a_pair_model_refuses_other_view_counts(tmp_path, capsys):
    """``--views 3`` on DUSt3R is one line naming the model's view count and the fix, before any work."""
    assert main(["report", "--fast", "--views", "3", "--out", str(tmp_path / "o"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "takes 2 views" in err and "--views 2" in err and "VGGT" in err
    assert not (tmp_path / "o" / "manifest.json").exists()
    with pytest.raises(ValueError, match="at least 2 views"):
        ReportConfig(views=1)


def test_example_difficulty_of_many_views_is_judged_against_view_1():
    """N views: the overlap is the mean over frames 2..N of each frame's overlap with frame 1 and the
    rotation the largest, so the hardest frame decides (two views: the pair's own numbers)."""
    from mv_interp.data import SceneConfig, render_views
    from mv_interp.data.difficulty import pair_stats

    views = render_views(3, SceneConfig(image_size=(64, 64), n_views=3), seed=5)
    three = pair_stats(views)
    first, second = pair_stats([views[0], views[1]]), pair_stats([views[0], views[2]])
    for s, a, b in zip(three, first, second):
        assert s["overlap"] == pytest.approx((a["overlap"] + b["overlap"]) / 2, abs=1e-6)
        assert s["rotation_deg"] == pytest.approx(max(a["rotation_deg"], b["rotation_deg"]), abs=1e-4)


def test_recorded_command_runs_when_pasted(report):
    import shlex

    summary = json.loads((report / "summary.json").read_text())
    command = summary["command"]
    assert command.startswith("mv-interp report ") and "--fast" in command
    argv = shlex.split(command)
    assert main(argv[1:] + ["--quiet"]) == 0  # every step is reused: the same run
    again = json.loads((report / "summary.json").read_text())
    assert all(s["reused"] for s in again["steps"].values())


def test_plain_photos_need_no_ground_truth(tmp_path):
    """Two image files and nothing else: the report runs what needs no ground truth and says
    which sections need it."""
    from PIL import Image

    from mv_interp.data import SceneConfig, render_views
    from mv_interp.images import to_image

    views = render_views(1, SceneConfig(image_size=(128, 128)), seed=3)
    paths = []
    for v, view in enumerate(views, start=1):
        paths.append(tmp_path / f"photo{v}.png")
        Image.fromarray(to_image(view["img"][0])).save(paths[-1])
    out = tmp_path / "out"
    assert main(["report", "--fast", "--images", *map(str, paths), "--out", str(out), "--quiet"]) == 0
    html = (out / "report.html").read_text()
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["steps"]) == {"heads", "knockout", "patching", "views"}
    assert html.count('class="needs-gt"') >= 3 and "1 photo pair(s), no ground truth" in html
    assert (out / "views" / "viewer_easy_lens.json").is_file() and (out / "heads" / "scores.csv").is_file()
    ko = json.loads((out / "knockout" / "knockout.json").read_text())
    assert ko["summary"]["registers"]["output_moved"] > 0 and not ko["probed"]
    assert any(r["status"] == "not measurable here" for r in summary["facts"]["paper"])
    with pytest.raises(ValueError, match="pairs of images"):
        run_report("dust3r-toy", FAST, tmp_path / "o2", images=paths[:1], progress=False, log=lambda s: None)


def test_photos_with_probes_trained_on_synthetic_rooms(report, tmp_path):
    """``--probes``: the report's own synthetic-trained probes read the user's pair too."""
    from PIL import Image

    import mv_interp
    from mv_interp.images import to_image
    from mv_interp.report import analysis as A

    model = mv_interp.load_model("dust3r-toy")
    H, W = model.module.config.img_size
    paths = [tmp_path / f"p{i}.png" for i in (1, 2)]
    for i, p in enumerate(paths):
        Image.fromarray(to_image(torch_rand(3, H, W, seed=i))).save(p)
    pairs = A.image_pairs(model, paths)
    files, info = A.views_step(model, pairs, FAST, tmp_path / "out", False, report / "probes" / "model")
    assert info["easy"]["methods"] == ["mlp", "lens"]
    data = json.loads((tmp_path / "out" / "views" / "viewer_easy_mlp.json").read_text())
    assert data["gt"] is None and len(data["frames"]) > 2 and data["title"].startswith("pair 1")


def torch_rand(*shape, seed: int = 0):
    import torch

    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_lens_4d_on_views_without_valid(tmp_path):
    import torch

    import mv_interp
    from mv_interp.probes.views import write_4d

    model = mv_interp.load_model("dust3r-toy")
    H, W = model.module.config.img_size
    views = [{"img": torch.rand(1, 3, H, W) * 2 - 1} for _ in range(2)]
    files = write_4d(tmp_path, model, None, {"mine": views}, lens=True, rerun=False)
    assert files["html"].is_file()


def test_rerun_reuses_steps_and_force_recomputes_downstream(report):
    logs: list[str] = []
    run_report("dust3r-toy", FAST, report, progress=False, log=logs.append)
    summary = json.loads((report / "summary.json").read_text())
    assert all(s["reused"] for s in summary["steps"].values()), summary["steps"]
    before = Manifest(report).steps
    logs.clear()
    run_report("dust3r-toy", FAST, report, progress=False, log=logs.append, force=["heads"])
    after = Manifest(report).steps
    assert after["heads"].run_id != before["heads"].run_id
    assert after["knockout"].run_id != before["knockout"].run_id  # reads the head scores
    assert after["probes"].run_id == before["probes"].run_id
    assert after["patching"].run_id == before["patching"].run_id
    with pytest.raises(ValueError, match="unknown step"):
        run_report("dust3r-toy", FAST, report, progress=False, log=logs.append, force=["nope"])


def test_interrupted_run_resumes_and_changed_settings_recompute(tmp_path):
    calls = {"n": 0}
    import mv_interp.report.analysis as A

    real = A.heads_step

    def boom(*a, **k):
        calls["n"] += 1
        raise KeyboardInterrupt

    A.heads_step = boom
    try:
        with pytest.raises(KeyboardInterrupt):
            run_report("dust3r-toy", FAST, tmp_path, progress=False, log=lambda s: None)
    finally:
        A.heads_step = real
    done = Manifest(tmp_path).steps
    assert {"probes", "control", "evaluate"} <= set(done) and "heads" not in done
    assert not (tmp_path / "report.html").exists()
    logs: list[str] = []
    run_report("dust3r-toy", FAST, tmp_path, progress=False, log=logs.append)
    assert any("train pointmap probes" in s and "reused" in s for s in logs)
    assert any("score and classify" in s and "done in" in s for s in logs)
    # a changed probe setting retrains the probes and everything that reads them
    logs.clear()
    run_report("dust3r-toy", FAST.changed(probe_steps=FAST.probe_steps + 1), tmp_path, progress=False,
               log=logs.append)
    assert any("train pointmap probes" in s and "(settings, model or an earlier step changed)" in s for s in logs)
    assert any("score and classify" in s and "reused" in s for s in logs)


def test_bad_input_is_one_clear_error(tmp_path, capsys):
    assert main(["report", "--fast", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "o"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "not a directory" in err and "docs/data.md" in err
    with pytest.raises(ValueError, match="pairs"):
        ReportConfig(pairs=1)
    assert main(["report", "--fast", "--force", "probez", "--out", str(tmp_path / "o"), "--quiet"]) == 1
    assert "unknown step" in capsys.readouterr().err


def test_report_renders_and_slider_moves_the_view(report):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    with chromium(1280, 1600) as driver:
        driver.get((report / "report.html").as_uri())
        n = driver.execute_script("return window.mvViewers.length")
        assert n >= 3  # easy and hard pair, knockout comparison (the lens viewers are folded away)
        for sid in ("summary", "paper", "probes", "heads", "knockout", "patching", "run"):
            assert driver.find_element(By.ID, sid).is_displayed()
        # a fast run shows its banner; intervals are rendered beside the headline numbers and in the tables
        banner = driver.find_element(By.ID, "smoke-banner")
        assert banner.is_displayed() and "not meaningful" in banner.text
        cards = driver.find_elements(By.CSS_SELECTOR, "#summary .stat")
        assert any("[" in c.find_element(By.CSS_SELECTOR, ".v").text for c in cards)
        assert not driver.find_elements(By.CSS_SELECTOR, "#summary .stat .v.good")
        assert len(driver.find_elements(By.CSS_SELECTOR, "#paper-table tbody tr")) == 6
        assert "95 % interval" in driver.find_element(By.ID, "probe-table").text
        cell = driver.find_element(By.CSS_SELECTOR, "table.heat td[title]")
        assert "[" in cell.get_attribute("title")  # hover shows the value's interval
        from selenium.webdriver.support.ui import WebDriverWait

        figures = ("return Array.from(document.images).filter(i => i.closest('figure') && i.offsetParent)"
                   ".map(i => [i.complete, i.naturalWidth])")
        # a 7 MB page of inline PNGs: give the decoder time on a loaded 2-core machine
        WebDriverWait(driver, 30).until(lambda d: all(ok for ok, _ in d.execute_script(figures)))
        imgs = driver.execute_script(figures)
        assert imgs and all(ok and w > 0 for ok, w in imgs)
        save_artifact(driver, "report.png")
        viewer = driver.find_element(By.ID, "geometry")
        driver.execute_script("arguments[0].scrollIntoView()", viewer)
        canvas = lambda: driver.execute_script(  # noqa: E731
            "return document.querySelector('#geometry canvas').toDataURL()")
        before = canvas()
        label = driver.find_element(By.CSS_SELECTOR, "#geometry .mvv-label").text
        slider = driver.find_element(By.CSS_SELECTOR, "#geometry .mvv-slider")
        slider.send_keys(Keys.ARROW_RIGHT, Keys.ARROW_RIGHT, Keys.ARROW_RIGHT)
        assert driver.execute_script("return window.mvViewers[0].frame") == 3
        assert driver.find_element(By.CSS_SELECTOR, "#geometry .mvv-label").text != label
        assert canvas() != before
        save_artifact(driver, "report_viewer.png")
        # sortable tables sort
        th = driver.find_element(By.CSS_SELECTOR, "#probe-table thead th:nth-child(3)")
        driver.execute_script("arguments[0].click()", th)
        assert "sorted" in th.get_attribute("class")
        assert severe_console_errors(driver) == []


@pytest.mark.slow
@pytest.mark.parametrize("family,n_views", [("mast3r", 2), ("fast3r", 2), ("fast3r", 3)])
def test_report_runs_on_other_families(family, n_views, tmp_path):
    """The report asks the model for its sites, so any adapted family works (≈ 45 s each on a CPU);
    Fast3R on examples of three views too."""
    import torch

    import mv_interp
    from mv_interp.adapters.fast3r import Fast3RConfig, HookedFast3R
    from mv_interp.adapters.mast3r import HookedMASt3R, MASt3RConfig

    tiny = dict(img_size=(32, 48), enc_embed_dim=32, enc_depth=2, enc_num_heads=2, dec_embed_dim=32, dec_depth=2,
                dec_num_heads=2)
    torch.manual_seed(0)
    module = (HookedMASt3R(MASt3RConfig(**tiny, output_mode="pts3d+desc8")) if family == "mast3r"
              else HookedFast3R(Fast3RConfig(**tiny)))
    files = run_report(mv_interp.MVModel(module.eval()), FAST.replace(views=n_views), tmp_path, progress=False,
                       log=lambda s: None)
    assert files["html"].is_file()
    summary = json.loads(files["summary"].read_text())
    assert set(summary["steps"]) == set(STEP_NAMES)
    assert len(list((tmp_path / "views").glob("pair_easy_view*.png"))) == n_views


def test_patching_step_with_cells_batched_gives_the_same_sweep(tmp_path):
    """``patch_batch``: the report's patching step with several cells per forward writes the values
    of one forward per cell."""
    import torch

    import mv_interp
    from mv_interp.report import analysis as A

    model = mv_interp.load_model("dust3r-toy")
    cfg = FAST.replace(pairs=3, patch_pairs=2, patch_per=("site",))
    pairs = A.prepare_pairs(model, cfg, None, False)
    A.patching_step(model, pairs, cfg, tmp_path / "one", False)
    A.patching_step(model, pairs, cfg.replace(patch_batch=8), tmp_path / "many", False)
    from safetensors.torch import load_file

    one, many = (load_file(str(tmp_path / d / "patching" / "site" / "patching.safetensors")) for d in ("one", "many"))
    assert one.keys() == many.keys() and "values" in one
    for k in one:
        torch.testing.assert_close(many[k], one[k], equal_nan=True)

"""The report page: every section, built from the files the steps wrote (see :mod:`.analysis`).

Each section says what was computed and how to read it, in a few lines, so the page can be
shared as is. The page is one file: CSS and JS inline, figures as PNG data URIs, the 4D viewers'
script and data inline (:func:`mv_interp.viz.viewer_assets` once, one fragment per viewer).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from . import html as H
from ..viz.recording import RERUN_HINT
from .html import esc, fmt, pct

SECTIONS = (("summary", "At a glance"), ("geometry", "4D: geometry through the network"),
            ("probes", "Probe errors per site"), ("heads", "Attention heads"), ("attention", "Attention maps"),
            ("knockout", "Register knockout"), ("patching", "Activation patching"), ("run", "Run details"))


def _load(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def _series(metrics: dict, method: str, column: str) -> list[float]:
    by_loc = {r["location"]: r.get(column) for r in metrics["rows"] if r["method"] == method}
    locs = _locations(metrics)
    return [_f(by_loc.get(loc)) for loc in locs]


def _locations(metrics: dict) -> list[str]:
    seen: dict[str, None] = {}
    for r in sorted(metrics["rows"], key=lambda r: r["order"]):
        seen.setdefault(r["location"], None)
    return list(seen)


def _f(v: Any) -> float:
    try:
        return float(v) if v is not None else math.nan
    except (TypeError, ValueError):
        return math.nan


def trend(values: list[float]) -> dict[str, Any]:
    """Does an error series fall along the network? First, last, the share of steps that go down,
    and the rank correlation (Spearman) between position and error (−1 = falls monotonically)."""
    vals = [v for v in values if math.isfinite(v)]
    if len(vals) < 2:
        return {"first": math.nan, "last": math.nan, "down_share": math.nan, "spearman": math.nan, "falls": False}
    n = len(vals)
    ranks = sorted(range(n), key=lambda i: vals[i])
    r = [0.0] * n
    for pos, i in enumerate(ranks):
        r[i] = float(pos)
    mx = (n - 1) / 2
    cov = sum((i - mx) * (r[i] - mx) for i in range(n))
    var = sum((i - mx) ** 2 for i in range(n))
    rho = cov / var if var else math.nan
    down = sum(b < a for a, b in zip(vals, vals[1:])) / (n - 1)
    return {"first": vals[0], "last": vals[-1], "min": min(vals), "down_share": down, "spearman": rho,
            "falls": vals[-1] < vals[0] and rho < -0.5}


# --------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------


def _summary(ctx: dict, out: Path) -> tuple[str, dict]:
    metrics = _load(out / "probes" / "eval" / "metrics.json")
    heads = ctx["records"].get("heads", {}).get("info", {})
    ko = ctx["records"].get("knockout", {}).get("info", {})
    patch = ctx["records"].get("patching", {}).get("info", {})
    cards, facts = [], {}
    if metrics:
        e2 = _series(metrics, "mlp", "e2_aligned_v2")
        locs = _locations(metrics)
        t = trend(e2)
        facts["e2_trend"] = t
        i_in = locs.index("dec_in") if "dec_in" in locs else 0
        cards.append(H.stat("aligned view-2 error (probes)", f"{fmt(e2[i_in])} → {fmt(e2[-1])}",
                            f"decoder input → {esc(locs[-1])}; falls at {pct(t['down_share'], False)} of the steps "
                            f"(Spearman ρ = {fmt(t['spearman'], 2)})", "good" if t["falls"] else "warn"))
        e1 = _series(metrics, "mlp", "e1_v2")
        t1 = trend(e1)
        facts["e1_v2_trend"] = t1
        cards.append(H.stat("view-2 error in view 1's frame", f"{fmt(e1[0])} → {fmt(e1[-1])}",
                            f"{esc(locs[0])} → {esc(locs[-1])}: the relative pose being resolved",
                            "good" if t1["falls"] else "warn"))
        contrib = metrics.get("contributions", {}).get("mlp")
        if contrib:
            bk = contrib["by_kind"]
            parts = ", ".join(f"{k} {pct(v['total_rel_to_input'])}" for k, v in bk.items())
            facts["by_kind"] = {k: v["total_rel_to_input"] for k, v in bk.items()}
            cards.append(H.stat("who fixes view 2's shape (Figure 4)", parts.split(", ")[0] if parts else "–",
                                f"change of the decoder-input error by skip kind: {esc(parts)} "
                                "(paper's DUSt3R: self −94%, cross +11%, MLP +7%)"))
        ctl = _series(metrics, "control_mlp", "e2_aligned_v2")
        if any(math.isfinite(v) for v in ctl):
            last = max((i for i, v in enumerate(ctl) if math.isfinite(v)))
            cards.append(H.stat("probe vs random-backbone control", f"{fmt(e2[last])} vs {fmt(ctl[last])}",
                                f"aligned view-2 error at {esc(locs[last])}: what the trained model's state holds "
                                "beyond what a probe infers from a randomly featurised patch"))
    best = heads.get("best_per_layer") or []
    if best:
        px = heads.get("primary_px", 16)
        key = f"{px:g}px"
        b = max(best, key=lambda b: b["recall"].get(key, 0))
        facts["best_head"] = b
        cards.append(H.stat("best correspondence head (Figure 5)", f"{pct(b['recall'][key], False)}",
                            f"{esc(b['site'])} h{b['head']}: argmax within {key} of the true patch "
                            f"(uniform attention {pct(b['chance'][key], False)}, same position "
                            f"{pct(b['same_position'][key], False)})", "good"))
    if heads.get("counts"):
        c = heads["counts"]
        cards.append(H.stat("head labels", f"{c.get('correspondence', 0)} · {c.get('register', 0)} · "
                                           f"{c.get('local', 0)}",
                            f"correspondence · register · local, of {heads.get('n_heads')} scored head blocks"))
    if ko.get("summary"):
        s = ko["summary"]
        e2c = s["clean"]["model_output"].get("e2_aligned_v2")
        e2k = s["registers"]["model_output"].get("e2_aligned_v2")
        e2r = s["random_tokens"]["model_output"].get("e2_aligned_v2")
        rel = (e2k - e2c) / e2c if e2c else math.nan
        facts["knockout_rel"] = rel
        cards.append(H.stat("register knockout (Appendix G)", pct(rel),
                            f"change of the model's aligned view-2 error ({fmt(e2c)} → {fmt(e2k)}; random tokens: "
                            f"{fmt(e2r)}) — {esc(ko['site'])} heads {ko['heads']}"))
    site = (patch.get("sweeps") or {}).get("site")
    if site and site.get("best"):
        b = site["best"][0]
        cards.append(H.stat("patching: most restoring site", f"{pct(1 - b['value'], False)}",
                            f"of the clean output restored by patching {esc(b['site'])} of block {b['layer']} "
                            "alone (clean pair into a pair with another view 2)"))
    body = f'<div class="stats">{"".join(cards)}</div>'
    if "e2_trend" in facts:
        t = facts["e2_trend"]
        verdict = ("falls along the decoder, as in the paper" if t["falls"] else
                   "does not fall steadily along the decoder here")
        body += (f'<p>The probes\' aligned view-2 error {verdict}: {fmt(t["first"])} at the first probed site, '
                 f'{fmt(t["last"])} at the last (lowest {fmt(t["min"])}). Errors are in units of the ground truth\'s '
                 "mean distance to view 1's camera (0 = perfect).</p>")
    return body, facts


def _viewer(out: Path, path: Path, element_id: str) -> str:
    from ..viz import viewer_fragment

    data = _load(path)
    if data is None:
        return f'<p class="muted">(no viewer data at {esc(path.relative_to(out).as_posix())})</p>'
    return viewer_fragment(data, element_id)


def _geometry(ctx: dict, out: Path) -> str:
    info = ctx["records"].get("views", {}).get("info", {})
    cards = []
    for label in ("easy", "hard"):
        if label not in info:
            continue
        s = info[label]
        thumbs = "".join(H.image(out / "views" / f"pair_{label}_view{v}.png", f"{label} pair, view {v}",
                                 f"view {v}") for v in (1, 2))
        lens = _viewer(out, out / "views" / f"viewer_{label}_lens.json", f"mvv-{label}-lens")
        cards.append(
            f'<div class="pair"><h3>{label.capitalize()} pair</h3><div class="muted">overlap '
            f'{pct(s.get("overlap"), False)} of view 2 visible in view 1 · relative rotation '
            f'{fmt(s.get("rotation_deg"), 1)}° · held-out pair #{s.get("index")}</div>'
            f'<div class="thumbs">{thumbs}</div>'
            + _viewer(out, out / "views" / f"viewer_{label}_mlp.json", f"mvv-{label}-mlp")
            + f'<details><summary>the same pair through the pointmap lens (the model\'s own head on each site, '
              f'no training)</summary>{lens}</details>'
            + (f'<div class="muted">rerun recording: <code>views/pair_{label}.rrd</code></div>'
               if info.get("rerun", True) else "") + '</div>')
    body = H.howto(
        "Each viewer shows what the probes decode from the residual stream of both views at one site; the slider "
        "(or <i>play</i>, or the arrow keys) steps through the sites in processing order: encoder output, decoder "
        "input, then the residual after each self-attention, cross-attention and MLP skip of every decoder block. "
        "Points take their pixel's colour; tick <i>colour by view</i> to tell the views apart and <i>ground truth</i> "
        "to overlay the true geometry in grey. Drag to orbit, wheel to zoom. Each frame is divided by its mean "
        "distance to view 1's camera, so only shape and relative pose change. Watch view 2 (tinted blue) swing into "
        "place and its shape straighten: on the easy pair early, on the hard pair over several blocks (the paper's "
        "Figure 3).")
    body += f'<div class="grid2">{"".join(cards)}</div>'
    if info.get("rerun", True):
        body += ('<p class="muted">The same frames as rerun recordings (time axis = site): '
                 '<code>rerun views/pair_easy.rrd</code> in the output folder (the viewer comes with rerun-sdk).</p>')
    else:
        body += ('<p class="muted">No rerun recordings (<code>.rrd</code>) of these frames were written: rerun-sdk, '
                 f'an optional extra, is not installed. To get them: <code>{esc(RERUN_HINT)}</code>, then re-run '
                 'the same <code>mv-interp report</code> command (only this step is recomputed).</p>')
    return body


def _probe_table(metrics: dict, out: Path) -> str:
    locs = _locations(metrics)
    methods = list(dict.fromkeys(r["method"] for r in metrics["rows"]))
    rows = []
    for i, loc in enumerate(locs):
        row: dict[str, Any] = {"i": i, "location": loc}
        for m in methods:
            for c in ("e2_aligned_v2", "e1_v2", "e1_v1"):
                v = [r.get(c) for r in metrics["rows"] if r["method"] == m and r["location"] == loc]
                row[f"{m}:{c}"] = _f(v[0]) if v else math.nan
        rows.append(row)
    model_out = _load(out / "probes" / "eval" / "model_output.json") or {}
    if model_out:
        row = {"i": len(locs), "location": "model output"}
        for c in ("e2_aligned_v2", "e1_v2", "e1_v1"):
            row[f"mlp:{c}"] = _f(model_out.get(c))
        rows.append(row)
    cols = [("i", "#"), ("location", "location")]
    for c, name in (("e2_aligned_v2", "E.2 aligned v2"), ("e1_v2", "E.1 v2"), ("e1_v1", "E.1 v1")):
        cols += [(f"{m}:{c}", f"{name} · {m}") for m in methods]
    return H.table(rows, cols, "probe-table", text_columns=("location",), height=None)


def _probes(ctx: dict, out: Path) -> str:
    d = out / "probes" / "eval"
    metrics = _load(d / "metrics.json")
    if metrics is None:
        return '<p class="muted">(probe evaluation missing)</p>'
    n = metrics.get("meta", {}).get("n_pairs")
    body = H.howto(
        "<p><b>Curves</b> (one point per site, left to right in processing order; lower is better): E.1 is the "
        "scale- and shift-invariant pointmap error in view 1's frame, per view; E.2 aligns view 2's probed pointmap "
        "to the truth with a rigid, confidence-weighted Procrustes fit first, so it measures view 2's <i>shape</i> "
        "alone. A falling E.1 of view 2 with a flat E.2 means the relative <i>pose</i> is being resolved. "
        "<i>mlp</i>: the trained probes; <i>lens</i> (dashed): the model's own head applied to each site; "
        "<i>control_mlp</i> (dotted): the same probes trained on a randomly initialised copy of the model — the gap "
        "to it is what the trained network's state holds.</p>"
        "<p><b>Contributions</b> (the paper's Figure 4): for each decoder block, the relative change of the aligned "
        "view-2 error across the self-attention, cross-attention and MLP skip connections (negative = that sublayer "
        "improves view 2's shape); right: the totals by kind as a share of the decoder-input error.</p>")
    body += H.image(d / "curves.png", "probe error across sites",
                    f"Probed errors at every site on {n} held-out pairs (GT-normalised units).")
    body += H.image(d / "contributions.png", "sublayer contributions (Figure 4)",
                    "Relative change of the aligned view-2 error across each skip connection.")
    body += "<h3>Every site, every method</h3>" + _probe_table(metrics, out)
    body += ('<div class="toolbar">' + H.download(d / "metrics.csv", root=out) + H.download(d / "metrics.json", root=out)
             + H.download(d / "contributions.csv", root=out) + "</div>")
    return body


def _heads(ctx: dict, out: Path) -> str:
    d = out / "heads"
    scores = _load(d / "scores.json")
    if scores is None:
        return '<p class="muted">(head scores missing)</p>'
    px = scores.get("primary_px", 16)
    rec = f"corr_recall@{px:g}px"
    body = H.howto(
        f"Every head of every attention layer is scored on {scores.get('n_pairs')} held-out pairs. "
        f"<b>Correspondence recall</b>: for each view-2 query patch whose true match in the other view is known (from "
        f"depth and cameras), is the patch the head attends to most within {px:g} px (one patch) of it? "
        "<b>Register lift</b>: how much of a head's attention, averaged over all queries, falls on the same few "
        "keys (0 = uniform, 1 = all of it). <b>Local lift</b>: attention on the query's own 3×3 neighbourhood. "
        "Lifts are measured against uniform attention, so they compare across layers and image sizes. "
        "The curve below is the paper's Figure 5: the best head of each layer; a rising curve means correspondences "
        "are refined through the decoder. Dotted: uniform attention; dashed: predicting the same grid position.")
    body += H.image(d / "correspondence_curve.png", "best correspondence head per layer (Figure 5)",
                    "Recall of the best head per layer, one colour per pixel threshold.")
    body += H.image(d / "correspondence_lines.png", "correspondences of the best head per layer",
                    "On the easy pair: each line joins a view-2 query patch to the view-1 patch the layer's best head "
                    "attends to most — green within the threshold of the true match, red otherwise.")
    body += H.image(d / "labels.png", "head labels", "Labels of every head (C correspondence, R register, L local).")
    maps = sorted((d / "heatmaps").glob("heatmap_*.png"))
    first = [p for p in maps if "corr_recall" in p.name or "register_lift" in p.name]
    rest = [p for p in maps if p not in first]
    body += '<div class="grid2">' + "".join(H.image(p, p.stem, _heatmap_caption(p.stem)) for p in first) + "</div>"
    if rest:
        body += ("<details><summary>more heatmaps (" + ", ".join(esc(p.stem[8:]) for p in rest) + ")</summary>"
                 + '<div class="grid2">' + "".join(H.image(p, p.stem, _heatmap_caption(p.stem)) for p in rest)
                 + "</div></details>")
    rows = scores["rows"]
    cols = [("site", "site"), ("qk", "query→key"), ("head", "head"), ("labels", "labels"), (rec, f"recall@{px:g}px"),
            ("corr_lift", "corr. lift"), ("corr_abs", "corr. abs"), ("register_lift", "register lift"),
            ("register_norm_ratio", "register norm ratio"), ("register_tokens", "register tokens"),
            ("local_lift", "local lift"), ("block_mass", "block mass")]
    for r in rows:
        r["qk"] = f"v{r['query_view']}→v{r['key_view']}"

    def cell(k: str, v: Any, r: dict) -> str | None:
        if k == "labels":
            return " ".join(f'<span class="tag {esc(x)}">{esc(x)}</span>' for x in str(v).split("+"))
        if k == "register_tokens":
            return esc(", ".join(map(str, v))) if isinstance(v, list) else esc(str(v or ""))
        if k in (rec, "corr_lift", "register_lift", "local_lift") and isinstance(v, (int, float)) and math.isfinite(v):
            a = max(0.0, min(1.0, float(v)))
            return f'<span style="background:linear-gradient(90deg,#c9d7fb {100 * a:.0f}%,transparent 0);' \
                   f'padding:0 4px;border-radius:3px">{fmt(v)}</span>'
        return None

    body += f"<h3>All {len(rows)} heads</h3>"
    body += H.table(rows, cols, "heads-table", text_columns=("site", "qk", "labels", "register_tokens"), cell=cell,
                    filter_box=True)
    body += ('<div class="toolbar">' + H.download(d / "scores.csv", root=out) + H.download(d / "scores.json", root=out)
             + '<span class="muted">the JSON adds the thresholds, the best head per layer and the register heads with '
               "their tokens; <code>mv-interp heads relabel</code> re-labels with other thresholds</span></div>")
    return body


def _heatmap_caption(stem: str) -> str:
    name = stem[len("heatmap_"):].replace("_at_", "@")
    return f"{esc(name)} for every (layer, head), one panel per block (stack, kind, query → key view)."


def _attention(ctx: dict, out: Path) -> str:
    d = out / "heads" / "overlays"
    body = H.howto(
        "One row per query patch (red square in the query view, left). Each other column is one head: its attention "
        "over the key view, bright where it looks (scaled to its maximum). × marks the argmax, ○ the true "
        "corresponding patch. A correspondence head puts its bright spot on the ○; a register head lights the same "
        "few patches whatever the query; a local head lights the query's own neighbourhood.")
    figs = sorted(d.glob("overlay_*.png"))
    if not figs:
        return body + '<p class="muted">(no overlays)</p>'
    for p in figs:
        label = p.stem.split("_")[1]
        site = p.stem.split("_", 2)[2]
        body += f"<h3>{esc(label.capitalize())} block: <code>{esc(site)}</code></h3>"
        body += H.image(p, p.stem, f"Every head of <code>{esc(site)}</code> (the block with the strongest "
                                   f"{esc(label)} heads) on the easy pair.")
    return body


def _knockout(ctx: dict, out: Path) -> str:
    d = out / "knockout"
    data = _load(d / "knockout.json")
    if data is None:
        return '<p class="muted">(knockout missing)</p>'
    why = data.get("why", {})
    reason = esc(why.get("rule", ""))
    if "rel_change" in why:
        reason += f" ({pct(why['rel_change'])} across this block's self-attention skip)"
    regs = "; ".join(f"h{h}: {', '.join(map(str, t)) or '–'}" for h, t in data.get("register_tokens", {}).items())
    body = H.howto(
        f"The paper's Appendix G. In <code>{esc(data['site'])}</code> — view {data['query_view']}'s self-attention "
        f"in decoder block {data['layer']}, chosen as the {reason} — heads {data['heads']} ({esc(data['head_rule'])}) "
        f"are stopped from passing information from their register tokens to every other token: for each example "
        f"and head, the {data['k']} keys with the most attention (averaged over queries) get their post-softmax "
        f"attention zeroed for all other queries. The probes (trained on the clean model) then read every site. If "
        "the registers carried global information such as the relative pose, the errors after the knocked block "
        "would rise; the control knocks out the same number of random tokens in the same heads.")
    s = data["summary"]
    rows = []
    for name, label in (("clean", "clean"), ("registers", "register tokens knocked out"),
                        ("random_tokens", "random tokens knocked out (control)")):
        mo = s[name]["model_output"]
        rows.append({"run": label, "e2": _f(mo.get("e2_aligned_v2")), "e1v2": _f(mo.get("e1_v2")),
                     "e1v1": _f(mo.get("e1_v1")), "moved": _f(s[name]["output_moved"])})
    body += "<h3>The model's output</h3>" + H.table(
        rows, [("run", "run"), ("e2", "E.2 aligned v2"), ("e1v2", "E.1 v2"), ("e1v1", "E.1 v1"),
               ("moved", "distance to clean output")], "ko-output", text_columns=("run",), height=None)
    body += ('<p class="muted">Distance to the clean output: mean distance between the pointmaps after dividing each '
             "run by its mean point distance to view 1's camera (scale-free; 0 = unchanged). Frequent register tokens "
             f"of the knocked heads (token index = row·w + column): {esc(regs)}.</p>")
    body += H.image(d / "knockout.png", "probed errors before and after the knockout",
                    "Probed errors at every site: clean, register tokens knocked out, random tokens knocked out.")
    body += H.image(d / "knocked_heads.png", "the knocked-out heads' attention",
                    "The knocked-out heads on the easy pair, before the knockout: registers light the same patches "
                    "whatever the query.")
    body += ("<h3>4D comparison</h3>" + H.howto(
        "The slider alternates <i>clean</i> and <i>knockout</i> frames at each site from the knocked block on (hard "
        "pair). If the two frames of a site look alike, the registers did not carry what that site needs.")
             + _viewer(out, d / "viewer_compare.json", "mvv-knockout"))
    body += ('<div class="toolbar">' + H.download(d / "knockout.csv", root=out) + H.download(d / "knockout.json", root=out)
             + H.download(d / "registers.json", "registers.json (the spec)", root=out)
             + H.download(d / "random_tokens.json", "random_tokens.json", root=out)
             + '<span class="muted">re-run a spec: <code>mv-interp intervene knockout/registers.json --model … '
               "--pair a.png b.png</code></span></div>")
    per_site = data["rows"]
    cols = [("location", "location")] + [(f"{m}_{n}", f"{lab} · {nl}") for m, lab in
                                         (("e2_aligned_v2", "E.2"), ("e1_v2", "E.1 v2"))
                                         for n, nl in (("clean", "clean"), ("registers", "knockout"),
                                                       ("random_tokens", "control"))]
    body += ("<details><summary>per-site errors</summary>"
             + H.table(per_site, cols, "ko-sites", text_columns=("location",), height=None) + "</details>")
    return body


def _patching(ctx: dict, out: Path) -> str:
    info = ctx["records"].get("patching", {}).get("info", {})
    if not info:
        return '<p class="muted">(patching missing)</p>'
    n = len(info.get("pairs", []))
    body = H.howto(
        f"Clean run: {n} held-out pair(s). Corrupted run: the same view 1 with view 2 of another scene. Each cell "
        "copies one activation from the clean run into the corrupted run (for all tokens of that view) and measures "
        "how far the output still is from the clean output (scale-free pointmap distance over both views), "
        "normalised so that <b>0 = the clean output is fully restored</b> and <b>1 = as corrupted</b>. "
        "Rows are sites (<code>self</code>, <code>cross</code>, <code>mlp</code>: the residual after that skip; "
        "<code>*_out</code>: the sublayer's output before it) of view 1 (<code>.v1</code>) or view 2 (<code>.v2</code>); "
        "columns are decoder blocks. Low cells on view 2's residual show where the model carries what it knows "
        "about view 2; low cells on view 1 after the cross-attention show where that information has reached view 1.")
    for per, sw in info.get("sweeps", {}).items():
        d = out / "patching" / per
        title = "per site" if per == "site" else "per head (each head's output before the out-projection)"
        body += f"<h3>Patching {esc(title)}</h3>"
        body += H.image(d / "patching.png", f"patching per {per}",
                        f"Metric {esc(sw['metric'])}: clean {fmt(sw['clean'])}, corrupted {fmt(sw['corrupted'])}; "
                        f"{sw['cells']} cells in {fmt(sw['seconds'], 1)} s.")
        if sw.get("best"):
            cols = [("site", "site"), ("layer", "block")] + ([("head", "head")] if per == "head" else []) + \
                   [("value", "normalised distance (0 = restored)"), ("hook", "hook")]
            body += ("<details><summary>the cells that restore most</summary>"
                     + H.table(sw["best"], cols, f"patch-{per}", text_columns=("site", "hook"), height=None)
                     + "</details>")
        body += '<div class="toolbar">' + H.download(d / "patching.json", f"patching_{per}.json", root=out) + "</div>"
    return body


def _run(ctx: dict, out: Path) -> str:
    recs = ctx["records"]
    rows = [{"step": "prepare pairs", "what": "render or load the held-out pairs; pick the easy and hard pair",
             "status": "computed", "seconds": ctx["timings"].get("pairs", math.nan), "finished": ""}]
    for name, rec in recs.items():
        rows.append({"step": name, "what": ctx["titles"].get(name, ""),
                     "status": "reused" if rec["reused"] else "computed", "seconds": rec["seconds"],
                     "finished": rec["finished"].replace("T", " ")[:19]})
    rows.append({"step": "page", "what": "this page", "status": "computed",
                 "seconds": ctx["timings"].get("page", math.nan), "finished": ""})

    def cell(k: str, v: Any, r: dict) -> str | None:
        if k == "status":
            return f'<span class="tag {esc(v)}">{esc(v)}</span>'
        return None

    body = H.howto(
        "Every step writes its files into the output folder and an entry in <code>manifest.json</code>; running "
        "the same command again reuses finished steps (<i>reused</i>: the time shown is the original computation's), "
        "<code>--force</code> recomputes them, and an interrupted run resumes where it stopped.")
    body += "<h3>Timings</h3>" + H.table(rows, [("step", "step"), ("what", "what"), ("status", "status"),
                                                 ("seconds", "seconds"), ("finished", "finished (UTC)")],
                                         "timings", text_columns=("step", "what", "status", "finished"), cell=cell,
                                         height=None)
    body += (f'<p>This invocation: {fmt(ctx["timings"].get("total"), 1)} s wall time. '
             f'Command: <code>{esc(ctx.get("command", ""))}</code></p>')
    cfg_rows = [{"field": k, "value": json.dumps(v) if not isinstance(v, str) else v}
                for k, v in ctx["config"].items()]
    body += "<h3>Configuration</h3>" + H.table(cfg_rows, [("field", "field"), ("value", "value")], "config",
                                              text_columns=("field", "value"), height=None)
    body += ("<details><summary>data, model and environment (JSON)</summary><pre><code>"
             + esc(json.dumps({"data": ctx["data"], "model": ctx["model"], "environment": ctx["environment"]},
                              indent=1, default=str)) + "</code></pre></details>")
    card = ctx.get("model_card")
    body += "<h3>Model card</h3>"
    if card:
        body += f'<div class="card-md">{H.markdown(card)}</div>'
    else:
        body += ('<p class="muted">No model card was found (bundled models and HF-style directories carry a '
                 "README.md); the model's configuration is in the JSON above.</p>")
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file() and not p.name.startswith("."))
    body += (f"<details><summary>all {len(files)} files in the output folder</summary><pre><code>"
             + esc("\n".join(files)) + "</code></pre></details>")
    return body


def build_page(ctx: dict, out: Path) -> tuple[str, dict]:
    """The whole page and the headline facts (also written to ``summary.json``)."""
    from ..viz import viewer_assets

    summary, facts = _summary(ctx, out)
    parts = {
        "summary": ("At a glance", "The headline numbers of every analysis below.", summary),
        "geometry": ("4D: geometry through the network",
                     "Probed pointmaps of both views at every site, for an easy and a hard pair (the paper's Figure 3).",
                     _geometry(ctx, out)),
        "probes": ("Probe errors per site",
                   "How well each site's residual stream encodes the final geometry (the paper's Figure 4).",
                   _probes(ctx, out)),
        "heads": ("Attention heads: correspondence, register, local",
                  "Which heads match patches across views, which attend to a few fixed tokens (Figure 5).",
                  _heads(ctx, out)),
        "attention": ("Attention maps", "What selected heads look at, for a few query patches (Figure 15 style).",
                      _attention(ctx, out)),
        "knockout": ("Knocking out the register tokens",
                     "Do the register tokens carry global information such as the relative pose? (Appendix G)",
                     _knockout(ctx, out)),
        "patching": ("Activation patching",
                     "Which activations carry the information that view 2 shows the same scene?",
                     _patching(ctx, out)),
        "run": ("Run details", "Configuration, model card, timings and files.", _run(ctx, out)),
    }
    nav = "".join(f'<a href="#{sid}">{esc(title)}</a>' for sid, title in SECTIONS)
    model = ctx["model"]
    chips = [f"model <b>{esc(model['name'])}</b> ({esc(model.get('family', ''))}, "
             f"{model.get('parameters', 0) / 1e6:.1f} M parameters, input {esc('×'.join(map(str, model.get('img_size', []))))})",
             f"data: {esc(_data_label(ctx['data']))}",
             f"{ctx['config']['pairs']} held-out pairs", f"device {esc(ctx['environment'].get('device', ''))}",
             f"{fmt(ctx['timings'].get('total'), 0)} s"]
    head = (f'<header class="hero"><div class="wrap"><div class="sub">mv_interp report · '
            f'{esc(ctx.get("created", ""))}</div><h1>Inside {esc(model["name"])}: how a multi-view transformer builds '
            f'3D, layer by layer</h1><div class="sub">Probes, attention heads and causal interventions — the analysis '
            "of <i>Understanding Multi-View Transformers</i> on this model.</div>"
            f'<div class="chips">{"".join(f"<span class=chip>{c}</span>" for c in chips)}</div></div></header>')
    body = "".join(H.section(sid, title, lede, content) for sid, (title, lede, content) in parts.items())
    page = ("<!doctype html>\n<html lang='en'><head><meta charset='utf-8'>"
            "<meta name='viewport' content='width=device-width, initial-scale=1'>"
            f"<title>mv_interp report · {esc(model['name'])}</title><style>{H.CSS}</style>\n{viewer_assets()}</head>\n"
            f"<body>{head}<nav class='toc'><div class='wrap'>{nav}</div></nav><main class='wrap'>{body}</main>"
            "<footer class='wrap'>Made by <code>mv-interp report</code>. Everything on this page is inline; it opens "
            "from disk without a network. Figures are also PNG files, tables CSV/JSON, in the output folder.</footer>"
            f"<div id='lightbox'><img alt=''></div><script>{H.JS}</script></body></html>\n")
    return page, facts


def _data_label(data: dict) -> str:
    if data.get("source") == "synthetic":
        size = data.get("scene", {}).get("image_size")
        return f"synthetic rooms {'×'.join(map(str, size or []))}"
    if data.get("source") == "capture":
        return f"capture {Path(data.get('path', '')).name} ({data.get('tuples')} tuples)"
    return str(data.get("source", ""))

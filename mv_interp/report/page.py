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

from ..stats import NAN, Interval
from . import html as H
from ..viz.recording import RERUN_HINT
from .html import esc, fmt, pct
from .analysis import VARIANTS
from .verdicts import Verdict, agreement, judge, register_verdict

SECTIONS = (("summary", "At a glance"), ("paper", "The paper side by side"),
            ("geometry", "4D: geometry through the network"),
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


# --------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------


def _iv(d: Any) -> Interval:
    return Interval.from_dict(d) if isinstance(d, dict) else NAN


def ci(iv: Interval, as_pct: bool = False, signed: bool = False) -> str:
    """``0.703 [0.690, 0.716]``: a number with its 95 % interval (``–`` where there is none)."""
    if not math.isfinite(iv.estimate):
        return "–"
    f = (lambda v: pct(v, signed)) if as_pct else (lambda v: (f"{v:+.3f}" if signed else fmt(v)))
    band = f" <span class=ci>[{f(iv.low)}, {f(iv.high)}]</span>" if iv.finite else \
        " <span class=ci>[no interval]</span>"
    return f"{f(iv.estimate)}{band}"


def _flags(ctx: dict) -> tuple[str | None, str | None]:
    """(smoke flag for every card, flag for the probe-based cards: smoke or non-converged probes)."""
    cfg = ctx.get("config", {})
    smoke = "a --fast smoke run" if cfg.get("smoke") else None
    probe = smoke or ("probes that did not converge" if any("did not converge" in r for r in ctx.get("smoke", []))
                      else None)
    return smoke, probe


def _card(key: str, value: str, detail: str, v: Verdict | None = None) -> str:
    if v is not None:
        detail += f'<div class="verdict {v.status.replace(" ", "-")}">{esc(v.reason)}</div>'
    return H.stat(key, value, detail, v.css if v is not None else "")


def _summary(ctx: dict, out: Path) -> tuple[str, dict]:
    records = ctx["records"]
    pi = _load(out / "probes" / "eval" / "intervals.json") if "evaluate" in records else None
    metrics = _load(out / "probes" / "eval" / "metrics.json") if "evaluate" in records else None
    hi = _load(out / "heads" / "intervals.json") or {}
    heads = records.get("heads", {}).get("info", {})
    ko = records.get("knockout", {}).get("info", {})
    patch = records.get("patching", {}).get("info", {})
    smoke, probe_flag = _flags(ctx)
    cards, facts = [], {}
    no_gt = "needs ground truth (depth and cameras): run on synthetic rooms or with --data"
    if pi and metrics:
        trends = pi.get("trends", {}).get("mlp", {})
        for m, key, gloss in (("e2_aligned_v2", "aligned view-2 error (probes)", "view 2's shape"),
                              ("e1_v2", "view-2 error in view 1's frame", "shape and relative pose")):
            t = trends.get(m)
            if not t:
                continue
            change = _iv(t["change"])
            v = judge({t["from"]: change}, "below", smoke=probe_flag, what=f"the error at {t['to']}")
            facts[f"{m}_trend"] = {"from": t["from"], "to": t["to"], "start": t["start"], "end": t["end"],
                                   "change": t["change"], "verdict": v.to_dict()}
            cards.append(_card(key, f"{fmt(t['start']['estimate'])} → {fmt(t['end']['estimate'])}",
                               f"{esc(t['from'])} → {esc(t['to'])} ({gloss}); change {ci(change, signed=True)}", v))
        contrib = pi.get("contributions", {}).get("mlp")
        if contrib and contrib.get("by_kind"):
            bk = {k: _iv(x["total_rel_to_input"]) for k, x in contrib["by_kind"].items()}
            best = min(bk, key=lambda k: bk[k].estimate if math.isfinite(bk[k].estimate) else math.inf)
            v = judge({"no change": bk[best]}, "below", smoke=probe_flag, what=f"the {best} skips' total")
            facts["by_kind"] = {k: iv.to_dict() for k, iv in bk.items()}
            facts["fixes_most"] = {"kind": best, "verdict": v.to_dict()}
            parts = "; ".join(f"{k} {ci(iv, True, True)}" for k, iv in bk.items())
            cards.append(_card("who fixes view 2's shape (Figure 4)", f"{esc(best)} {pct(bk[best].estimate)}",
                               f"total change of the decoder-input error by skip kind: {parts}", v))
        gap = (pi.get("control_gap") or {}).get("mlp")
        if gap:
            change = _iv(gap["change"])
            v = judge({"the random-backbone control": change}, "below", smoke=probe_flag,
                      what="the trained model's probe error")
            facts["control_gap"] = {**gap, "verdict": v.to_dict()}
            cards.append(_card("probe vs random-backbone control",
                               f"{fmt(gap['probe']['estimate'])} vs {fmt(gap['control_error']['estimate'])}",
                               f"aligned view-2 error at {esc(gap['location'])}: difference {ci(change, signed=True)}",
                               v))
    elif ctx.get("photos"):
        cards.append(_card("probe errors along the network", "–", f"{no_gt}; the 4D view below shows the pointmap "
                                                                   "lens on your photos"))
    best = [b for b in hi.get("best_per_layer", []) if math.isfinite(_iv(b.get("recall_ci")).estimate)]
    if best:
        px = heads.get("primary_px", 16)
        key = f"{px:g}px"
        b = max(best, key=lambda b: b["recall"].get(key, 0))
        v = judge({"same position": _iv(b["vs_same_position"]), "uniform attention": _iv(b["vs_uniform"])}, "above",
                  smoke=smoke, what=f"{b['site']} h{b['head']}")
        facts["best_head"] = {**b, "verdict": v.to_dict()}
        cards.append(_card("best correspondence head (Figure 5)", ci(_iv(b["recall_ci"]), as_pct=True),
                           f"{esc(b['site'])} h{b['head']}: argmax within {key} of the true patch; same position "
                           f"{pct(b['same_position'][key], False)} "
                           f"(margin {ci(_iv(b['vs_same_position']), True, True)}),"
                           f" uniform attention {pct(b['chance'][key], False)}", v))
    elif heads and not heads.get("n_pairs_with_geometry", 1):
        cards.append(_card("best correspondence head (Figure 5)", "–", no_gt))
    if heads.get("counts"):
        c = heads["counts"]
        cards.append(H.stat("head labels", f"{c.get('correspondence', 0)} · {c.get('register', 0)} · "
                                           f"{c.get('local', 0)}",
                            f"correspondence · register · local, of {heads.get('n_heads')} scored head blocks"
                            + ("" if heads.get("n_pairs_with_geometry", 1) else
                               " (correspondence needs ground truth)")))
    if ko.get("summary"):
        iv = ko.get("intervals", {})
        contrasts = iv.get("contrasts", {})
        measure = "e2_aligned_v2" if "e2_aligned_v2" in iv else "moved"
        words = "the model's aligned view-2 error" if measure == "e2_aligned_v2" else "the model's output"
        rv = register_verdict(_iv(contrasts.get("registers_vs_random_tokens", {}).get(measure)),
                              _iv(contrasts["positive_vs_registers"][measure])
                              if "positive_vs_registers" in contrasts else None, words)
        if smoke:
            rv = Verdict("smoke", f"{smoke}: not judged")
        moved = iv.get("moved", {})
        facts["knockout"] = {"intervals": iv, "verdict": rv.to_dict()}
        if measure == "e2_aligned_v2":
            e2 = iv["e2_aligned_v2"]
            value = ci(_iv(e2["registers"]["vs_clean"]), signed=True)
            detail = (f"change of the model's aligned view-2 error (clean {fmt(e2['clean']['mean']['estimate'])}); "
                      f"random tokens {ci(_iv(e2['random_tokens']['vs_clean']), signed=True)}")
            if "positive" in e2:
                detail += f"; positive control {ci(_iv(e2['positive']['vs_clean']), signed=True)}"
        else:
            value = ci(_iv(moved.get("registers", {}).get("mean")))
            detail = (f"distance of the output to the clean one; random tokens "
                      f"{ci(_iv(moved.get('random_tokens', {}).get('mean')))}")
            if "positive" in moved:
                detail += f"; positive control {ci(_iv(moved['positive']['mean']))}"
        cards.append(_card("register knockout (Appendix G)", value,
                           detail + f" — {esc(ko['site'])} heads {ko['heads']}", rv))
    site = (patch.get("sweeps") or {}).get("site")
    if site and site.get("best"):
        b = site["best"][0]
        cards.append(H.stat("patching: most restoring site", f"{pct(1 - b['value'], False)}",
                            f"of the clean output restored by patching {esc(b['site'])} of block {b['layer']} "
                            f"alone ({len(patch.get('pairs', []))} pair(s), averaged: no interval)"))
    body = f'<div class="stats">{"".join(cards)}</div>'
    body += ('<p class="muted">Every interval is a 95 % percentile bootstrap over the '
             + ("photo pairs (one pair: no interval) " if ctx.get("photos") else "held-out pairs ")
             + f'({ctx.get("config", {}).get("bootstrap", "")} replicates, seeded: the same run gives the same '
             "intervals; <code>intervals.csv</code> beside each table). A card is green only when its interval "
             "supports the claim "
             "against the named baseline; otherwise it says why. Errors are in units of the ground truth's mean "
             "distance to view 1's camera (0 = perfect).</p>")
    return body, facts


def banner(reasons: list[str]) -> str:
    """The smoke-run banner: the page's numbers are not meaningful, and what to raise."""
    if not reasons:
        return ""
    items = "".join(f"<li>{esc(r)}</li>" for r in reasons)
    return (f'<div class="banner" id="smoke-banner" role="alert"><b>These numbers are not meaningful yet.</b>'
            f"<ul>{items}</ul>No card is green while this shows.</div>")


PAPER_CONTRIBUTIONS = (("self", -0.94, "below"), ("cross", 0.11, "above"), ("mlp", 0.07, "above"))


def _count_row(hi: dict, label: str, kind: str, layer_rank: int, same_view: bool) -> dict | None:
    rows = [r for r in hi.get("counts", []) if r["label"] == label and r["stack"] == "dec" and r["kind"] == kind
            and r["query_view"] == 2 and (r["key_view"] == 2) == same_view]
    layers = sorted({r["layer"] for r in rows})
    if len(layers) <= layer_rank:
        return None
    return next(r for r in rows if r["layer"] == layers[layer_rank])


def paper_rows(ctx: dict, out: Path) -> list[dict[str, Any]]:
    """The paper's quantitative claims beside this run's figure, its interval and the agreement."""
    records = ctx["records"]
    pi = _load(out / "probes" / "eval" / "intervals.json") if "evaluate" in records else None
    hi = _load(out / "heads" / "intervals.json") or {}
    heads = records.get("heads", {}).get("info", {})
    smoke, probe_flag = _flags(ctx)
    no_gt = "needs ground truth (depth and cameras)"
    rows = []

    def row(claim: str, paper: str, iv: Interval | None, status: str, reason: str, as_pct: bool = True,
            signed: bool = True, run: str | None = None, flag: str | None = None) -> None:
        if flag and status in ("agree", "disagree", "inconclusive"):
            status, reason = "not judged", f"{flag}: {reason}"
        rows.append({"claim": claim, "paper": paper, "run": run if run is not None else
                     (ci(iv, as_pct, signed) if iv is not None else "–"), "status": status, "reason": reason,
                     "interval": iv.to_dict() if iv is not None else None})

    contrib = (pi or {}).get("contributions", {}).get("mlp", {}).get("by_kind", {})
    for kind, value, side in PAPER_CONTRIBUTIONS:
        claim = f"{kind} skips change the decoder-input aligned view-2 error by (total over blocks, Fig. 4)"
        if kind in contrib:
            iv = _iv(contrib[kind]["total_rel_to_input"])
            status, reason = agreement(iv, side=side)
            row(claim, pct(value), iv, status, reason + " (the sign is compared; sizes differ by model and data)",
                flag=probe_flag)
        else:
            row(claim, pct(value), None, "not measurable here", no_gt if ctx.get("photos") else "no contributions")
    claim = ("best correspondence head's recall rises from ≈40 % at the decoder input to > 60 % after six blocks "
             "(Fig. 5)")
    groups = [b for b in hi.get("best_per_layer", []) if b.get("group_change")]
    pick = [b for b in groups if b["kind"] == "cross" and b["query_view"] == 2] or groups
    if pick:
        g = pick[0]["group_change"]
        same = [b for b in pick if (b["stack"], b["kind"], b["query_view"], b["key_view"]) ==
                (pick[0]["stack"], pick[0]["kind"], pick[0]["query_view"], pick[0]["key_view"])]
        first = next(b for b in same if b["layer"] == g["from_layer"])
        end = next(b for b in same if b["layer"] == g["to_layer"])
        iv = _iv(g["change"])
        status, reason = agreement(iv, side="above")
        note = "" if g["layers"] >= 6 else f" (this model has {g['layers']} such layers: compared at the last)"
        row(claim, "+20 points or more", iv, status, reason + note, flag=smoke,
            run=f"{ci(_iv(first['recall_ci']), True)} → {ci(_iv(end['recall_ci']), True)}; "
                f"change {ci(iv, True, True)}")
    else:
        row(claim, "≈40 % → > 60 %", None, "not measurable here",
            no_gt if not heads.get("n_pairs_with_geometry", 1) else "no cross-view attention with two or more layers")
    for label, kind, rank, same_view, paper_n, claim in (
            ("correspondence", "cross", 0, False, 5,
             "≈ 5 of 12 heads of decoder block 1's cross-attention are correspondence heads"),
            ("register", "self", 1, True, 4, "4 of 12 heads of decoder block 2's (view-2) self-attention are "
                                             "register heads")):
        r = _count_row(hi, label, kind, rank, same_view)
        if r is None:
            why = no_gt if label == "correspondence" and not heads.get("n_pairs_with_geometry", 1) else \
                f"no decoder {kind}-attention block {rank + 1} scored for {label}"
            row(claim, f"{paper_n}/12", None, "not measurable here", why)
            continue
        n = r["n_heads"]
        share = _iv(r).scaled(1 / n)
        status, reason = agreement(share, band=((paper_n - 1) / 12, (paper_n + 1) / 12))
        row(claim, f"{paper_n}/12 = {pct(paper_n / 12, False)}", share, status,
            reason + f" (paper ± 1 head, as a share of the block's {n} heads; {r['site']})", flag=smoke,
            run=f"{fmt(r['estimate'], 0)}/{n} heads; share {ci(share, True)}")
    return rows


def _paper(ctx: dict, out: Path, rows: list[dict]) -> str:
    body = H.howto(
        "Each quantitative claim of <i>Understanding Multi-View Transformers</i> (on DUSt3R ViT-Large, HM3D) beside "
        "this run's figure with its 95 % interval. <b>agree</b>: the whole interval lies on the paper's side (or in "
        "its range); <b>disagree</b>: entirely on the other side; <b>inconclusive</b>: the interval straddles; "
        "<b>not measurable here</b>: this run has no such number (no ground truth, no such block); <b>not "
        "judged</b>: a smoke run or unconverged probes.")

    def cell(k: str, v: Any, r: dict) -> str | None:
        if k == "status":
            return f'<span class="pill v-{esc(str(v).replace(" ", "-"))}">{esc(v)}</span>'
        if k == "run":
            return str(v)
        return None

    body += H.table(rows, [("claim", "the paper's claim"), ("paper", "paper"), ("run", "this run (95 % interval)"),
                           ("status", "verdict"), ("reason", "why")], "paper-table",
                    text_columns=("claim", "paper", "run", "status", "reason"), cell=cell, height=None)
    return body


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
        if ctx.get("photos"):
            title = f"Pair {s.get('index', 0) + 1}: {esc(' + '.join(s.get('files', [])))}"
            about = "your photos (no ground truth: overlap and rotation unknown)"
        else:
            title = f"{label.capitalize()} pair"
            about = (f'overlap {pct(s.get("overlap"), False)} of view 2 visible in view 1 · relative rotation '
                     f'{fmt(s.get("rotation_deg"), 1)}° · held-out pair #{s.get("index")}')
        lens_text = "the pointmap lens (the model's own head on each site, no training)"
        if (out / "views" / f"viewer_{label}_mlp.json").is_file():
            shown = (_viewer(out, out / "views" / f"viewer_{label}_mlp.json", f"mvv-{label}-mlp")
                     + f"<details><summary>the same pair through {lens_text}</summary>{lens}</details>")
        else:
            shown = f'<div class="muted">through {lens_text}</div>{lens}'
        cards.append(
            f'<div class="pair"><h3>{title}</h3><div class="muted">{about}</div>'
            f'<div class="thumbs">{thumbs}</div>' + shown
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
    ivs = _load(out / "probes" / "eval" / "intervals.json") or {}
    band = {(r["method"], r["location"], r["metric"]): Interval.from_dict(r) for r in ivs.get("sites", [])}
    for row in rows:
        for m in methods:
            iv = band.get((m, row["location"], "e2_aligned_v2"))
            if iv is not None and iv.finite:
                row[f"{m}:e2ci"] = f"[{fmt(iv.low)}, {fmt(iv.high)}]"
    model_out = _load(out / "probes" / "eval" / "model_output.json") or {}
    if model_out:
        row = {"i": len(locs), "location": "model output"}
        for c in ("e2_aligned_v2", "e1_v2", "e1_v1"):
            row[f"mlp:{c}"] = _f(model_out.get(c))
        rows.append(row)
    cols = [("i", "#"), ("location", "location")]
    for c, name in (("e2_aligned_v2", "E.2 aligned v2"), ("e1_v2", "E.1 v2"), ("e1_v1", "E.1 v1")):
        for m in methods:
            cols.append((f"{m}:{c}", f"{name} · {m}"))
            if c == "e2_aligned_v2":
                cols.append((f"{m}:e2ci", f"95 % interval · {m}"))
    ci_cols = tuple(k for k, _ in cols if k.endswith(":e2ci"))
    return H.table(rows, cols, "probe-table", text_columns=("location",) + ci_cols, height=None)


def _probes(ctx: dict, out: Path) -> str:
    d = out / "probes" / "eval"
    metrics = _load(d / "metrics.json") if "evaluate" in ctx["records"] else None
    if metrics is None:
        if ctx.get("photos"):
            return ('<p class="needs-gt">Probe errors need ground truth (depth and cameras) for every pixel; plain '
                    "photos have none. Run <code>mv-interp report</code> on synthetic rooms, or on a capture with "
                    "<code>--data</code>, for this section. The 4D view above shows what the model's own head reads "
                    "from each site of your photos (the pointmap lens); <code>--probes DIR</code> adds probes trained "
                    "on synthetic rooms.</p>")
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
                    f"Probed errors at every site on {n} held-out pairs (GT-normalised units); shaded: the 95 % "
                    "interval of each curve (bootstrap over pairs).")
    body += H.image(d / "contributions.png", "sublayer contributions (Figure 4)",
                    "Relative change of the aligned view-2 error across each skip connection; error bars: 95 % "
                    "intervals per block and kind.")
    body += "<h3>Every site, every method</h3>" + _probe_table(metrics, out)
    body += ('<div class="toolbar">' + H.download(d / "metrics.csv", root=out) + H.download(d / "metrics.json", root=out)
             + H.download(d / "contributions.csv", root=out) + H.download(d / "intervals.csv", root=out)
             + H.download(d / "intervals.json", root=out) + "</div>")
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
    if not scores.get("n_pairs_with_geometry"):
        body += ('<p class="needs-gt">Correspondence recall needs ground truth (which patch of view 1 each patch '
                 "of view 2 shows, from depth and cameras); these photos have none, so only the register and local "
                 "scores below are measured, and no head is labelled correspondence.</p>")
    curve = d / "correspondence_curve_ci.png"
    body += H.image(curve if curve.is_file() else d / "correspondence_curve.png",
                    "best correspondence head per layer (Figure 5)",
                    f"Recall@{px:g}px of the best head per layer with its 95 % interval (shaded), against the "
                    "same-position and uniform-attention baselines.")
    body += H.image(d / "correspondence_lines.png", "correspondences of the best head per layer",
                    "On the easy pair: each line joins a view-2 query patch to the view-1 patch the layer's best head "
                    "attends to most — green within the threshold of the true match, red otherwise.")
    body += H.image(d / "labels.png", "head labels", "Labels of every head (C correspondence, R register, L local).")
    body += heat_tables(scores["rows"], _load(d / "intervals.json") or {})
    maps = sorted((d / "heatmaps").glob("heatmap_*.png"))
    first = [p for p in maps if "corr_recall" in p.name or "register_lift" in p.name]
    rest = [p for p in maps if p not in first]
    if first or rest:
        body += ("<details><summary>heatmaps as figures (" + ", ".join(esc(p.stem[8:]) for p in first + rest)
                 + ")</summary>" + '<div class="grid2">'
                 + "".join(H.image(p, p.stem, _heatmap_caption(p.stem)) for p in first + rest) + "</div></details>")
    ivs = _load(d / "intervals.json") or {}
    rows = scores["rows"]
    by = {(r["site"], r["query_view"], r["key_view"], r["head"], r["score"]): Interval.from_dict(r)
          for r in ivs.get("heads", [])}
    th = scores.get("thresholds", {})
    for r in rows:
        key = (r["site"], r["query_view"], r["key_view"], r["head"])
        rc = by.get(key + ("recall",))
        if rc is not None and rc.finite:
            r["recall_ci"] = f"[{pct(rc.low, False)}, {pct(rc.high, False)}]"
        r["evidence"] = evidence(r, by, key, px, th)
    cols = [("site", "site"), ("qk", "query→key"), ("head", "head"), ("labels", "labels"), ("evidence", "evidence"),
            (rec, f"recall@{px:g}px"), ("recall_ci", "95 % interval"),
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
    body += H.table(rows, cols, "heads-table", text_columns=("site", "qk", "labels", "register_tokens", "evidence",
                                                             "recall_ci"), cell=cell, filter_box=True)
    body += ('<div class="toolbar">' + H.download(d / "scores.csv", root=out) + H.download(d / "scores.json", root=out)
             + '<span class="muted">the JSON adds the thresholds, the best head per layer and the register heads with '
               "their tokens; <code>mv-interp heads relabel</code> re-labels with other thresholds</span></div>")
    return body


def evidence(r: dict, by: dict, key: tuple, px: float, th: dict) -> str:
    """Why a head has its label: the score, the baseline it beats and the threshold."""
    parts = []
    labels = str(r.get("labels", "")).split("+")
    if "correspondence" in labels:
        vs = by.get(key + ("vs_same_position",))
        parts.append(f"recall {pct(_f(r.get(f'corr_recall@{px:g}px')), False)} vs same position "
                     f"{pct(_f(r.get(f'corr_same_pos@{px:g}px')), False)}"
                     + (f" (margin [{pct(vs.low)}, {pct(vs.high)}])" if vs is not None and vs.finite else ""))
    if "register" in labels:
        iv = by.get(key + ("register_lift",))
        parts.append(f"register lift {fmt(_f(r.get('register_lift')), 2)} ≥ {th.get('register_lift', 0.5):g}"
                     + (f" [{fmt(iv.low, 2)}, {fmt(iv.high, 2)}]" if iv is not None and iv.finite else ""))
    if "local" in labels:
        iv = by.get(key + ("local_lift",))
        parts.append(f"local lift {fmt(_f(r.get('local_lift')), 2)} ≥ {th.get('local_lift', 0.5):g}"
                     + (f" [{fmt(iv.low, 2)}, {fmt(iv.high, 2)}]" if iv is not None and iv.finite else ""))
    return "; ".join(parts)


HEAT_SCORES = (("corr_recall", "correspondence recall"), ("register_lift", "register lift"),
               ("local_lift", "local lift"))


def heat_tables(rows: list[dict], ivs: dict) -> str:
    """Readable heatmaps: per block group, a layer × head grid with the value printed in each cell
    (hover: the value, its 95 % interval and the labels), for the main scores."""
    px_cols = [k for k in (rows[0] if rows else {}) if k.startswith("corr_recall@")]
    by = {(r["site"], r["query_view"], r["key_view"], r["head"], r["score"]): Interval.from_dict(r)
          for r in ivs.get("heads", [])}
    out = []
    for score, title in HEAT_SCORES:
        col = px_cols[len(px_cols) // 2] if score == "corr_recall" and px_cols else score
        iv_name = "recall" if score == "corr_recall" else score
        groups: dict[tuple, list[dict]] = {}
        for r in rows:
            if isinstance(r.get(col), (int, float)) and math.isfinite(r[col]):
                groups.setdefault((r["stack"], r["kind"], r["query_view"], r["key_view"]), []).append(r)
        if not groups:
            continue
        grids = []
        for (stack, kind, qv, kv), rs in groups.items():
            layers = sorted({r["layer"] for r in rs})
            heads = sorted({r["head"] for r in rs})
            cell = {(r["layer"], r["head"]): r for r in rs}
            trs = ["<tr><th></th>" + "".join(f"<th>h{h}</th>" for h in heads) + "</tr>"]
            for layer in layers:
                tds = []
                for h in heads:
                    r = cell.get((layer, h))
                    if r is None:
                        tds.append("<td></td>")
                        continue
                    v = float(r[col])
                    iv = by.get((r["site"], r["query_view"], r["key_view"], h, iv_name))
                    tip = f"{r['site']} {qv}→{kv} h{h}: {title} {v:.3f}"
                    if iv is not None and iv.finite:
                        tip += f" [{iv.low:.3f}, {iv.high:.3f}]"
                    tip += f" · {r.get('labels', '')}"
                    a = max(0.0, min(1.0, v))
                    ink = "#fff" if a > 0.6 else "#1d2330"
                    tds.append(f'<td title="{esc(tip)}" style="background:rgba(53,88,216,{a:.2f});color:{ink}">'
                               f"{100 * v:.0f}</td>")
                trs.append(f"<tr><th>{esc(stack)}{layer}</th>{''.join(tds)}</tr>")
            grids.append(f'<div class="heat"><div class="muted">{esc(stack)} {esc(kind)} · v{qv}→v{kv}</div>'
                         f'<table class="heat">{"".join(trs)}</table></div>')
        out.append(f"<h3>{esc(title)} per layer and head (×100; hover a cell for its interval)</h3>"
                   f'<div class="heats">{"".join(grids)}</div>')
    return "".join(out)


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
        counts = ctx["records"].get("heads", {}).get("info", {}).get("counts", {})
        if counts.get(label, 1):
            why = f"the block with the strongest {esc(label)} heads"
        else:
            why = (f"the block with the highest {esc(label)} score; <b>no head passed the {esc(label)} threshold</b>, "
                   f"so none is labelled {esc(label)}")
        body += H.image(p, p.stem, f"Every head of <code>{esc(site)}</code> ({why}) on the easy pair.")
    return body


def _raw(*columns: str):
    """A table cell callback that shows these columns' values as built (numbers with interval markup)."""
    def cell(k: str, v: Any, r: dict) -> str | None:
        return str(v) if k in columns and isinstance(v, str) else None

    return cell


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
        "would rise. Two controls: the same knockout on as many <i>random</i> tokens in the same heads (what "
        "removing any few keys does), and a <b>positive control</b> — the strongest correspondence heads "
        + (f"(<code>{esc(data['positive']['site'])}</code> heads {data['positive']['heads']}: "
           f"{esc(data['positive']['rule'])}) " if data.get("positive") else "")
        + "knocked out entirely (every key), which shows that a knockout of this size <i>can</i> hurt this model. "
        "The registers carry information only if their knockout moves the output more than random tokens do, and "
        "that reading counts only if the positive control moves it clearly.")
    s = data["summary"]
    ivs = data.get("intervals", {})
    e2 = ivs.get("e2_aligned_v2", {})
    mv = ivs.get("moved", {})
    rows = []
    for name, label in VARIANTS.items():
        if name not in s:
            continue
        mo = s[name]["model_output"]
        rows.append({"run": label, "e2": _f(mo.get("e2_aligned_v2")),
                     "e2ci": ci(_iv(e2.get(name, {}).get("vs_clean")), signed=True) if name != "clean" and e2 else "",
                     "e1v2": _f(mo.get("e1_v2")), "e1v1": _f(mo.get("e1_v1")),
                     "moved": ci(_iv(mv.get(name, {}).get("mean"))) if name != "clean" else "0"})
    cols = [("run", "run")]
    if e2:
        cols += [("e2", "E.2 aligned v2"), ("e2ci", "change vs clean (95 %)"), ("e1v2", "E.1 v2"), ("e1v1", "E.1 v1")]
    cols += [("moved", "distance to clean output (95 %)")]
    body += "<h3>The model's output</h3>" + H.table(rows, cols, "ko-output", text_columns=("run", "e2ci", "moved"),
                                                    cell=_raw("e2ci", "moved"), height=None)
    if not e2:
        body += ('<p class="needs-gt">Errors against the truth need ground truth; without it the knockout is '
                 "measured by how far the model's own output moves.</p>")
    contrasts = ivs.get("contrasts", {})
    if contrasts:
        crow = []
        for key, label in (("registers_vs_random_tokens", "registers − random tokens"),
                           ("positive_vs_registers", "positive control − registers"),
                           ("positive_vs_random_tokens", "positive control − random tokens")):
            if key in contrasts:
                crow.append({"contrast": label, **{m: ci(_iv(v), signed=True) for m, v in contrasts[key].items()}})
        ccols = [("contrast", "paired difference")] + [(m, {"moved": "distance to clean output",
                                                            "e2_aligned_v2": "E.2 aligned v2"}[m])
                                                       for m in next(iter(contrasts.values()))]
        body += "<h3>Against the controls (same pairs)</h3>" + H.table(
            crow, ccols, "ko-contrasts", text_columns=tuple(k for k, _ in ccols),
            cell=_raw(*(k for k, _ in ccols[1:])), height=None)
    body += ('<p class="muted">Distance to the clean output: mean distance between the pointmaps after dividing each '
             "run by its mean point distance to view 1's camera (scale-free; 0 = unchanged). Frequent register tokens "
             f"of the knocked heads (token index = row·w + column): {esc(regs)}.</p>")
    if (d / "knockout.png").is_file():
        body += H.image(d / "knockout.png", "probed errors before and after the knockout",
                        "Probed errors at every site: clean, register tokens and random tokens knocked out (the "
                        "positive control is measured on the output, above).")
    body += H.image(d / "knocked_heads.png", "the knocked-out heads' attention",
                    "The knocked-out heads on the easy pair, before the knockout (titles: each head's score and the "
                    "threshold it passed). Register heads light the same patches whatever the query"
                    + ("." if "highest" not in data.get("head_rule", "") else
                       "; here no head passed the register threshold, so these are the closest candidates, not "
                       "registers."))
    if (d / "positive_heads.png").is_file():
        body += H.image(d / "positive_heads.png", "the positive control's heads",
                        "The positive control's heads on the easy pair (titles: score and the baseline beaten).")
    body += ("<h3>4D comparison</h3>" + H.howto(
        "The slider alternates <i>clean</i> and <i>knockout</i> frames at each site from the knocked block on (hard "
        "pair). If the two frames of a site look alike, the registers did not carry what that site needs.")
             + _viewer(out, d / "viewer_compare.json", "mvv-knockout"))
    body += ('<div class="toolbar">' + H.download(d / "knockout.csv", root=out) + H.download(d / "knockout.json", root=out)
             + H.download(d / "registers.json", "registers.json (the spec)", root=out)
             + H.download(d / "random_tokens.json", "random_tokens.json", root=out)
             + H.download(d / "positive.json", "positive.json (positive control)", root=out)
             + '<span class="muted">re-run a spec: <code>mv-interp intervene knockout/registers.json --model … '
               "--pair a.png b.png</code></span></div>")
    per_site = data["rows"]
    cols = [("location", "location")] + [(f"{m}_{n}", f"{lab} · {nl}") for m, lab in
                                         (("e2_aligned_v2", "E.2"), ("e1_v2", "E.1 v2"))
                                         for n, nl in (("clean", "clean"), ("registers", "knockout"),
                                                       ("random_tokens", "control"), ("positive", "positive"))
                                         if per_site and f"{m}_{n}" in per_site[0]]
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


def header_chips(ctx: dict) -> list[str]:
    """The header's facts: model, data, the number of pairs actually measured, device, time."""
    model = ctx["model"]
    n_views = int(ctx["config"].get("views", 2))
    unit = "pair(s)" if n_views == 2 else f"example(s) of {n_views} views (view 1 the reference frame)"
    pairs = (f"{ctx.get('pairs_used')} photo {unit}, no ground truth" if ctx.get("photos") else
             f"{ctx.get('pairs_used', ctx['config']['pairs'])} held-out {unit.replace('(s)', 's')}")
    return [f"model <b>{esc(model['name'])}</b> ({esc(model.get('family', ''))}, "
            f"{model.get('parameters', 0) / 1e6:.1f} M parameters, "
            f"input {esc('×'.join(map(str, model.get('img_size', []))))})",
            f"data: {esc(_data_label(ctx['data']))}", pairs, f"device {esc(ctx['environment'].get('device', ''))}",
            f"{fmt(ctx['timings'].get('total'), 0)} s"]


def build_page(ctx: dict, out: Path) -> tuple[str, dict]:
    """The whole page and the headline facts (also written to ``summary.json``)."""
    from ..viz import viewer_assets

    summary, facts = _summary(ctx, out)
    facts["paper"] = paper_rows(ctx, out)
    facts["smoke"] = list(ctx.get("smoke", []))
    parts = {
        "summary": ("At a glance", "The headline numbers of every analysis below.", summary),
        "paper": ("The paper side by side", "Each of the paper's quantitative claims against this run.",
                  _paper(ctx, out, facts["paper"])),
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
    chips = header_chips(ctx)
    head = (f'<header class="hero"><div class="wrap"><div class="sub">mv_interp report · '
            f'{esc(ctx.get("created", ""))}</div><h1>Inside {esc(model["name"])}: how a multi-view transformer builds '
            f'3D, layer by layer</h1><div class="sub">Probes, attention heads and causal interventions — the analysis '
            "of <i>Understanding Multi-View Transformers</i> on this model.</div>"
            f'<div class="chips">{"".join(f"<span class=chip>{c}</span>" for c in chips)}</div></div></header>')
    body = "".join(H.section(sid, title, lede, content) for sid, (title, lede, content) in parts.items())
    page = ("<!doctype html>\n<html lang='en'><head><meta charset='utf-8'>"
            "<meta name='viewport' content='width=device-width, initial-scale=1'>"
            f"<title>mv_interp report · {esc(model['name'])}</title><style>{H.CSS}</style>\n{viewer_assets()}</head>\n"
            f"<body>{head}<nav class='toc'><div class='wrap'>{nav}</div></nav><main class='wrap'>"
            f"{banner(list(ctx.get('smoke', [])))}{body}</main>"
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
    if data.get("source") == "images":
        return "your photos: " + ", ".join(Path(f).name for f in data.get("files", []))
    return str(data.get("source", ""))

"""HTML building blocks of the report: one self-contained page (inline CSS/JS, images as data URIs).

Nothing here knows about models; :mod:`mv_interp.report.page` assembles the sections.
"""

from __future__ import annotations

import base64
import html
import math
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

esc = html.escape

CSS = """
:root { --bg: #f4f5f7; --card: #fff; --ink: #1d2330; --muted: #5d6675; --line: #e2e5ea; --accent: #3558d8;
        --accent-soft: #eef2fd; --good: #2c8a4b; --bad: #c23b3b; --warn: #b7791f; }
* { box-sizing: border-box; }
html { scroll-behavior: smooth; scroll-padding-top: 64px; }
body { margin: 0; background: var(--bg); color: var(--ink); line-height: 1.5;
       font: 15px/1.55 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
a { color: var(--accent); }
code, pre, .mono { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 0.88em; }
code { background: #eef0f3; padding: 1px 4px; border-radius: 4px; }
pre { background: #f6f7f9; border: 1px solid var(--line); border-radius: 6px; padding: 10px 12px; overflow: auto;
      max-height: 420px; }
pre code { background: none; padding: 0; }
header.hero { background: linear-gradient(120deg, #1f2a4d 0%, #2f4aa8 60%, #3a6fd8 100%); color: #fff;
              padding: 30px 0 26px; }
header.hero h1 { margin: 0 0 6px; font-size: 28px; font-weight: 650; letter-spacing: -0.01em; }
header.hero .sub { opacity: 0.88; font-size: 14px; }
header.hero .chips { margin-top: 12px; display: flex; flex-wrap: wrap; gap: 8px; }
header.hero .chip { background: rgba(255,255,255,0.14); border-radius: 999px; padding: 3px 11px; font-size: 13px; }
.wrap { max-width: 1360px; margin: 0 auto; padding: 0 24px; }
nav.toc { position: sticky; top: 0; z-index: 10; background: rgba(255,255,255,0.96); border-bottom: 1px solid var(--line);
          backdrop-filter: blur(6px); }
nav.toc .wrap { display: flex; gap: 2px; overflow-x: auto; white-space: nowrap; scrollbar-width: none; }
nav.toc a { display: inline-block; padding: 11px 9px; text-decoration: none; color: var(--muted); font-size: 14px;
            border-bottom: 2px solid transparent; }
nav.toc a:hover { color: var(--ink); border-bottom-color: var(--accent); }
main { padding: 8px 0 40px; }
section.card { background: var(--card); border: 1px solid var(--line); border-radius: 10px; margin: 22px 0;
               padding: 20px 24px 22px; box-shadow: 0 1px 2px rgba(16,24,40,0.04); }
section.card > h2 { margin: 0 0 4px; font-size: 21px; font-weight: 650; letter-spacing: -0.01em; }
section.card > .lede { color: var(--muted); margin: 0 0 14px; }
h3 { font-size: 16px; margin: 20px 0 8px; }
.howto { background: var(--accent-soft); border-left: 3px solid var(--accent); border-radius: 0 6px 6px 0;
         padding: 9px 14px; margin: 10px 0 16px; font-size: 14px; }
.howto b:first-child { color: var(--accent); }
.howto p { margin: 4px 0; }
.grid2 { display: grid; grid-template-columns: repeat(auto-fit, minmax(560px, 1fr)); gap: 18px; align-items: start; }
.stats { display: grid; grid-template-columns: repeat(auto-fit, minmax(250px, 1fr)); gap: 12px; margin: 8px 0 4px; }
.stat { border: 1px solid var(--line); border-radius: 8px; padding: 12px 14px; background: #fbfcfd; }
.stat .k { font-size: 12px; text-transform: uppercase; letter-spacing: 0.04em; color: var(--muted); }
.stat .v { font-size: 22px; font-weight: 650; margin: 2px 0; }
.stat .d { font-size: 13px; color: var(--muted); }
.good { color: var(--good); } .bad { color: var(--bad); } .warn { color: var(--warn); }
.stat .v .ci, .ci { font-size: 0.62em; font-weight: 500; color: var(--muted); white-space: nowrap; }
.stat .verdict { margin-top: 6px; font-size: 12px; color: var(--ink); border-top: 1px dashed var(--line);
                 padding-top: 5px; }
.stat .verdict.supported { color: var(--good); }
.banner { background: #fff4e0; border: 1px solid #f0c36d; border-left: 5px solid var(--warn); border-radius: 8px;
          padding: 12px 16px; margin: 18px 0 0; font-size: 14px; }
.banner ul { margin: 6px 0; padding-left: 20px; }
.heats { display: flex; flex-wrap: wrap; gap: 14px; margin: 6px 0 12px; }
table.heat { border-collapse: collapse; font-size: 11px; }
table.heat td, table.heat th { padding: 2px 5px; text-align: center; min-width: 26px; border: 1px solid #fff; }
table.heat th { color: var(--muted); font-weight: 500; }
.needs-gt { background: #f3f4f7; border: 1px dashed #b8bec8; border-radius: 6px; padding: 9px 13px; }
span.pill { display: inline-block; padding: 0 8px; border-radius: 999px; font-size: 12px; line-height: 20px;
            background: #e8eaee; color: var(--ink); white-space: nowrap; }
span.pill.v-agree { background: #d8f0df; color: #1d6b37; } span.pill.v-disagree { background: #f8dcdc; color: #8f2525; }
figure { margin: 12px 0 18px; }
figure img { max-width: 100%; height: auto; border: 1px solid var(--line); border-radius: 6px; background: #fff;
             cursor: zoom-in; display: block; }
figcaption { font-size: 13px; color: var(--muted); margin-top: 6px; }
.pair { border: 1px solid var(--line); border-radius: 8px; padding: 12px; background: #fbfcfd; }
.pair h3 { margin: 0 0 6px; }
.thumbs { display: flex; gap: 8px; margin: 6px 0 8px; align-items: flex-end; }
.thumbs figure { margin: 0; } .thumbs img { width: 112px; cursor: default; }
.mvv { display: block !important; margin: 6px 0 !important; }
.mvv-canvas { width: 100%; height: auto; }
details { margin: 8px 0; }
details > summary { cursor: pointer; color: var(--accent); font-size: 14px; }
table.data { border-collapse: collapse; width: 100%; font-size: 13px; }
table.data th, table.data td { border-bottom: 1px solid var(--line); padding: 5px 8px; text-align: right; }
table.data th { background: #f7f8fa; position: sticky; top: 0; cursor: pointer; user-select: none; white-space: nowrap;
                font-weight: 600; }
table.data th.sorted-asc::after { content: " ▲"; font-size: 10px; } table.data th.sorted-desc::after { content: " ▼"; font-size: 10px; }
table.data td.t, table.data th.t { text-align: left; }
table.data tr:hover td { background: #f5f8ff; }
.tablebox { max-height: 520px; overflow: auto; border: 1px solid var(--line); border-radius: 6px; }
.toolbar { display: flex; gap: 10px; align-items: center; margin: 8px 0; flex-wrap: wrap; font-size: 13px; }
.toolbar input { padding: 5px 8px; border: 1px solid var(--line); border-radius: 6px; min-width: 240px; }
a.dl { display: inline-block; padding: 3px 10px; border: 1px solid var(--line); border-radius: 999px; font-size: 13px;
       text-decoration: none; background: #fff; }
a.dl:hover { border-color: var(--accent); }
.tag { display: inline-block; padding: 0 7px; border-radius: 999px; font-size: 12px; line-height: 18px; color: #fff; }
.tag.correspondence { background: #2ca02c; } .tag.register { background: #d62728; } .tag.local { background: #1f77b4; }
.tag.other { background: #b8bec8; } .tag.reused { background: #8a94a6; } .tag.computed { background: #2c8a4b; }
.card-md h1 { font-size: 19px; } .card-md h2 { font-size: 16px; } .card-md h3 { font-size: 15px; }
.card-md table { border-collapse: collapse; font-size: 13px; margin: 8px 0; }
.card-md td, .card-md th { border: 1px solid var(--line); padding: 3px 8px; }
.muted { color: var(--muted); }
#lightbox { position: fixed; inset: 0; background: rgba(10,14,24,0.86); display: none; align-items: center;
            justify-content: center; z-index: 50; cursor: zoom-out; padding: 24px; }
#lightbox img { max-width: 100%; max-height: 100%; background: #fff; border-radius: 6px; }
footer { color: var(--muted); font-size: 13px; padding: 10px 0 40px; }
@media (max-width: 700px) { .grid2 { grid-template-columns: 1fr; } .toolbar input { min-width: 0; } }
"""

JS = r"""
(function () {
  "use strict";
  function cellValue(td) {
    const v = td.getAttribute("data-v"); const s = v !== null ? v : td.textContent.trim();
    const n = parseFloat(s); return (s !== "" && !isNaN(n) && isFinite(n)) ? n : (s === "" || s === "–" ? null : s.toLowerCase());
  }
  function sortTable(table, col, th) {
    const body = table.tBodies[0]; const rows = Array.from(body.rows);
    const asc = th.classList.contains("sorted-asc") ? false : (th.classList.contains("sorted-desc") ? true :
                th.getAttribute("data-first") !== "desc");
    table.querySelectorAll("th").forEach(h => h.classList.remove("sorted-asc", "sorted-desc"));
    th.classList.add(asc ? "sorted-asc" : "sorted-desc");
    rows.sort((a, b) => {
      const x = cellValue(a.cells[col]), y = cellValue(b.cells[col]);
      if (x === null && y === null) return 0; if (x === null) return 1; if (y === null) return -1;
      if (typeof x === "number" && typeof y === "number") return asc ? x - y : y - x;
      return asc ? String(x).localeCompare(String(y)) : String(y).localeCompare(String(x));
    });
    rows.forEach(r => body.appendChild(r));
  }
  document.querySelectorAll("table.sortable").forEach(table => {
    table.querySelectorAll("thead th").forEach((th, i) => th.addEventListener("click", () => sortTable(table, i, th)));
  });
  document.querySelectorAll("input.table-filter").forEach(input => {
    const table = document.getElementById(input.getAttribute("data-table"));
    const count = document.getElementById(input.getAttribute("data-count"));
    const update = () => {
      const terms = input.value.toLowerCase().split(/\s+/).filter(Boolean); let shown = 0;
      Array.from(table.tBodies[0].rows).forEach(r => {
        const text = r.textContent.toLowerCase(); const ok = terms.every(t => text.indexOf(t) >= 0);
        r.style.display = ok ? "" : "none"; if (ok) shown++;
      });
      if (count) count.textContent = shown + " of " + table.tBodies[0].rows.length + " rows";
    };
    input.addEventListener("input", update); update();
  });
  const box = document.getElementById("lightbox");
  if (box) {
    const big = box.querySelector("img");
    document.querySelectorAll("figure img.zoom").forEach(img => img.addEventListener("click", () => {
      big.src = img.src; big.alt = img.alt; box.style.display = "flex";
    }));
    box.addEventListener("click", () => { box.style.display = "none"; big.removeAttribute("src"); });
    document.addEventListener("keydown", e => { if (e.key === "Escape") box.style.display = "none"; });
  }
})();
"""


def data_uri(path: Path, mime: str) -> str:
    return f"data:{mime};base64," + base64.b64encode(Path(path).read_bytes()).decode()


def image(path: Path, alt: str, caption: str = "", width: int | None = None) -> str:
    """A figure with the PNG inlined (click to enlarge)."""
    if not Path(path).is_file():
        return f'<p class="muted">({esc(alt)}: no figure — {esc(Path(path).name)} was not written)</p>'
    style = f' style="max-width:{width}px"' if width else ""
    cap = f"<figcaption>{caption}</figcaption>" if caption else ""
    return (f'<figure><img class="zoom" src="{data_uri(path, "image/png")}" alt="{esc(alt)}"{style}>'
            f"{cap}</figure>")


def download(path: Path, label: str | None = None, root: Path | None = None) -> str:
    """A download link carrying the file itself (the page stays self-contained)."""
    path = Path(path)
    if not path.is_file():
        return ""
    mime = {".csv": "text/csv", ".json": "application/json"}.get(path.suffix, "application/octet-stream")
    where = path.relative_to(root).as_posix() if root is not None else path.name
    return (f'<a class="dl" download="{esc(path.name)}" href="{data_uri(path, mime)}" '
            f'title="also in the output folder: {esc(where)}">⤓ {esc(label or path.name)}</a>')


def howto(text: str) -> str:
    return f'<div class="howto"><b>How to read it.</b> {text}</div>'


def section(sid: str, title: str, lede: str, body: str) -> str:
    return (f'<section class="card" id="{sid}"><h2>{esc(title)}</h2>'
            + (f'<p class="lede">{lede}</p>' if lede else "") + body + "</section>\n")


def stat(key: str, value: str, detail: str = "", cls: str = "") -> str:
    return (f'<div class="stat"><div class="k">{esc(key)}</div><div class="v {cls}">{value}</div>'
            f'<div class="d">{detail}</div></div>')


def fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            return "–"
        if v != 0 and (abs(v) < 10 ** -(digits) or abs(v) >= 1e5):
            return f"{v:.{digits}g}"
        return f"{v:.{digits}f}"
    return esc(str(v))


def pct(v: float | None, signed: bool = True) -> str:
    if v is None or not math.isfinite(v):
        return "–"
    digits = 1 if abs(v) < 0.095 else 0  # -0.4%, not -0%
    return f"{100 * v:+.{digits}f}%" if signed else f"{100 * v:.{digits}f}%"


def table(rows: Sequence[Mapping[str, Any]], columns: Sequence[tuple[str, str]], table_id: str,
          text_columns: Sequence[str] = (), cell: Callable[[str, Any, Mapping[str, Any]], str] | None = None,
          filter_box: bool = False, height: int | None = 520) -> str:
    """A sortable table (click a header); ``columns`` are ``(key, header)``; numbers keep their raw
    value in ``data-v`` so sorting is numeric."""
    head = "".join(f'<th class="{"t" if k in text_columns else ""}">{esc(h)}</th>' for k, h in columns)
    body = []
    for r in rows:
        tds = []
        for k, _ in columns:
            v = r.get(k)
            shown = cell(k, v, r) if cell is not None else None
            if shown is None:
                shown = fmt(v)
            raw = f' data-v="{v}"' if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) \
                else ""
            tds.append(f'<td class="{"t" if k in text_columns else ""}"{raw}>{shown}</td>')
        body.append("<tr>" + "".join(tds) + "</tr>")
    tools = ""
    if filter_box:
        tools = (f'<div class="toolbar"><input class="table-filter" data-table="{table_id}" '
                 f'data-count="{table_id}-count" placeholder="filter rows, e.g. cross v2 correspondence">'
                 f'<span id="{table_id}-count" class="muted"></span><span class="muted">click a column header to sort'
                 "</span></div>")
    style = f' style="max-height:{height}px"' if height else ' style="max-height:none"'
    return (f'{tools}<div class="tablebox"{style}><table class="data sortable" id="{table_id}"><thead><tr>{head}'
            f'</tr></thead><tbody>{"".join(body)}</tbody></table></div>')


# --------------------------------------------------------------------------------------
# A small markdown renderer (model cards): headings, paragraphs, lists, tables, code
# --------------------------------------------------------------------------------------


def _inline(text: str) -> str:
    parts = re.split(r"(`[^`]+`)", text)
    out = []
    for p in parts:
        if p.startswith("`") and p.endswith("`") and len(p) > 1:
            out.append(f"<code>{esc(p[1:-1])}</code>")
            continue
        s = esc(p)
        s = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", s)
        s = re.sub(r"(?<![\w*])\*(?!\s)(.+?)(?<!\s)\*(?![\w*])", r"<i>\1</i>", s)
        s = re.sub(r"\[([^\]]+)\]\((https?://[^)\s]+)\)", r'<a href="\2">\1</a>', s)
        out.append(s)
    return "".join(out)


def markdown(text: str) -> str:
    """Markdown → HTML for model cards (a safe subset: everything else is escaped text)."""
    lines = text.splitlines()
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.strip().startswith("```"):
            j = i + 1
            while j < len(lines) and not lines[j].strip().startswith("```"):
                j += 1
            out.append("<pre><code>" + esc("\n".join(lines[i + 1 : j])) + "</code></pre>")
            i = j + 1
            continue
        m = re.match(r"^(#{1,6})\s+(.*)$", line)
        if m:
            level = min(len(m.group(1)) + 1, 6)  # the card sits under the report's own headings
            out.append(f"<h{level}>{_inline(m.group(2))}</h{level}>")
            i += 1
            continue
        if line.strip().startswith("|"):
            rows = []
            while i < len(lines) and lines[i].strip().startswith("|"):
                cells = [c.strip() for c in lines[i].strip().strip("|").split("|")]
                if not all(re.fullmatch(r":?-{2,}:?", c) for c in cells if c):
                    rows.append(cells)
                i += 1
            if rows:
                head = "".join(f"<th>{_inline(c)}</th>" for c in rows[0])
                body = "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in r) + "</tr>" for r in rows[1:])
                out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
            continue
        if re.match(r"^\s*[-*]\s+", line):
            items = []
            while i < len(lines) and (re.match(r"^\s*[-*]\s+", lines[i]) or
                                      (lines[i].startswith("  ") and lines[i].strip() and items)):
                if re.match(r"^\s*[-*]\s+", lines[i]):
                    items.append(re.sub(r"^\s*[-*]\s+", "", lines[i]))
                else:
                    items[-1] += " " + lines[i].strip()
                i += 1
            out.append("<ul>" + "".join(f"<li>{_inline(it)}</li>" for it in items) + "</ul>")
            continue
        if not line.strip():
            i += 1
            continue
        para = []
        while i < len(lines) and lines[i].strip() and not re.match(r"^(#{1,6}\s|\s*[-*]\s|\||```)", lines[i].strip()):
            para.append(lines[i].strip())
            i += 1
        out.append(f"<p>{_inline(' '.join(para))}</p>")
    return "\n".join(out)

"""rerun-sdk is an optional extra: with the module hidden everything works, no ``.rrd`` is written,
and the user is told how to get them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import mv_interp

HIDE_RERUN = "import sys; sys.modules['rerun'] = None; "  # `import rerun` now raises ImportError


def _pair(model):
    from mv_interp.data import SceneConfig, render_views

    views = render_views(1, SceneConfig(image_size=tuple(model.config.img_size)), seed=3)
    return {"easy": views}


def test_4d_views_without_rerun(tiny_model, tmp_path, monkeypatch):
    from mv_interp.probes import write_4d
    from mv_interp.viz import rerun_available, write_rerun_recording

    monkeypatch.setitem(sys.modules, "rerun", None)
    assert not rerun_available()
    files = write_4d(tmp_path, tiny_model, None, _pair(tiny_model), lens=True, max_points=200)
    assert set(files) == {"html"} and files["html"].stat().st_size > 1000
    assert not list(tmp_path.glob("*.rrd"))
    with pytest.raises(ImportError, match=r'needs rerun-sdk, an optional extra: pip install "mv-interp\[rerun\]"'):
        write_rerun_recording(tmp_path / "x.rrd", [], [])


@pytest.mark.slow
def test_fast_report_without_rerun(tmp_path):
    """``mv-interp report --fast`` in a process where rerun cannot be imported (as after a plain install)."""
    out = tmp_path / "report"
    env = {**os.environ, "PYTHONPATH": str(Path(mv_interp.__file__).parents[1]), "OMP_NUM_THREADS": "1"}
    code = HIDE_RERUN + f"from mv_interp.cli import main; sys.exit(main(['report', '--fast', '--quiet', '--out', {str(out)!r}]))"
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (out / "report.html").is_file() and (out / "views" / "viewer_easy_mlp.json").is_file()
    assert not list(out.rglob("*.rrd"))
    html = (out / "report.html").read_text()
    assert "rerun-sdk, an optional extra, is not installed" in html and "mv-interp[rerun]" in html
    assert json.loads((out / "summary.json").read_text())["steps"]["views"]

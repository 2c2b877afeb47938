"""Packaging: the built wheel ships py.typed, the licence and a description whose images resolve
off-repo; LICENSE, CITATION.cff, classifiers and the optional rerun extra are what they claim."""

from __future__ import annotations

import re
import runpy
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

ROOT = Path(__file__).parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())

def test_metadata_licence_and_citation():
    project = PYPROJECT["project"]
    assert project["license"] == "Apache-2.0" and (ROOT / "LICENSE").read_text().lstrip().startswith("Apache License")
    assert "Version 2.0, January 2004" in (ROOT / "LICENSE").read_text()
    assert "Typing :: Typed" in project["classifiers"] and project["urls"]
    assert not any(d.startswith("rerun") for d in project["dependencies"]), "rerun-sdk must stay optional"
    assert project["optional-dependencies"]["rerun"] == ["rerun-sdk>=0.18"]
    assert any(d.startswith("huggingface_hub") for d in project["dependencies"])
    import yaml

    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    assert cff["cff-version"] == "1.2.0" and cff["license"] == "Apache-2.0"
    assert cff["version"] == project["version"]
    paper = cff["preferred-citation"]
    assert paper["title"] == "Understanding Multi-View Transformers"
    assert [a["family-names"] for a in paper["authors"]] == ["Stary", "Gaubil", "Tewari", "Sitzmann"]

def test_readme_images_ship_in_the_sdist_and_links_can_be_made_absolute():
    readme = (ROOT / "README.md").read_text()
    images = re.findall(r"!\[[^\]]*\]\(([^)\s]+)\)", readme)
    assert images and all((ROOT / p).is_file() for p in images), images
    manifest = (ROOT / "MANIFEST.in").read_text()
    assert "recursive-include docs *.md *.png" in manifest
    setup = runpy.run_path(str(ROOT / "setup.py"), run_name="not_main")  # the long-description helper
    text = setup["absolute_links"]("![a](docs/x.png) [b](https://e.org/y) [c](#sec) [d](./docs/z.md)",
                                   "https://raw.example/repo/v1")
    assert text == "![a](https://raw.example/repo/v1/docs/x.png) [b](https://e.org/y) [c](#sec) " \
                   "[d](https://raw.example/repo/v1/docs/z.md)"

def test_built_wheel_ships_py_typed_licence_and_absolute_images(tmp_path):
    base = "https://raw.example/mv_interp/v0.1.0/"
    env = {"MV_INTERP_README_BASE_URL": base, "PATH": "/usr/bin:/bin:/usr/local/bin"}
    import os

    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                        str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=300,
                       env={**os.environ, **env})
    assert r.returncode == 0, r.stderr[-2000:]
    (wheel,) = tmp_path.glob("mv_interp-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        meta = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "mv_interp/py.typed" in names and "mv_interp/__main__.py" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert "mv_interp/weights/dust3r-toy/model.safetensors" in names
    assert "Requires-Dist: rerun-sdk>=0.18; extra == \"rerun\"" in meta
    assert not re.search(r"^Requires-Dist: rerun-sdk[^;]*$", meta, re.M)
    assert f"![The report: headline numbers and the 4D view of an easy and a hard pair]({base}docs/images/report.png)" \
        in meta

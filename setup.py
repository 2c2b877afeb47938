"""Only the long description is computed here; everything else is in pyproject.toml.

README.md links its pictures relatively (``docs/images/…``), which renders on any forge and in the
sdist (the images ship in it, see MANIFEST.in) but not on a package index, which has no files beside
the text. For an upload, set ``MV_INTERP_README_BASE_URL`` to where the repository's files are served
raw at the released tag (for example ``https://raw.githubusercontent.com/ORG/mv_interp/v0.1.0/``):
every relative image and link target in the long description is then prefixed with it. Unset, the
description is README.md verbatim.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from setuptools import setup

BASE_URL_ENV = "MV_INTERP_README_BASE_URL"
# markdown links and images: [text](target) / ![alt](target); the target's first character decides
_LINK = re.compile(r"(!?\[[^\]]*\]\()([^)\s]+)(\))")


def absolute_links(text: str, base_url: str) -> str:
    """``text`` with every relative markdown link/image target prefixed by ``base_url``."""
    base = base_url.rstrip("/") + "/"

    def fix(m: re.Match) -> str:
        target = m.group(2)
        if re.match(r"^([a-z][a-z0-9+.-]*:|#|/)", target, re.I):  # absolute URL, anchor or site-rooted
            return m.group(0)
        return f"{m.group(1)}{base}{target.removeprefix('./')}{m.group(3)}"

    return _LINK.sub(fix, text)


def long_description() -> str:
    text = (Path(__file__).parent / "README.md").read_text(encoding="utf-8")
    base = os.environ.get(BASE_URL_ENV, "").strip()
    return absolute_links(text, base) if base else text


if __name__ == "__main__":
    setup(long_description=long_description(), long_description_content_type="text/markdown")

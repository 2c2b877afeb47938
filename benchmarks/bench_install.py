"""Install size: what ``pip install -e .`` (and the ``rerun`` extra) add to a fresh venv holding torch.

Three clean venvs (no system site-packages): torch only; torch then ``pip install -e .``; and the
same plus ``.[rerun]``. Prints and records the ``du -sm`` of each site-packages (pip reaches PyPI; a
few minutes).

    python benchmarks/bench_install.py [--torch torch==2.13.0] [--keep DIR]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
ROOT = Path(__file__).parents[1]


def site_packages_mb(venv: Path) -> int:
    sp = subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                        capture_output=True, text=True, check=True, env=CLEAN_ENV).stdout.strip()
    return int(subprocess.run(["du", "-sm", sp], capture_output=True, text=True, check=True).stdout.split()[0])


CLEAN_ENV = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}  # a user's fresh shell


def pip(venv: Path, *args: str) -> None:
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", *args], check=True, env=CLEAN_ENV)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--torch", default="torch==2.13.0", help="torch requirement installed first (default: %(default)s)")
    ap.add_argument("--keep", default=None, help="create the venvs here and keep them (default: a temporary folder)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="mv_interp_install_") as tmp:
        base = Path(args.keep or tmp)
        venv = base / "venv"
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pip(venv, args.torch)
        torch_only = site_packages_mb(venv)
        pip(venv, "-e", str(ROOT))
        with_base = site_packages_mb(venv)
        has_rerun = subprocess.run([str(venv / "bin" / "python"), "-c", "import rerun"], capture_output=True,
                                   env=CLEAN_ENV).returncode == 0
        pip(venv, "-e", f"{ROOT}[rerun]")
        with_rerun = site_packages_mb(venv)
    rows = [["torch only", torch_only, "", ""], ["+ pip install -e .", with_base, with_base - torch_only,
                                                  "no" if not has_rerun else "yes (!)"],
            ["+ the rerun extra", with_rerun, with_rerun - with_base, "yes"]]
    from _results import markdown_table, record

    table = markdown_table(["venv", "site-packages MB", "added MB", "rerun importable"], rows)
    print(table)
    record("Install size", f"Fresh venvs (no system site-packages), `{args.torch}` first, `du -sm` of site-packages.\n\n"
           + table)


if __name__ == "__main__":
    main()

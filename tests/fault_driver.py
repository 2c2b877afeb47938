"""A run that tests/test_faults.py kills, fills the disk under, and resumes.

    python fault_driver.py probes OUT [STEPS]     # probe training on a tiny DUSt3R
    python fault_driver.py report OUT             # mv-interp report --fast on the same model

Faults come from the environment, so the run itself is the real code path:

* ``MV_FAULT_KILL=<name part>:<n>``: on the n-th atomic rename onto a file whose name contains
  ``<name part>``, cut the temporary file to half its size and SIGKILL the process — a kill in the
  middle of that write (the half-written ``.*.tmp`` is left behind, as a real kill leaves it).
* ``MV_FAULT_ENOSPC=<name part>:<n>``: that rename raises ``OSError(ENOSPC)`` instead (a full disk).

The driver prints ``ready`` once imports are done, so the parent's random kill times fall in the run.
"""

from __future__ import annotations

import errno
import os
import signal
import sys

import torch

torch.set_num_threads(1)

import mv_interp  # noqa: E402
from mv_interp.adapters.dust3r import DUSt3RConfig, HookedDUSt3R  # noqa: E402

TINY = dict(img_size=(32, 48), enc_embed_dim=32, enc_depth=2, enc_num_heads=2, dec_embed_dim=32, dec_depth=2,
            dec_num_heads=2)


def _install_faults() -> None:
    kill, enospc = os.environ.get("MV_FAULT_KILL"), os.environ.get("MV_FAULT_ENOSPC")
    if not (kill or enospc):
        return
    part, n = (kill or enospc).rsplit(":", 1)
    count = {"n": 0}
    real_replace = os.replace

    def replace(src, dst, *args, **kwargs):
        if part in os.path.basename(str(dst)) and str(src).endswith(".tmp"):
            count["n"] += 1
            if count["n"] == int(n):
                if enospc:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(src))
                size = os.path.getsize(src)
                with open(src, "r+b") as f:
                    f.truncate(size // 2)
                os.kill(os.getpid(), signal.SIGKILL)
        return real_replace(src, dst, *args, **kwargs)

    os.replace = replace


def tiny_model():
    torch.manual_seed(0)
    return mv_interp.MVModel(HookedDUSt3R(DUSt3RConfig(**TINY)).eval())


def probes(out: str, steps: int) -> None:
    from mv_interp.probes import TrainConfig, train_probes

    cfg = TrainConfig(steps=steps, batch_size=2, checkpoint_every=2, probes=("linear",), amp="off",
                      sites=["enc_out.v1", "dec1.mlp.v2"])
    train_probes(tiny_model(), cfg, out, progress=False)


def report(out: str) -> None:
    from mv_interp.report.config import ReportConfig
    from mv_interp.report.runner import run_report

    cfg = ReportConfig.preset("fast").changed(pairs=4, probe_steps=6, control_steps=4, batch_size=2)
    run_report(tiny_model(), cfg, out, progress=False, log=lambda s: None)


if __name__ == "__main__":
    _install_faults()
    print("ready", flush=True)
    what, out = sys.argv[1], sys.argv[2]
    if what == "probes":
        probes(out, int(sys.argv[3]) if len(sys.argv) > 3 else 12)
    else:
        report(out)

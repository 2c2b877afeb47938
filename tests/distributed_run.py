"""One short data-parallel run (probe training, evaluation, head scoring) on the tiny fixture model.

Run alone (``python tests/distributed_run.py OUT``) or under ``torchrun --nproc-per-node N``;
each rank writes ``OUT/rank{r}.json`` with what ``tests/test_scale.py`` compares.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch

import mv_interp
from mv_interp import distributed as D
from mv_interp.heads import score_heads
from mv_interp.probes import ProbeSpec, TrainConfig, evaluate_probes, train_probes
from mv_interp.probes.data import TensorSource

HERE = Path(__file__).parent


def views(n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """Pairs with every pixel valid, so a mean over each rank's pixels averages to the global mean."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(2):
        pts = torch.randn(n, 48, 64, 3, generator=g)
        pts[..., 2] = pts[..., 2].abs() + 1
        out.append({"img": torch.rand(n, 3, 48, 64, generator=g) * 2 - 1, "pts3d": pts,
                    "valid": torch.ones(n, 48, 64, dtype=torch.bool), "depth": pts[..., 2].clone()})
    return out


def main(out: Path) -> None:
    torch.set_num_threads(1)
    D.init_from_env("cpu")
    model = mv_interp.load_model(HERE / "fixtures" / "dust3r" / "dust3r_tiny_linear.pth")
    cfg = TrainConfig(probes=(ProbeSpec("mlp", width=16, n_layers=3), ProbeSpec("depth", "depth", width=16,
                                                                                 n_layers=2)),
                      steps=3, batch_size=4, sites=("dec_in", "dec1.cross", "dec2.mlp"), checkpoint_every=2)
    probes = train_probes(model, cfg, out / "probes", data=TensorSource(views(8, 0)), progress=False)
    state = {k: v.detach() for k, v in probes.bank.state_dict().items()}
    table = evaluate_probes(model, probes, views(6, 1), batch_size=2, lens=False)
    scores = score_heads(model, views(4, 2), kinds=("register",), batch_size=2)
    result = {
        "world_size": D.world_size(),
        "digest": hashlib.sha256(b"".join(state[k].numpy().tobytes() for k in sorted(state))).hexdigest(),
        "params": {k: v.flatten()[:64].tolist() for k, v in state.items()},
        "rows": [{k: r[k] for k in ("method", "location", "n_pairs", "e1")} for r in table.rows],
        "heads_pairs": scores.n_pairs,
        "heads": {"|".join(map(str, k)): {n: t.flatten().tolist() for n, t in v.items()}
                  for k, v in scores.sums.items()},
    }
    (out / f"rank{D.rank()}.json").write_text(json.dumps(result))
    D.barrier()


if __name__ == "__main__":
    main(Path(sys.argv[1]))

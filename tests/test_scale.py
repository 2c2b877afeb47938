"""Scale: the stacked probe path, the fast capture, prefetching, the compiled fast path, data
parallelism on gloo, the ``paper`` preset and the GPU benchmark's smoke mode."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from mv_interp.model import enable_compile
from mv_interp.probes import ProbeSet, TrainConfig, probe_loss, train_probes
from mv_interp.probes.data import Prefetcher, SyntheticSource, TensorSource, shard_batch, slice_batch
from mv_interp.probes.losses import stacked_probe_loss

sys.path.insert(0, str(Path(__file__).parent))
from test_probes import SMALL, random_views  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def model(linear_model):
    return linear_model


def test_stacked_path_equals_the_per_site_path(model):
    """One capture + stacked probes + the gathered loss give what the per-site dict path gives."""
    ps = ProbeSet.for_model(model, model.probe_sites(), SMALL, seed=3)
    views = random_views(3, seed=4)
    imgs = [v["img"] for v in views]
    out = ps.run(model, *imgs)
    loss, logs = probe_loss(out, ps.locations, views, ps.specs)
    with torch.no_grad():
        stacks = ps.capture(model, *imgs)
    assert {d: tuple(t.shape) for d, t in stacks.items()} == {
        d: (len(names), 3, 12, d) for d, names in ps.bank.widths.items()}
    stacked = ps.bank.stacked(stacks, (3, 4))
    for kind in ps.kinds:
        for site in ps.sites:
            key, i = ps.bank.index[(kind, site.name)]
            for field, value in out[kind][site.name].items():
                torch.testing.assert_close(stacked[key][field][i], value)
    loss2, logs2 = stacked_probe_loss(stacked, ps.loss_plan("cpu"), views, ps.specs)
    torch.testing.assert_close(loss2, loss)
    assert logs2.keys() == logs.keys()
    for k in logs:
        torch.testing.assert_close(torch.as_tensor(logs2[k]), torch.as_tensor(logs[k]))


def test_capture_is_run_with_cache_without_copies(model):
    imgs = model.module.example_inputs(2)
    names = ["enc_blocks.0.hook_resid_post", "dec_blocks2.1.hook_resid_mid", "dec_blocks.0.cross_attn.hook_pattern"]
    with torch.no_grad():
        _, cache = model.run_with_cache(*imgs, names_filter=names)
        seen = {}
        # a torch hook registered first edits the value; run_with_cache records the edited value
        with model.hooks([(names[0], lambda x, hook: x * 2)]):
            _, edited = model.run_with_cache(*imgs, names_filter=names)
        out, acts = model.module.capture(*imgs, names=names[1:])
        model.module.hook_dict[names[1]].add_hook(lambda x, hook: seen.setdefault("x", x))
        try:
            _, again = model.module.capture(*imgs, names=names[1:])
        finally:
            model.reset_hooks()
    torch.testing.assert_close(edited[names[0]], 2 * cache[names[0]])
    for n in names[1:]:
        assert torch.equal(acts[n], cache[n])
    assert again[names[1]].data_ptr() == seen["x"].data_ptr()  # a reference to the activation, not a copy
    assert all(hp._sink is None for hp in model.module.hook_dict.values())  # nothing left behind


def test_shards_of_a_batch_are_rendered_alone():
    src = SyntheticSource((32, 32), seed=7)
    full = src.batch(1, 4, "cpu")
    part = shard_batch(src, 1, 4, "cpu", 2, 4)
    for a, b in zip(slice_batch(full, 2, 4), part):
        for k in ("img", "pts3d", "valid"):
            assert torch.equal(a[k], b[k])
    mem = TensorSource(random_views(6), seed=1)
    for a, b in zip(slice_batch(mem.batch(2, 3, "cpu"), 1, 3), shard_batch(mem, 2, 3, "cpu", 1, 3)):
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_prefetcher_order_errors_and_stall():
    made = []

    def make(step):
        made.append((step, threading.current_thread().name))
        if step == 3:
            raise KeyboardInterrupt
        return [{"img": torch.full((1,), float(step))}]

    with Prefetcher(make, 1, 6, "cpu", depth=2) as feed:
        assert [float(feed.get(s)[0]["img"]) for s in (1, 2)] == [1.0, 2.0]
        with pytest.raises(KeyboardInterrupt):
            feed.get(3)
        assert feed.stall_s >= 0
    assert all(name == "mv_interp-prefetch" for _, name in made)
    assert [s for s, _ in made] == [1, 2, 3]  # the worker stops at the failing step


def test_training_log_reports_stalls_and_world_size(model, tmp_path):
    cfg = TrainConfig(probes=SMALL[:1], steps=3, batch_size=2, sites=("dec2.mlp",), checkpoint_every=2)
    seen = []
    train_probes(model, cfg, tmp_path, data=TensorSource(random_views(4)), progress=lambda d, t: seen.append((d, t)))
    lines = [json.loads(x) for x in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3] and all("data_stall_s" in x for x in lines)
    assert seen == [(1, 3), (2, 3), (3, 3)]
    assert json.loads((tmp_path / "probes.json").read_text())["meta"]["world_size"] == 1


def test_fast_path_falls_back_to_eager_whenever_a_hook_needs_it(tiny_model):
    module = tiny_model.module
    fast = enable_compile(tiny_model)
    with torch.no_grad():
        assert fast.eager_reason() is None
        with tiny_model.hooks([("dec_blocks.0.hook_resid_post", lambda x, hook: x)]):
            assert "hook" in fast.eager_reason()
        handle = module.register_forward_hook(lambda *a: None)
        assert "hook" in fast.eager_reason()
        handle.remove()
        module.dec_blocks[0].cross_attn.force_eager = True
        assert "force_eager" in fast.eager_reason()
        del module.dec_blocks[0].cross_attn.force_eager
        # a trace runs the hooked module itself (never the fast path), and reads right
        imgs = module.example_inputs(1)
        with tiny_model.trace(*imgs):
            saved = tiny_model.dec_blocks[0].hook_resid_post.output.save()
    assert "gradients" in fast.eager_reason()
    assert fast.calls["compiled"] == 0  # nothing was compiled in this test
    assert enable_compile(tiny_model, False) is None and "_fast_path" not in module.__dict__
    _, cache = module.run_with_cache(*imgs, names_filter="dec_blocks.0.hook_resid_post")
    torch.testing.assert_close(saved, cache["dec_blocks.0.hook_resid_post"])


@pytest.mark.slow
def test_compiled_path_matches_eager_and_the_fixture():
    """Inductor on CPU (minutes on 2 cores): fp32 parity with the fixture on both paths, the compiled
    capture equals run_with_cache, a hook is still served (eagerly), bf16 within bf16 tolerance. Runs
    ``tests/compiled_check.py`` outside pytest, whose jaxtyping/beartype wrappers dynamo cannot trace."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, str(ROOT / "tests" / "compiled_check.py")], env=env, capture_output=True,
                         text=True, timeout=3000)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]


def _run_distributed(out: Path, nproc: int) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           str(ROOT / "tests" / "distributed_run.py"), str(out)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]


def test_data_parallel_on_gloo_two_ranks_equal_one_process(tmp_path):
    """torchrun, 2 CPU ranks on gloo: probe training, evaluation and head scoring agree across the
    ranks and with one process on the same pairs; the saved config records the world size."""
    import distributed_run

    _run_distributed(tmp_path / "two", 2)
    distributed_run.main((tmp_path / "one").mkdir() or tmp_path / "one")
    r0, r1 = (json.loads((tmp_path / "two" / f"rank{r}.json").read_text()) for r in (0, 1))
    one = json.loads((tmp_path / "one" / "rank0.json").read_text())
    assert r0["world_size"] == 2 and one["world_size"] == 1
    assert r0 == r1  # both ranks hold the same probes, metrics and head scores
    for k, v in one["params"].items():
        torch.testing.assert_close(torch.tensor(r0["params"][k]), torch.tensor(v), rtol=1e-5, atol=1e-6)
    assert [r["n_pairs"] for r in r0["rows"]] == [r["n_pairs"] for r in one["rows"]] == [6] * len(one["rows"])
    torch.testing.assert_close(torch.tensor([r["e1"] for r in r0["rows"]]), torch.tensor([r["e1"] for r in one["rows"]]),
                               rtol=1e-4, atol=1e-6, equal_nan=True)
    assert r0["heads_pairs"] == one["heads_pairs"] == 4
    for key, named in one["heads"].items():
        for name, values in named.items():
            torch.testing.assert_close(torch.tensor(r0["heads"][key][name]), torch.tensor(values), rtol=1e-5,
                                       atol=1e-6)
    saved = json.loads((tmp_path / "two" / "probes" / "probes.json").read_text())
    assert saved["meta"]["world_size"] == 2


def test_paper_preset_and_cli(tmp_path):
    from mv_interp.report._cli import config_from_args
    from mv_interp.report.config import PAPER_SIZING, ReportConfig

    paper = ReportConfig.preset("paper")
    assert paper.probe_steps * paper.batch_size >= 100_000 and paper.pairs == 1000
    assert (paper.probe_width, paper.probe_layers, paper.lr) == (512, 5, 1e-4)
    from mv_interp.report.analysis import train_config

    assert train_config(paper).weight_decay == 0.05
    assert "projection" in PAPER_SIZING or "Under 30 min only if" in PAPER_SIZING
    import argparse

    from mv_interp.report._cli import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["report", "--preset", "paper", "--pairs", "500"])
    assert config_from_args(args) == paper.changed(pairs=500)
    assert config_from_args(parser.parse_args(["report", "--fast"])) == ReportConfig.preset("fast")
    with pytest.raises(SystemExit):
        config_from_args(parser.parse_args(["report", "--fast", "--preset", "paper"]))


def _bench_gpu(tmp_path, sections):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_gpu

    return bench_gpu.main(["--device", "cpu", "--smoke", "--no-record", "--out", str(tmp_path), "--sections",
                           *sections])


def test_bench_gpu_smoke(tmp_path):
    """benchmarks/bench_gpu.py --device cpu --smoke: each section runs and prints a table (the report
    section, the slowest, in the slow test below)."""
    tables = _bench_gpu(tmp_path, ["forward", "capture", "probes", "fast3r"])
    assert list(tables) == ["ceiling", "forward", "capture", "probes", "fast3r"]
    assert float(tables["ceiling"][0][3].split()[0]) > 0
    assert {r[0] for r in tables["forward"][:-1]} == {"hooked eager", "stripped eager", "hooked compiled",
                                                      "stripped compiled"}
    assert float(tables["probes"][0][5]) > 0
    assert [r[0] for r in tables["fast3r"]] == [2, 3]


@pytest.mark.slow
def test_bench_gpu_smoke_report(tmp_path):
    tables = _bench_gpu(tmp_path, ["report"])
    assert tables["report"][-1][0].startswith("total (projected")


def test_eta_log_reports_rate_and_eta_every_tenth():
    from mv_interp.report.runner import EtaLog

    lines: list[str] = []
    hook = EtaLog(lines.append, "probes", pairs_per_step=4)
    for done in range(1, 21):
        hook(done, 20)
    assert len(lines) == 10 and lines[-1].startswith("  probes: 20/20 steps (100%)")
    assert all("pairs/s, ETA" in line for line in lines)
    resumed: list[str] = []
    hook = EtaLog(resumed.append, "probes")
    for done in range(11, 21):  # a resumed run: the rate counts only this run's steps
        hook(done, 20)
    assert resumed and "ETA 0 s" in resumed[-1]

"""``mv-interp heads ...``: score and classify every attention head, relabel saved scores."""

from __future__ import annotations

import argparse
from pathlib import Path

from .._cli import add_model_args, load_from_args
from ..resume import StateFile


def _threshold_args(p: argparse.ArgumentParser):
    from ..configs import add_config_options
    from .result import HeadThresholds

    return add_config_options(p, HeadThresholds, set_option=False, file_option=None,
                              title="labels (HeadThresholds fields; docs/heads.md)")


def _thresholds(args: argparse.Namespace):
    from ..configs import config_from_args
    from .result import HeadThresholds

    return config_from_args(args, args.threshold_options, HeadThresholds())


def _data_spec(args: argparse.Namespace, model) -> tuple[str, int, object]:
    """(description, number of batches, batch(i) -> list of view dicts), from the pair source of
    ``--data`` (a capture directory) or of synthetic scenes."""
    from ..data import CaptureDataset
    from ..data.sources import DatasetSource, SyntheticSource

    bs = args.batch_size
    if args.data:
        root = Path(args.data)
        if not root.is_dir():
            raise FileNotFoundError(f"--data {root}: not a directory (give a capture directory, see docs/data.md)")
        size = args.size or max(model.config.img_size)
        dataset = CaptureDataset(root, size=size)
        n = len(dataset) if args.pairs is None else min(args.pairs, len(dataset))
        if n == 0:
            raise ValueError(f"--data {root}: the capture directory holds no tuples")
        source = DatasetSource(dataset, name=str(root))
        desc = f"capture {root.resolve()} size {size}"
    else:
        n = 64 if args.pairs is None else args.pairs
        if n < 1:
            raise ValueError(f"--pairs must be >= 1, got {n}")
        n_views = model.module.fixed_n_views or args.views
        source = SyntheticSource(tuple(model.config.img_size), seed=args.seed, scene={"n_views": n_views})
        desc = f"synthetic {source.config.to_json()} seed {args.seed} pairs {n}"

    def batch(i: int):
        return source.take(i * bs, min(bs, n - i * bs), args.device if not args.data else "cpu")

    return desc, -(-n // bs), batch


def _classify(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from . import figures
    from .scoring import HeadScorer, ScoreConfig

    from ..configs import config_from_args

    model = load_from_args(args)
    config = config_from_args(args, args.score_options, ScoreConfig())
    thresholds = _thresholds(args)
    desc, n_batches, get_batch = _data_spec(args, model)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    progress = StateFile(out / "progress.pt", {"model": str(args.model), "config": args.model_config, "data": desc,
                                               "batch": args.batch_size, "score": config.to_dict()})
    scorer = HeadScorer(model, config)
    done = 0
    if progress.path.is_file() and not args.fresh:
        saved = progress.load(on_mismatch="restart")
        if saved is not None:
            scorer.load_state_dict(saved["scorer"])
            done = scorer.n_batches
            print(f"resuming: {done} of {n_batches} batches already scored in {progress.path}")
        else:
            print(f"{progress.path} belongs to another run (other model, data or options); starting afresh")
    first = get_batch(0)  # kept for the example figures
    bar = tqdm(total=n_batches, initial=done, unit="batch", desc="scoring heads", disable=args.quiet)
    for i in range(done, n_batches):
        scorer.update(first if i == 0 else get_batch(i))
        progress.save({"scorer": scorer.state_dict()})
        bar.update(1)
    bar.close()
    scores = scorer.result(model_name=Path(str(args.model)).name).classify(thresholds)
    paths = scores.save(out, figures=not args.no_figures)
    if not args.no_figures and args.queries > 0:
        paths.update(figures.save_example_figures(model, first, scores, out, n_queries=args.queries))
    print(scores.summary())
    print(f"wrote {len(paths)} files to {out}: " + ", ".join(sorted(p.name for p in paths.values())[:8])
          + (" …" if len(paths) > 8 else ""))
    return 0


def _relabel(args: argparse.Namespace) -> int:
    from .result import HeadScores

    scores = HeadScores.load(args.dir).classify(_thresholds(args))
    paths = scores.save(args.dir, figures=not args.no_figures)
    print(scores.summary())
    print(f"rewrote {len(paths)} files in {args.dir}")
    return 0


def register(sub) -> None:
    from .._cli import add_long_side_arg
    from ..configs import add_config_options
    from .scoring import KINDS, ScoreConfig

    p = sub.add_parser("heads", help="score and classify attention heads (correspondence, register, local)",
                       description="Score every attention head of a model (correspondence recall, register and "
                                   "local attention mass), label them with explicit thresholds, and re-label saved "
                                   "scores with other thresholds.")
    hsub = p.add_subparsers(dest="heads_command", metavar="SUBCOMMAND", required=True)

    c = hsub.add_parser("classify", help="score every head over a dataset; write table, heatmaps, curve, overlays",
                        description="Score every attention head of a model over synthetic pairs at the model's input "
                                    "size (default) or a capture directory, label them, and write scores.csv, "
                                    "scores.json, state.pt and PNG figures to --out.\n\nRe-running the same command "
                                    "resumes from --out/progress.pt.")
    add_model_args(c)
    c.add_argument("--out", required=True, help="output directory")
    c.add_argument("--pairs", type=int, default=None, help="number of pairs (default: 64 synthetic / all captured)")
    c.add_argument("--data", default=None, help="capture directory (default: synthetic scenes)")
    add_long_side_arg(c)
    c.add_argument("--views", type=int, default=2,
                   help="views per synthetic scene for models taking any number (default: %(default)s)")
    c.add_argument("--seed", type=int, default=0, help="seed of the first synthetic scene (default: %(default)s)")
    c.add_argument("--batch-size", type=int, default=8, help="pairs per forward (default: %(default)s)")
    c.add_argument("--queries", type=int, default=4,
                   help="query patches per overlay figure, 0 for no overlays (default: %(default)s)")
    c.add_argument("--no-figures", action="store_true", help="write only the tables and state")
    c.add_argument("--fresh", action="store_true", help="ignore --out/progress.pt and start again")
    c.add_argument("--quiet", action="store_true", help="no progress bar")
    score = add_config_options(c, ScoreConfig, set_option=False, file_option=None, choices={"kinds": KINDS},
                               title="scores (ScoreConfig fields)")
    c.set_defaults(func=_classify, score_options=score, threshold_options=_threshold_args(c))

    r = hsub.add_parser("relabel", help="re-label saved scores with other thresholds (no model needed)",
                        description="Re-label the scores saved by `mv-interp heads classify` with other "
                                    "thresholds and rewrite the tables and figures (no model needed).")
    r.add_argument("dir", help="directory written by `mv-interp heads classify`")
    r.add_argument("--no-figures", action="store_true", help="write only the tables")
    r.set_defaults(func=_relabel, threshold_options=_threshold_args(r))

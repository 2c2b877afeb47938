"""The command line generated from the config dataclasses: help and a default on every option of
every subcommand, every ReportConfig field reachable, typed errors, deprecated spellings, --version."""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

import mv_interp
from mv_interp.cli import build_parser, main
from mv_interp.configs import ConfigTypeError, add_config_options, config_from_args, field_docs
from mv_interp.report.config import PRESETS, ReportConfig


def _leaf_commands(parser: argparse.ArgumentParser, prefix=()) -> list[tuple[str, ...]]:
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        return [prefix]
    out = [prefix] if prefix else []
    for name, p in subs[0].choices.items():
        out += _leaf_commands(p, prefix + (name,))
    return out


def _option_blocks(text: str) -> list[str]:
    """Each option's lines in a --help text: an option line and the deeper-indented lines after it."""
    blocks: list[list[str]] = []
    for line in text.splitlines():
        if re.match(r"^  -", line):
            blocks.append([line])
        elif blocks and re.match(r"^ {4,}\S", line) and not re.match(r"^  \S", line):
            blocks[-1].append(line)
        else:
            if blocks and blocks[-1] is not None:
                blocks.append(None)  # type: ignore[arg-type]
    return [" ".join(b) for b in blocks if b]


def test_every_option_of_every_subcommand_has_help_and_a_default(capsys):
    commands = _leaf_commands(build_parser())
    assert {("report",), ("probes", "train"), ("heads", "classify"), ("validate",), ("data", "render")} <= set(commands)
    bare = []
    for cmd in [(), *commands]:
        with pytest.raises(SystemExit) as e:
            main([*cmd, "--help"])
        assert e.value.code == 0
        text = capsys.readouterr().out
        assert len(max(text.splitlines(), key=len)) < 160, f"{cmd}: an unwrapped line"  # descriptions are wrapped
        for block in _option_blocks(text):
            if block.lstrip().startswith(("-h, --help", "--version")):
                continue
            words = re.sub(r"^\s*(-[-\w]+(?: [A-Z_{}\[\]., .]+?)?(?:, )?)+\s{2,}", "", block, count=1)
            if words == block.strip() or not re.search(r"\(default[: ]|\(required\)", block):
                bare.append(f"mv-interp {' '.join(cmd)}: {block.strip()[:100]}")
    assert not bare, "options without help text or default:\n" + "\n".join(bare)


def test_every_report_config_field_is_reachable(tmp_path):
    parser = build_parser()
    fields = {f.name for f in dataclasses.fields(ReportConfig)}
    assert fields <= set(field_docs(ReportConfig)), "every ReportConfig field has a docstring (its help)"
    args = parser.parse_args(["report"])
    opts = args.report_options
    assert set(opts.dests) == fields  # each field is an option of its own
    default = ReportConfig.preset("default")
    changed: dict = dict(pairs=32, probe_steps=7, batch_size=2, probe_width=16, probe_layers=2, probe_kinds=("mlp", "linear"),
                   lr=0.01, train_pool=3, control=False, control_steps=None, seed=9, knockout_k=2, patch_pairs=3,
                   patch_per=("head",), max_points=10, overlay_queries=1)
    plain = default.to_dict()
    for name in fields - set(changed):  # a field added later: at least its own value round-trips
        changed[name] = tuple(plain[name]) if isinstance(plain[name], list) else plain[name]
    for name, value in changed.items():
        as_json = json.dumps(list(value) if isinstance(value, tuple) else value)
        cfg = config_from_args(parser.parse_args(["report", "--set", f"{name}={as_json}"]), opts, default)
        assert getattr(cfg, name) == value, name
    # a file, --set and an option layer in that order, on top of the preset
    (tmp_path / "r.json").write_text(json.dumps({"pairs": 20, "knockout_k": 4, "seed": 1}))
    a = parser.parse_args(["report", "--fast", "--config", str(tmp_path / "r.json"), "--set", "knockout_k=3",
                           "--seed", "2", "--no-control"])
    from mv_interp.report._cli import config_from_args as report_config

    cfg = report_config(a)
    assert (cfg.pairs, cfg.knockout_k, cfg.seed, cfg.control, cfg.probe_steps) == (20, 3, 2, False,
                                                                                    PRESETS["fast"].probe_steps)


def test_typed_errors_name_field_type_and_value(tmp_path, capsys):
    with pytest.raises(ConfigTypeError, match=r"ReportConfig\.pairs: expected int, got '64' \(str\)"):
        ReportConfig.from_dict({"pairs": "64"})
    with pytest.raises(ConfigTypeError, match=r"ReportConfig\.probe_kinds: expected list of str, got \[1\]"):
        ReportConfig.from_dict({"probe_kinds": [1]})
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['paris'\]"):
        ReportConfig.from_dict({"paris": 3})
    assert ReportConfig.from_dict({"lr": 1, "control_steps": None}).lr == 1  # an int is a fine float
    (tmp_path / "bad.json").write_text('{"probe_steps": 2.5}')
    assert main(["report", "--config", str(tmp_path / "bad.json"), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "bad.json: ReportConfig.probe_steps: expected int, got 2.5 (float)" in err and "Traceback" not in err
    assert main(["report", "--set", "pairs=many", "--out", str(tmp_path / "o")]) == 1
    assert "--set 'pairs=many': ReportConfig.pairs: expected int, got 'many' (str)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["report", "--pairs", "many"])
    assert "argument --pairs: invalid int value: 'many'" in capsys.readouterr().err


def test_deprecated_spellings_still_work(capsys):
    parser = build_parser()
    args = parser.parse_args(["probes", "eval", "--out", "x", "--n-pairs", "5"])
    assert args.pairs == 5 and "--n-pairs is deprecated; use --pairs" in capsys.readouterr().err
    args = parser.parse_args(["validate", "--batch", "4", "--config", "224_linear"])
    assert (args.batch_size, args.model_config) == (4, "224_linear")
    err = capsys.readouterr().err
    assert "--batch is deprecated; use --batch-size" in err and "--config is deprecated; use --model-config" in err
    args = parser.parse_args(["patch", "--clean", "a", "b", "--corrupted", "c", "d", "--size", "96"])
    assert args.size == 96 and "--size is deprecated; use --long-side" in capsys.readouterr().err
    args = parser.parse_args(["hooks", "--size", "64"])  # --size H W, or one value for a square
    from mv_interp._cli import size_from_args

    assert size_from_args(args, None) == (64, 64)


def test_a_new_config_field_becomes_an_option():
    @dataclass(frozen=True)
    class Toy:
        steps: int = 3
        """How many steps."""
        names: tuple[str, ...] = ("a",)
        """Which names."""

    parser = argparse.ArgumentParser(formatter_class=mv_interp.configs.HelpFormatter)
    opts = add_config_options(parser, Toy, presets={"default": Toy(), "big": Toy(steps=30)})
    text = parser.format_help()
    assert "How many steps. (default: 3; big: 30)" in text and "--names NAMES [NAMES ...]" in text
    assert config_from_args(parser.parse_args(["--steps", "4", "--names", "x", "y"]), opts, Toy()) == Toy(4, ("x", "y"))


def test_version_and_python_m(tmp_path):
    env_path = str(Path(mv_interp.__file__).parents[1])
    r = subprocess.run([sys.executable, "-m", "mv_interp", "--version"], capture_output=True, text=True, timeout=120,
                       env={"PYTHONPATH": env_path, "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0 and r.stdout.strip() == f"mv-interp {mv_interp.__version__}", r.stderr
    import tomllib

    pyproject = tomllib.loads((Path(env_path) / "pyproject.toml").read_text())
    assert pyproject["project"]["version"] == mv_interp.__version__

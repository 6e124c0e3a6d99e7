"""p4bg.cli: command lines generated from dataclasses, and every command's --help."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from p4bg.cli import option, parse
from p4bg.config import ConfigError

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Example:
    folder: str = option(help="a folder", positional=True)
    out: str = option(help="required: no default")
    n_samples: int = option(10, "how many", aliases=("--n",))
    scale: float | None = option(None, "optional number")
    split: tuple[float, float, float] = option((0.8, 0.1, 0.1), "three numbers")
    kind: str = option("a", "one of two", choices=("a", "b"))
    quiet: bool = option(False, "a switch")


def test_fields_become_typed_options():
    got = parse(Example, ["f", "--out", "o", "--n-samples=3", "--scale", "0.5", "--split", "1",
                          "2", "3", "--kind", "b", "--quiet"], "prog")  # fmt: skip
    assert got == Example("f", "o", 3, 0.5, (1.0, 2.0, 3.0), "b", True)
    assert parse(Example, ["f", "--out", "o", "--n", "7"], "prog").n_samples == 7
    defaults = parse(Example, ["f", "--out=o"], "prog")
    assert (defaults.n_samples, defaults.scale, defaults.split) == (10, None, (0.8, 0.1, 0.1))
    assert not defaults.quiet


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["f"], "the following arguments are required: --out"),
        (["f", "--out", "o", "--n-samples", "x"], "--n-samples/--n: invalid int value: 'x'"),
        (["f", "--out", "o", "--kind", "c"], "invalid choice: 'c'"),
        (["f", "--out", "o", "--qu"], "unrecognized arguments: --qu"),  # no abbreviations
        (["f", "--out", "o", "--quiet=yes"], "ignored explicit argument 'yes'"),
    ],
)
def test_errors_name_the_option(argv, message):
    with pytest.raises(ConfigError, match="prog --help") as err:
        parse(Example, argv, "prog")
    assert message in str(err.value)


@pytest.mark.parametrize(
    "command", ["train", "sample", "analyze", "simulate", "remd", "umbrella", "demo", "systems"]
)
def test_every_command_prints_its_help(command):
    result = subprocess.run([sys.executable, "-m", f"p4bg.{command}", "--help"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: python -m p4bg.{command}")


@pytest.mark.parametrize(
    "command", ["train", "sample", "analyze", "simulate", "remd", "umbrella", "demo", "systems"]
)
def test_every_command_says_a_bad_option_alike(command):
    result = subprocess.run([sys.executable, "-m", f"p4bg.{command}", "x", "--no-such-option"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.startswith(f"p4bg.{command}: error: "), result.stderr

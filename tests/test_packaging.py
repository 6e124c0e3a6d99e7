"""environment.yml (conda) and pyproject.toml (pip) install the same packages.

Users of either file must get a working p4bg: a package missing from one (as pymbar once was
from environment.yml) breaks the commands that need it only there. The yml is read by a small
line parser made for its simple layout, so the test needs no YAML library.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# conda-forge name -> pip name, where they differ
CONDA_TO_PIP = {"pytorch": "torch"}
# installed from PyPI in both files (environment.yml lists them under `pip:`)
PIP_ONLY = {"zuko"}
# conda's own tooling in environment.yml, not a dependency of p4bg
TOOLING = {"pip"}

REQUIREMENT = re.compile(r"^\s*([A-Za-z0-9_.\-]+)\s*(?:>=\s*([0-9][0-9A-Za-z.]*))?\s*$")


def parse_requirement(text: str, where: str) -> tuple[str, str | None]:
    """'name>=1.2' -> ('name', '1.2'); a bare name -> (name, None). Only lower bounds are
    used in this project's files; anything else is refused so that this test stays honest."""
    match = REQUIREMENT.match(text)
    if match is None:
        raise ValueError(
            f"{where}: cannot read requirement {text!r} (expected 'name' or 'name>=X')"
        )
    return match.group(1).lower(), match.group(2)


def read_environment_yml(path: Path) -> tuple[dict[str, str | None], dict[str, str | None]]:
    """The conda and the pip requirements of an environment.yml: ({name: lower bound}, same)."""
    conda: dict[str, str | None] = {}
    pip: dict[str, str | None] = {}
    section = None  # None, "dependencies" or "pip"
    pip_indent = -1
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].rstrip()
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip())
        if indent == 0:
            section = "dependencies" if line.strip() == "dependencies:" else None
            continue
        if section is None:
            continue
        item = line.strip()
        if not item.startswith("- "):
            raise ValueError(f"{path.name}:{number}: expected a list item, got {raw!r}")
        item = item[2:].strip()
        if section == "pip" and indent <= pip_indent:
            section = "dependencies"
        if item == "pip:":
            section, pip_indent = "pip", indent
            continue
        name, bound = parse_requirement(item, f"{path.name}:{number}")
        (pip if section == "pip" else conda)[name] = bound
    return conda, pip


def read_pyproject(path: Path) -> tuple[str, dict[str, str | None]]:
    """requires-python's lower bound and every requirement of [project]: the dependencies and
    all optional extras, {name: lower bound}."""
    project = tomllib.loads(path.read_text())["project"]
    requirements: dict[str, str | None] = {}
    lists = [project.get("dependencies", [])]
    lists += list(project.get("optional-dependencies", {}).values())
    for entries in lists:
        for entry in entries:
            name, bound = parse_requirement(entry, path.name)
            requirements[name] = bound
    python = project["requires-python"].strip()
    if not python.startswith(">="):
        raise ValueError(f"{path.name}: requires-python {python!r} is not a lower bound")
    return python[2:].strip(), requirements


@pytest.fixture(scope="module")
def files() -> tuple[dict, dict, str, dict]:
    conda, pip = read_environment_yml(ROOT / "environment.yml")
    python, requirements = read_pyproject(ROOT / "pyproject.toml")
    return conda, pip, python, requirements


def test_same_packages_and_lower_bounds(files: tuple[dict, dict, str, dict]) -> None:
    conda, pip, _, requirements = files
    from_yml = {CONDA_TO_PIP.get(name, name): bound for name, bound in conda.items()}
    from_yml.pop("python", None)
    for name in TOOLING:
        from_yml.pop(name, None)
    overlap = from_yml.keys() & pip.keys()
    assert not overlap, f"environment.yml lists {sorted(overlap)} both from conda and from pip"
    from_yml.update(pip)
    assert from_yml == requirements, (
        "environment.yml and pyproject.toml disagree:\n"
        f"  only in environment.yml: {sorted(from_yml.keys() - requirements.keys())}\n"
        f"  only in pyproject.toml: {sorted(requirements.keys() - from_yml.keys())}\n"
        "  different lower bounds: "
        + str(
            {
                name: (from_yml[name], requirements[name])
                for name in from_yml.keys() & requirements.keys()
                if from_yml[name] != requirements[name]
            }
        )
    )


def test_every_package_has_a_lower_bound(files: tuple[dict, dict, str, dict]) -> None:
    _, _, _, requirements = files
    unbounded = sorted(name for name, bound in requirements.items() if bound is None)
    assert not unbounded, f"pyproject.toml: give {unbounded} a lower bound (name>=X)"


def test_pip_only_packages_come_from_pip(files: tuple[dict, dict, str, dict]) -> None:
    conda, pip, _, _ = files
    assert pip.keys() >= PIP_ONLY, f"environment.yml: list {sorted(PIP_ONLY)} under `pip:`"
    assert not PIP_ONLY & conda.keys(), f"{sorted(PIP_ONLY)} are not on conda-forge"
    assert not set(CONDA_TO_PIP.values()) & conda.keys(), (
        f"environment.yml: use conda-forge's names {sorted(CONDA_TO_PIP)}"
    )


def test_same_python(files: tuple[dict, dict, str, dict]) -> None:
    conda, _, python, _ = files
    assert conda.get("python") == python, (
        f"environment.yml python>={conda.get('python')}, pyproject.toml requires-python>={python}"
    )


def test_parser_reads_pip_section_and_comments(tmp_path: Path) -> None:
    yml = tmp_path / "environment.yml"
    yml.write_text(
        "name: x\nchannels:\n  - conda-forge\ndependencies:\n  - python>=3.11\n"
        "  - pytorch>=2.2   # comment\n  - pip\n  - pip:\n      - zuko>=1.1  # only pip\n"
        "  - numpy>=1.24\n"
    )
    conda, pip = read_environment_yml(yml)
    assert conda == {"python": "3.11", "pytorch": "2.2", "pip": None, "numpy": "1.24"}
    assert pip == {"zuko": "1.1"}
    with pytest.raises(ValueError, match="cannot read requirement"):
        parse_requirement("numpy==1.24", "x")


def test_every_package_is_listed_for_the_wheel():
    """pyproject.toml lists the packages by hand (one of them, p4bg.builtin_systems, is the
    systems/ folder under another name): a new subpackage must be added there, or an installed
    p4bg would lack it."""
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
                 ["packages"])  # fmt: skip
    found = {".".join(p.parent.relative_to(ROOT).parts)
             for top in ("p4bg", "analysis") for p in (ROOT / top).rglob("__init__.py")}  # fmt: skip
    assert listed - {"p4bg.builtin_systems"} == found
    mapped = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert mapped["package-dir"]["p4bg.builtin_systems"] == "systems"
    assert any((ROOT / "systems").glob("*/system.toml"))

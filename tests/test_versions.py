"""The tested version range is stated once per place and the places agree:
`titanax._versions.TESTED`, pyproject.toml's lower bounds, the exact pins of the
minimum environment (ci/min-versions.txt) and the README's table; `titanax info`
prints what is installed against it."""

from __future__ import annotations

import importlib.metadata
import re
import tomllib
from pathlib import Path

from titanax._cli import main
from titanax._versions import TESTED, _note, _release, version_rows

ROOT = Path(__file__).resolve().parents[1]


def _name(text: str) -> str:
    return re.sub(r"[-_.]+", "-", text).lower()


def _trimmed(version: str) -> tuple[int, ...]:
    """`"4.66"` and `"4.66.0"` are the same release."""
    release = list(_release(version))
    while len(release) > 1 and release[-1] == 0:
        release.pop()
    return tuple(release)


def _lower_bounds() -> dict[str, str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    out = {}
    for requirement in project["dependencies"]:
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)>=([0-9.]+)", requirement)
        assert match, f"expected `name>=version`, got {requirement!r}"
        out[_name(match.group(1))] = match.group(2)
    return out


def _min_pins() -> dict[str, str]:
    out = {}
    for line in (ROOT / "ci" / "min-versions.txt").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)==([0-9][0-9A-Za-z.+]*)", line)
        assert match, f"expected an exact pin `name==version`, got {line!r}"
        out[_name(match.group(1))] = match.group(2)
    return out


def test_pyproject_lower_bounds_are_the_tested_minimum():
    bounds = _lower_bounds()
    assert sorted(bounds) == sorted(TESTED)  # every runtime dependency has a range
    for name, (oldest, _) in TESTED.items():
        assert _trimmed(bounds[name]) == _trimmed(oldest), name


def test_min_environment_pins_the_tested_minimum_exactly():
    pins = _min_pins()
    for name, (oldest, _) in TESTED.items():
        assert pins.get(name) == oldest, (name, pins.get(name))
    assert "titanax" not in pins  # installed from the tree, without dependencies
    assert {"pytest", "pytest-timeout"} <= set(pins)  # the test run is pinned too


def test_readme_table_states_the_tested_range():
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Supported versions") :]
    rows = re.findall(
        r"^\| ([a-z][a-z /_-]*) \| ([0-9.]+) \| ([0-9.]+) \|$", section, re.M
    )
    table = {}
    for names, oldest, newest in rows:
        for name in names.split(" / "):
            table[name] = (oldest, newest)
    assert table == TESTED


def test_info_prints_installed_versions_against_the_range(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^versions:  package +installed +tested$", out, re.M), out
    for name, (oldest, newest) in TESTED.items():
        have = re.escape(importlib.metadata.version(name))
        row = rf"^ {{11}}{re.escape(name)} +{have} +{oldest} - {newest}( +\(.*\))?$"
        assert re.search(row, out, re.M), (name, out)
    assert [r[0] for r in version_rows()] == ["titanax", *TESTED]


def test_versions_outside_the_range_are_flagged():
    assert _release("0.12.8rc1") == (0, 12, 8)
    assert _note("0.10.10", "0.7.2", "0.10.2") == "newer than tested"
    assert _note("0.6.2", "0.7.2", "0.10.2") == "older than tested"
    assert _note("0.7.10", "0.7.2", "0.10.2") == ""

"""The mutation-testing record (tests/mutation/score.json, written by scripts/mutation_score.py)
is about the modules pyproject.toml configures, adds up, clears the bar the project sets, explains
every mutant the tests do not kill, and still describes the source as it is."""

import json
import sys
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]
RECORD = json.loads((ROOT / "tests" / "mutation" / "score.json").read_text())
#: the share of mutants the fast tier must kill
BAR = 0.85


def test_the_record_covers_the_configured_modules_and_adds_up():
    configured = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mutmut"]
    assert list(RECORD["modules"]) == configured["only_mutate"]
    modules = RECORD["modules"].values()
    assert RECORD["killed"] == sum(m.get("killed", 0) for m in modules)
    assert RECORD["mutants"] == sum(m["mutants"] for m in modules)
    for m in modules:
        assert m["mutants"] == sum(v for k, v in m.items() if k not in ("mutants", "score"))
    not_killed = RECORD["mutants"] - RECORD["killed"]
    assert len(RECORD["survivors"]) == not_killed
    assert RECORD["score"] == round(RECORD["killed"] / RECORD["mutants"], 4)


def test_the_score_clears_the_bar():
    assert RECORD["score"] >= BAR


@pytest.mark.parametrize("survivor", RECORD["survivors"], ids=lambda s: s["mutant"])
def test_every_survivor_is_explained_and_still_in_the_source(survivor):
    assert survivor["reason"] not in ("", "UNEXPLAINED")
    # mutant names are module.function__mutmut_N: the lines it changed are still in that module
    module = survivor["mutant"].split(".x")[0].replace(".", "/") + ".py"
    source = (ROOT / module).read_text()
    removed = [line[1:].strip() for line in survivor["diff"].splitlines() if line[:1] == "-"]
    assert removed and all(line in source for line in removed), module

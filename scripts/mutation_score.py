r"""Mutation testing of the modules a training library must get right, and its record.

    python scripts/mutation_score.py           # mutmut over them, then the record (~1 h, 2 cores)
    python scripts/mutation_score.py --record  # the record from the last run's mutants/ alone

mutmut (``[tool.mutmut]`` in pyproject.toml says which modules and which tests: the fast tier,
``-m "not slow"``, without tests/project, which reads the source files themselves) copies the
project into ``mutants/``, plants one small bug at a time (an operator, a constant, a string, a
dropped argument) and runs the tests that cover the function it sits in. A mutant is *killed*
when one of them fails. The score is killed / all mutants.

The record, ``tests/mutation/score.json``, holds the score per module and every surviving
mutant with its diff and the reason it survives (equivalent to the original, or a behaviour no
test should pin). Reasons are written by hand in that file: a run keeps the reason of a
survivor whose diff is unchanged, and lists the others as unexplained.
``tests/project/test_mutation_record.py`` checks the record against the source.

mutmut forks its workers from a process that has imported torch; with OpenMP's thread pool
started there, a forked worker can hang, and a killed mutant then reads as a timeout. The run
therefore gives each worker one thread (``OMP_NUM_THREADS=1``) and runs two workers at once.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from datetime import date
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
RECORD = ROOT / "tests" / "mutation" / "score.json"
RUN = [sys.executable, "-m", "mutmut", "run", "--max-children", "2"]


def configured_modules() -> list[str]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mutmut"]
    return list(config["only_mutate"])


def run_mutmut() -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    subprocess.run(RUN, cwd=ROOT, env=env, check=True)


def _diff(name: str, path: Path) -> str:
    from mutmut.mutation.diff_apply import get_diff_for_mutant

    lines = get_diff_for_mutant(name, path=path).splitlines()
    return "\n".join(line for line in lines if line[:1] in "+-" and line[:3] not in ("---", "+++"))


def record() -> dict:
    """Read every configured module's results from ``mutants/`` and write the record."""
    from mutmut.__main__ import status_by_exit_code  # the mutation extra; needed here only

    old = json.loads(RECORD.read_text()) if RECORD.exists() else {}
    reasons = {(s["mutant"], s["diff"]): s["reason"] for s in old.get("survivors", [])}
    modules, survivors = {}, []
    os.chdir(ROOT)  # mutmut reads mutants/ from the working directory
    for module in configured_modules():
        meta = json.loads((ROOT / "mutants" / f"{module}.meta").read_text())
        counts: dict[str, int] = {}
        for name, code in sorted(meta["exit_code_by_key"].items()):
            status = status_by_exit_code.get(code, "suspicious")  # mutmut's own names
            counts[status] = counts.get(status, 0) + 1
            if status != "killed":
                diff = _diff(name, Path(module))
                reason = reasons.get((name, diff), "UNEXPLAINED")
                survivors.append({"mutant": name, "status": status, "diff": diff, "reason": reason})
        total = sum(counts.values())
        score = round(counts.get("killed", 0) / total, 4)
        modules[module] = {"mutants": total, **counts, "score": score}
    killed = sum(m.get("killed", 0) for m in modules.values())
    total = sum(m["mutants"] for m in modules.values())
    import mutmut
    import torch

    result = {
        "command": "python scripts/mutation_score.py",
        "date": date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"mutmut {mutmut.__version__}",
        "tests": "python -m pytest -m 'not slow' tests --ignore=tests/project (per mutant: those "
        "that cover its function)",
        "score": round(killed / total, 4),
        "killed": killed,
        "mutants": total,
        "modules": modules,
        "survivors": survivors,
    }
    RECORD.parent.mkdir(parents=True, exist_ok=True)
    RECORD.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--record", action="store_true", help="only write the record from mutants/")
    args = parser.parse_args(argv)
    if not args.record:
        run_mutmut()
    result = record()
    unexplained = sum(s["reason"] == "UNEXPLAINED" for s in result["survivors"])
    print(
        f"mutation score {result['score']:.1%} ({result['killed']} of {result['mutants']} "
        f"killed); {len(result['survivors'])} not killed, {unexplained} unexplained"
    )


if __name__ == "__main__":
    main()

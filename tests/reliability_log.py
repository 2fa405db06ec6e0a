"""The measurements of the fault tests, and the table of ``docs/reliability.md`` rendered from them.

    tests/test_faults*.py, tests/test_soak.py ──record(case, ...)──▶ one JSON line per measurement
        ──▶ $MQEXEC_RELIABILITY_LOG (when set; always printed too, see with ``pytest -s``)
    python tests/reliability_log.py LOG.jsonl ──▶ the Markdown table (one row per case, in case order)

    MQEXEC_RELIABILITY_LOG=/tmp/rel.jsonl python -m pytest tests/test_faults*.py tests/test_soak.py -q
    python tests/reliability_log.py /tmp/rel.jsonl > /tmp/table.md

A row holds what the test measured, not what it hoped: ``recover_s`` is the seconds from the fault to the first
result after it (or to the error the user sees), ``lost`` the calls whose future did not finish with the right
value, ``twice`` the extra runs counted in the tasks' own run log (a task that ran twice counts 1). Later lines of
the same case replace earlier ones (the last run wins).
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

ENV = "MQEXEC_RELIABILITY_LOG"
_COLUMNS = ("fault", "what the user sees", "time to recover", "tasks lost", "tasks run twice")


def record(
    case: str, fault: str, sees: str, *, recover_s: float | None, lost: int, twice: int, **extra: Any
) -> dict[str, Any]:
    """Note one measurement (printed; appended to ``$MQEXEC_RELIABILITY_LOG`` when set) and return it.

    >>> record("1", "a task longer than consumer_timeout", "its result", recover_s=None, lost=0, twice=0)
    """
    row: dict[str, Any] = {"case": case, "fault": fault, "sees": sees, "recover_s": recover_s, "lost": lost}
    row |= {"twice": twice, "extra": extra, "when": time.strftime("%Y-%m-%d %H:%M:%S")}
    print(f"\nreliability {json.dumps(row)}")
    path = os.environ.get(ENV)
    if path:
        with open(path, "a") as fh:
            fh.write(json.dumps(row) + "\n")
    return row


def _order(case: str) -> tuple[int, str]:
    """Issue 9's cases by number ("5-lake" after "5"), then the others (the soaks)."""
    number = re.match(r"\d+", case)
    return (int(number.group()) if number else 1000, case)


def _seconds(row: dict[str, Any]) -> str:
    value = row.get("recover_s")
    return "—" if value is None else f"{value:.1f} s"


def render(rows: list[dict[str, Any]]) -> str:
    """The Markdown table of the last row of each case, in case order."""
    last: dict[str, dict[str, Any]] = {}
    for row in rows:
        last[row["case"]] = row
    lines = ["| case | " + " | ".join(_COLUMNS) + " |", "|---" * (len(_COLUMNS) + 1) + "|"]
    for case in sorted(last, key=_order):
        row = last[case]
        cells = [case, row["fault"], row["sees"], _seconds(row), str(row["lost"]), str(row["twice"])]
        lines.append("| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(f"usage: python {Path(__file__).name} LOG.jsonl   (written by the tests with ${ENV} set)")
        return 2
    rows = [json.loads(line) for line in Path(argv[0]).read_text().splitlines() if line.strip()]
    sys.stdout.write(render(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

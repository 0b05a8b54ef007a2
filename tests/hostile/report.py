"""Run ``tests/test_hostile_inputs.py`` and write the cases that fail, with what mexc printed, as Markdown.

    .venv/bin/python tests/hostile/report.py [OUT.md] [pytest args...]

(default OUT: stdout). One section per test; each failing case lists the commands that misbehaved.
"""

from __future__ import annotations

import datetime
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parents[1]


class Collect:
    def __init__(self):
        self.failed: list[tuple[str, str]] = []
        self.passed = 0

    def pytest_runtest_logreport(self, report):
        if report.when == "call" and report.passed:
            self.passed += 1
        if report.failed:
            text = report.longreprtext
            lines = [l[2:] for l in text.splitlines() if l.startswith("E ")]
            msg = "\n".join(lines) or text[-1500:]
            self.failed.append((report.nodeid.split("::", 1)[-1], msg))


def main() -> int:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 and sys.argv[1].endswith(".md") else None
    extra = sys.argv[2:] if out else sys.argv[1:]
    c = Collect()
    rc = pytest.main(["-q", "-p", "no:cacheprovider", str(TESTS / "test_hostile_inputs.py"), *extra], plugins=[c])
    head = subprocess.run(["git", "-C", str(TESTS), "log", "-1", "--format=%h %s"], capture_output=True,
                          text=True).stdout.strip()
    md = [f"# Hostile-input cases that fail ({datetime.datetime.utcnow():%Y-%m-%d %H:%M} UTC)", "",
          f"Tree: {head} plus the uncommitted work in progress. Command: `.venv/bin/python tests/hostile/report.py "
          f"/work/notes/hostile-failures.md` (= `pytest -q tests/test_hostile_inputs.py`).", "",
          f"**{len(c.failed)} failing, {c.passed} passing.** Each line: what is wrong <- the command, how it ended, "
          "its stderr.", "",
          "What every case asserts (tests/hostile/forkserver.py `problems`): no hang (60 s), no death by a signal, "
          "no traceback, the canary absent, nothing left in the output's parent; and, unless the case allows "
          "acceptance, a non-zero exit with exactly one `error:` line (plus at most a `hint:`) naming the file "
          "(any of the fragments the case lists). Allowed to succeed: payloads in pickles mexc never needs to "
          "unpickle (DCP tensor chunk, `_extra_state`), harmless payloads (numpy shapes never allocated, a 4M "
          "list, a memo DAG outside `model`), and the mutations marked `refuse=False` in tests/hostile/mutate.py "
          "(offset+1: zipfile finds the same bytes; seq_length=1e18, kv_channels=0; a FIFO tracker when one "
          "iteration exists). `inspect` may pass where only reading tensor bytes shows the lie (length-1, dtype "
          "changes).", ""]
    groups: dict[str, list] = {}
    for node, msg in c.failed:
        groups.setdefault(node.split("[")[0], []).append((node, msg))
    for test, items in groups.items():
        md += [f"## {test} ({len(items)})", ""]
        for node, msg in items:
            md += [f"### `{node}`", "", "```", msg.replace("\x00", "\\0")[:4000], "```", ""]
    text = "\n".join(md) + "\n"
    if out:
        out.write_text(text)
    else:
        sys.stdout.write(text)
    return int(rc)


if __name__ == "__main__":
    sys.exit(main())

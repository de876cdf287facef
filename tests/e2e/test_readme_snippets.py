"""The README's application snippets run verbatim against the Compose stack
(only its address and token are the test stack's)."""

from __future__ import annotations

import re
import subprocess
import sys

from tests.e2e.support import ROOT, Stack


def python_snippet(section: str) -> str:
    readme = (ROOT / "README.md").read_text()
    body = readme.split(f"### {section}", 1)[1]
    match = re.search(r"```python\n(.*?)```", body, re.S)
    assert match, f"no python block under {section!r}"
    return match.group(1)


def test_the_python_snippet_publishes_and_streams(stack: Stack) -> None:
    code = python_snippet("From Python")
    code = code.replace("http://127.0.0.1:8080", stack.base_url)
    code = code.replace('token="..."', f'token="{stack.token}"')
    command = [sys.executable, "-c", code]
    run = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert len(lines) == 3, run.stdout
    assert [line.split(" ", 3)[1:3] for line in lines] == [
        ["orders", "created"],
        ["orders", "created"],
        ["audit", "message"],
    ]
    assert lines[0].endswith("{'id': 17}") and lines[2].endswith(" x")

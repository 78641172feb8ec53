"""Every ```python block in README.md and docs/*.md runs as written.

A block opts out only with the explicit marker ```` ```python no-run ```` (for code that needs several processes
or a GPU); every fence names its language, so a Python block cannot hide as an unlabelled one. Each block runs
on its own, in a fresh namespace, in a temporary working directory, with a time limit.
"""

from __future__ import annotations

import re
import signal
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>```+|~~~+)(?P<info>.*)$")
LIMIT_S = 60


def blocks(path: Path) -> list[tuple[int, str, str]]:
    """``(line, info string, code)`` of every fenced block of ``path``."""
    out, lines, i = [], path.read_text(encoding="utf-8").splitlines(), 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, info, start, body = m["fence"], m["info"].strip(), i + 1, []
        i += 1
        while i < len(lines) and not lines[i].strip().startswith(fence):
            body.append(lines[i])
            i += 1
        out.append((start, info, "\n".join(body) + "\n"))
        i += 1
    return out


def python_blocks() -> list[tuple[str, int, str]]:
    found = []
    for page in PAGES:
        for line, info, code in blocks(page):
            words = info.split()
            if words and words[0] == "python" and "no-run" not in words[1:]:
                found.append((str(page.relative_to(ROOT)), line, code))
    return found


SNIPPETS = python_blocks()


def test_pages_exist_and_hold_snippets():
    names = {p.name for p in PAGES}
    assert {"README.md", "api.md", "methods.md", "cli.md", "formats.md", "results.md"} <= names
    assert len(SNIPPETS) >= 5


def test_every_fence_names_its_language():
    unlabelled = [f"{p.relative_to(ROOT)}:{line}" for p in PAGES for line, info, _ in blocks(p) if not info]
    assert unlabelled == []


def test_only_the_explicit_marker_opts_out():
    for page in PAGES:
        for line, info, code in blocks(page):
            words = info.split()
            if words and words[0] in ("py", "python3", "pycon", "Python"):
                pytest.fail(f"{page.name}:{line}: write ```python (or ```python no-run), not ```{words[0]}")
            if words[:1] == ["python"] and len(words) > 1:
                assert words[1:] == ["no-run"], f"{page.name}:{line}: unknown marker {info!r}"
                assert code.lstrip().startswith("#"), f"{page.name}:{line}: a no-run block says why in a comment"


def test_readme_starts_with_the_two_commands():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    commands = [
        ln.split("#")[0].strip()
        for _, info, code in blocks(ROOT / "README.md")
        if info == "bash"
        for ln in code.splitlines()
        if ln.strip() and not ln.lstrip().startswith("#")
    ]
    assert commands[:2] == ["make demo", "make test"]
    assert len(text.splitlines()) < 120


def test_readme_links_resolve_or_are_announced():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    links = re.findall(r"\]\((docs/[^)#]+)", text)
    assert links
    # pages that other work adds are linked already (docs/replication.md, ...); ours must exist
    for link in links:
        if link in ("docs/replication.md", "docs/transformers.md", "docs/routing_fast.md", "docs/gpu.md"):
            continue
        assert (ROOT / link).is_file(), link


class _Timeout(Exception):
    pass


@pytest.mark.parametrize("page, line, code", SNIPPETS, ids=[f"{p}:{n}" for p, n, _ in SNIPPETS])
def test_snippet_runs(page, line, code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MPLBACKEND", "Agg")

    def alarm(signum, frame):
        raise _Timeout(f"{page}:{line} ran longer than {LIMIT_S} s: keep snippets small")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(LIMIT_S)
    try:
        exec(compile(code, f"{page}:{line}", "exec"), {"__name__": "__snippet__"})
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)

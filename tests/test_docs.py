"""The documentation is checked, not hoped: README.md, CHANGELOG.md and docs/*.md.

- every relative link and image resolves inside the repository, and every `#anchor` names a heading;
- every `pneumoscan ...` command in the README's code blocks (and in docs/) parses with the real
  command-line parser, and `python -m pneumoscan SUBCOMMAND --help` runs for each subcommand used;
- the README stays short, with the tour's five commands in it;
- no words that describe how the project was developed rather than what it is.

Each check is a function that returns its problems; the last tests feed them a page with one mistake of
each kind, so a check that stopped finding anything would fail there.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote

import pytest

from pneumoscan.apps.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, ROOT / "CHANGELOG.md", *DOCS]
README_MAX_LINES = 300
TOUR_HEADING = "Five-minute tour"
TOUR_COMMANDS = {"train", "evaluate", "predict", "explain", "serve"}
SHELL_BLOCKS = {"bash", "sh", "shell", "console", "zsh"}
EXTERNAL = re.compile(r"^(https?|mailto):", re.IGNORECASE)
ANY_SCHEME = re.compile(r"^[a-z][a-z0-9+.-]*:", re.IGNORECASE)

# words about how the project was developed, not what it is (case-insensitive unless compiled otherwise)
FORBIDDEN = [
    re.compile(r"\bsessions?\b", re.IGNORECASE),
    re.compile(r"\bcalls? [0-9]", re.IGNORECASE),
    re.compile(r"SPEC\.md", re.IGNORECASE),
    re.compile(r"\bSPEC\b"),
    re.compile(r"\.\./shared"),
    re.compile(r"this project's (\w+ )?machine", re.IGNORECASE),
    re.compile(r"\bbefore \(", re.IGNORECASE),
    re.compile(r"\brows? [0-9]", re.IGNORECASE),
    re.compile(r"\b[0-9]+(\.[0-9]+)? ?m?s target\b", re.IGNORECASE),
    re.compile(r"short script", re.IGNORECASE),
    # a commit hash: 7-40 lowercase hex characters with at least one digit and one letter
    re.compile(r"\b(?=[0-9a-f]*[a-f])(?=[0-9a-f]*[0-9])[0-9a-f]{7,40}\b"),
]


# --- reading Markdown -----------------------------------------------------------------------------------

FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})\s*([^`\s]*)")


def split_markdown(text: str) -> tuple[list[str], list[tuple[str, list[str]]]]:
    """(prose lines, code blocks as (info string, lines)); prose keeps line positions, code lines blanked."""
    prose: list[str] = []
    blocks: list[tuple[str, list[str]]] = []
    fence: str | None = None
    for line in text.splitlines():
        m = FENCE.match(line)
        if fence is None and m:
            fence, info, body = m.group(1), m.group(2).lower(), []
            prose.append("")
        elif fence is not None:
            if m and m.group(1)[0] == fence[0] and len(m.group(1)) >= len(fence) and not line.strip().strip(fence[0]):
                blocks.append((info, body))
                fence = None
            else:
                body.append(line)
            prose.append("")
        else:
            prose.append(line)
    if fence is not None:
        blocks.append((info, body))  # unclosed: still a block
    return prose, blocks


def without_code_spans(line: str) -> str:
    return re.sub(r"(`+).+?\1", "", line)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: rendered text, lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"\s+#+\s*$", "", heading.strip())
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)  # links and images: their text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "").replace("*", "")
    return re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    prose, _ = split_markdown(path.read_text(encoding="utf-8"))
    seen: dict[str, int] = {}
    found: set[str] = set()
    for line in prose:
        m = re.match(r"^ {0,3}#{1,6}\s+(.*)$", line)
        if m:
            base = slug(m.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            found.add(base if n == 0 else f"{base}-{n}")
        for a in re.findall(r"<a\s+[^>]*?(?:id|name)\s*=\s*\"([^\"]+)\"", line):
            found.add(a)
    return found


LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*(<[^>]*>|[^)\s]+)(?:\s+(?:\"[^\"]*\"|'[^']*'))?\s*\)")
REF_DEF = re.compile(r"^ {0,3}\[[^\]]+\]:\s*(<[^>]*>|\S+)")
HTML_REF = re.compile(r"<(?:img|a|source)\b[^>]*?\b(?:src|href)\s*=\s*[\"']([^\"']+)[\"']", re.IGNORECASE)


def link_targets(text: str) -> list[str]:
    prose, _ = split_markdown(text)
    targets: list[str] = []
    for line in prose:
        line = without_code_spans(line)
        targets += [t.strip("<>") for t in LINK.findall(line)]
        targets += [t.strip("<>") for t in REF_DEF.findall(line)]
        targets += HTML_REF.findall(line)
    return targets


# --- the checks: each returns a list of problems --------------------------------------------------------

def broken_links(page: Path, root: Path = ROOT) -> list[str]:
    problems = []
    for target in link_targets(page.read_text(encoding="utf-8")):
        if EXTERNAL.match(target):
            continue
        where = f"{page.relative_to(root)}: ({target})"
        if ANY_SCHEME.match(target):
            problems.append(f"{where}: only http(s) and mailto links may leave the repository")
            continue
        path_part, _, anchor = target.partition("#")
        dest = (page.parent / unquote(path_part)).resolve() if path_part else page.resolve()
        if not dest.is_relative_to(root.resolve()):
            problems.append(f"{where}: points outside the repository")
        elif not dest.exists():
            problems.append(f"{where}: {dest.relative_to(root.resolve())} does not exist")
        elif anchor and dest.suffix.lower() == ".md" and unquote(anchor).lower() not in anchors(dest):
            problems.append(f"{where}: no heading with the anchor #{anchor} in {dest.name}")
    return problems


def shell_commands(text: str) -> list[str]:
    """`pneumoscan ...` lines of the shell code blocks, also as `python -m pneumoscan` or `torchrun ... -m
    pneumoscan` (continuation lines joined, `$ ` prompts dropped)."""
    _, blocks = split_markdown(text)
    commands = []
    for info, lines in blocks:
        if info not in SHELL_BLOCKS:
            continue
        joined, pending = [], ""
        for line in lines:
            if line.rstrip().endswith("\\"):
                pending += line.rstrip()[:-1] + " "
                continue
            joined.append(pending + line)
            pending = ""
        for line in joined:
            line = re.sub(r"^\s*\$\s+", "", line).strip()
            if re.match(r"^(\.venv/bin/)?pneumoscan\s", line) or re.search(r"(^|\s)-m pneumoscan\s", line):
                commands.append(line)
    return commands


PLACEHOLDERS = {"N": "1", "S": "0", "SEED": "0", "PORT": "8000"}
SHELL_OPERATORS = {"|", "||", "&&", ";", "&", ">", ">>", "2>", "2>&1"}


def command_args(command: str) -> list[str]:
    """The arguments after the program name, up to a comment or a shell operator."""
    tokens = shlex.split(command, comments=True)
    start = tokens.index("pneumoscan") + 1 if "pneumoscan" in tokens else 1
    args = []
    for token in tokens[start:]:
        if token in SHELL_OPERATORS:
            break
        args.append(PLACEHOLDERS.get(token, token))
    return args


def subcommands(parser: argparse.ArgumentParser) -> set[str]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return set(action.choices)
    return set()


def unparsable(command: str) -> str | None:
    """None when the real parser accepts the command; otherwise why not."""
    parser = build_parser()
    try:
        args = command_args(command)
    except ValueError as e:
        return f"{command!r}: not a shell line ({e})"
    if not args or args[0] not in subcommands(parser):
        return f"{command!r}: {args[0] if args else '(nothing)'} is not a pneumoscan subcommand"
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            parser.parse_args(args)
    except SystemExit as e:
        if e.code not in (0, None):
            return f"{command!r}: {err.getvalue().strip().splitlines()[-1] if err.getvalue().strip() else e}"
    return None


def forbidden_words(page: Path) -> list[str]:
    problems = []
    for n, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
        for pattern in FORBIDDEN:
            m = pattern.search(line)
            if m:
                problems.append(f"{page.name}:{n}: {m.group(0)!r} in {line.strip()[:100]!r}")
    return problems


def section(text: str, heading: str) -> str:
    """The text under a level-2 heading, up to the next level-2 heading."""
    m = re.search(rf"^## {re.escape(heading)}\s*$(.*?)(?=^## |\Z)", text, re.MULTILINE | re.DOTALL)
    return m.group(1) if m else ""


# --- the tests ------------------------------------------------------------------------------------------

def test_the_pages_exist():
    names = {p.name for p in DOCS}
    assert {"experiments.md", "performance.md", "gpu.md", "serving.md", "design.md"} <= names
    assert README.is_file() and (ROOT / "CHANGELOG.md").is_file()


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_and_image_resolves(page):
    assert broken_links(page) == []


def test_the_readme_is_short():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; at most {README_MAX_LINES}"


def test_the_quick_start_is_make_run_and_make_test():
    quick = section(README.read_text(encoding="utf-8"), "Quick start")
    _, blocks = split_markdown(quick)
    commands = [line.split("#")[0].strip() for _, lines in blocks for line in lines if line.split("#")[0].strip()]
    assert commands == ["make run", "make test"]
    assert "not a medical device" in README.read_text(encoding="utf-8")


def test_the_tour_shows_each_main_command():
    tour = section(README.read_text(encoding="utf-8"), TOUR_HEADING)
    assert tour, f"README.md has no '## {TOUR_HEADING}' section"
    used = {command_args(c)[0] for c in shell_commands(tour)}
    assert TOUR_COMMANDS <= used, f"the tour lacks {sorted(TOUR_COMMANDS - used)}"


def test_every_readme_command_parses():
    commands = shell_commands(README.read_text(encoding="utf-8"))
    assert len(commands) >= len(TOUR_COMMANDS)
    assert [p for p in map(unparsable, commands) if p] == []


def test_every_docs_command_parses():
    problems = []
    for page in DOCS:
        problems += [f"{page.name}: {p}" for p in map(unparsable, shell_commands(page.read_text(encoding="utf-8"))) if p]
    assert problems == []


def test_help_runs_for_every_subcommand_the_readme_uses():
    used = sorted({command_args(c)[0] for c in shell_commands(README.read_text(encoding="utf-8"))})
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))}
    runs = {sub: subprocess.Popen([sys.executable, "-m", "pneumoscan", sub, "--help"], cwd=ROOT, env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for sub in used}
    for sub, proc in runs.items():
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, f"python -m pneumoscan {sub} --help: exit {proc.returncode}\n{err}"
        assert f"usage: pneumoscan {sub}" in out


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_words_about_how_the_project_was_developed(page):
    assert forbidden_words(page) == []


# --- the checks can fail --------------------------------------------------------------------------------

BAD_PAGE = """# Title

## A section

[fine](#a-section) [missing file](nowhere.md) [bad anchor](#no-such-heading) [outside](../../etc/passwd)
![missing image](missing.png) [other page, bad anchor](other.md#nope) [other page](other.md#real-one)
[local file](file:///etc/passwd) [web](https://example.org/x.md) `[in code](ignored.md)`

```bash
pneumoscan train --data d --out r --epochs many
pneumoscan frobnicate x
pneumoscan evaluate ckpt.pt --split val --out e
```

Measured in the last session (call 2), before (16f78af), row 5, on this project's machine: see SPEC.md.
"""


def test_the_checks_find_each_kind_of_mistake(tmp_path):
    (tmp_path / "docs").mkdir()
    page = tmp_path / "docs" / "page.md"
    page.write_text(BAD_PAGE)
    (tmp_path / "docs" / "other.md").write_text("# Other\n\n## Real one\n")
    links = broken_links(page, root=tmp_path)
    assert len(links) == 6, links
    for text in ("nowhere.md", "#no-such-heading", "outside the repository", "missing.png", "#nope", "file:"):
        assert any(text in p for p in links), (text, links)
    problems = [unparsable(c) for c in shell_commands(BAD_PAGE)]
    assert problems[0] and "--epochs" in problems[0] and "many" in problems[0]
    assert problems[1] and "frobnicate" in problems[1]
    assert problems[2] is None
    words = forbidden_words(page)
    for text in ("session", "call 2", "before (", "16f78af", "row 5", "project's machine", "SPEC.md"):
        assert any(text in p for p in words), (text, words)


def test_slugs_follow_github():
    assert slug("The paper's recipe, one run") == "the-papers-recipe-one-run"
    assert slug("`train` and `evaluate`") == "train-and-evaluate"
    assert slug("Grad-CAM examples") == "grad-cam-examples"
    assert slug("Large batches (3 seeds) ##") == "large-batches-3-seeds"
    assert slug("Design choices, measured") == "design-choices-measured"

"""The docs hold up: README.md and docs/*.md against the code they describe.

"A recipe you document is a test you owe." A fenced block tagged ``sh`` is a recipe a user runs as
written; other tags (``console``, ``text``, ``ini``, ``json``, ``python``, ...) are illustrations.
So for every page:

1. README.md is at most 300 lines;
2. every relative link (a file, a folder, a ``#anchor`` by GitHub's slug rules) resolves;
3. every ``ttsd ...`` command in a ``sh`` block parses against the real click command line;
4. every ``curl`` in a ``sh`` block names a route (and method) ``ttsd/front/http_api.py`` serves;
5. every ``examples/...`` or ``bench/...`` path named anywhere exists.

Fast and offline: the CLI's commands are parsed, never invoked; routes are read from the source.
"""

from __future__ import annotations

import ast
import os
import re
import shlex
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import click
import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
MAX_README_LINES = 300


def pages() -> list[Path]:
    return [README, *sorted((ROOT / "docs").glob("*.md"))]


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


# -- reading markdown ------------------------------------------------------------------------------
FENCE = re.compile(r"^ {0,3}(```+|~~~+)\s*([\w+-]*)")


@dataclass(frozen=True)
class Block:
    lang: str
    line: int  # 1-based line of the block's first content line
    text: str


def split(text: str) -> tuple[list[Block], list[tuple[int, str]]]:
    """Fenced code blocks, and the prose lines outside them (with their line numbers)."""
    blocks: list[Block] = []
    prose: list[tuple[int, str]] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            prose.append((i + 1, lines[i]))
            i += 1
            continue
        fence, lang = m.group(1), m.group(2).lower()
        body: list[str] = []
        start = i + 2
        i += 1
        while i < len(lines) and not lines[i].strip().startswith(fence):
            body.append(lines[i])
            i += 1
        i += 1  # the closing fence
        blocks.append(Block(lang, start, "\n".join(body)))
    return blocks, prose


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup dropped, lower case, punctuation other than ``-`` and
    ``_`` dropped, each space a ``-``."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # links and images: their text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "").strip().lower()
    return "".join("-" if ch == " " else ch for ch in text if ch in "-_ " or unicodedata.category(ch)[0] in "LN")


def anchors(path: Path) -> set[str]:
    """Every anchor GitHub makes for the headings of ``path`` (repeats get -1, -2, ...)."""
    _, prose = split(path.read_text(encoding="utf-8"))
    seen: dict[str, int] = {}
    found = set()
    for _, line in prose:
        m = re.match(r"^ {0,3}#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        base = slug(m.group(1))
        n = seen.get(base, 0)
        seen[base] = n + 1
        found.add(base if n == 0 else f"{base}-{n}")
    return found


LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
CODE_SPAN = re.compile(r"(`+).*?\1")


def links(path: Path) -> Iterator[tuple[int, str]]:
    _, prose = split(path.read_text(encoding="utf-8"))
    for number, line in prose:
        for m in LINK.finditer(CODE_SPAN.sub("", line)):
            yield number, m.group(1)


def link_problem(page: Path, target: str) -> str | None:
    """Why ``target`` (a link on ``page``) does not resolve, or None. External links are not
    fetched (no network in tests)."""
    if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:
        return None
    part, _, anchor = target.partition("#")
    dest = Path(os.path.normpath(page.parent / part)) if part else page  # not resolve(): links stay in the tree
    if not dest.exists():
        return f"{part} does not exist"
    if ROOT not in dest.parents and dest != ROOT:
        return f"{part} is outside the repository"
    if anchor:
        if dest.suffix != ".md" or dest.is_dir():
            return f"#{anchor} on {part}, which is not a markdown file"
        if anchor not in anchors(dest):
            return f"{rel(dest)} has no heading with the anchor #{anchor}"
    return None


# -- shell commands in sh blocks ---------------------------------------------------------------------
SEPARATORS = {"|", "||", "&&", ";", "&", "|&"}
REDIRECT = re.compile(r"^(\d*|&)(>>?|<<?|>&|<&)(.*)$")
ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")


def sh_commands(text: str) -> Iterator[list[str]]:
    """Each simple command of a shell snippet as its words: comments, pipes, ``&&``, ``;``, ``&``,
    redirections and leading ``VAR=value`` assignments taken off. Lines ending in ``\\`` join."""
    joined = re.sub(r"\\\n", " ", text)
    for line in joined.splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars="|&;<>")
        lexer.whitespace_split = True
        lexer.commenters = "#"
        words = list(lexer)
        command: list[str] = []
        skip_next = False
        words = [*words, ";"]
        for i, word in enumerate(words):
            if skip_next:
                skip_next = False
                continue
            if word.isdigit() and i + 1 < len(words) and words[i + 1][0] in "<>":
                continue  # the 2 of "2>file", which shlex splits off
            if word in SEPARATORS:
                if command:
                    yield command
                command = []
                continue
            m = REDIRECT.match(word)
            if m and (word[0] in "<>&" or m.group(1)):
                skip_next = not m.group(3)  # "> file" (target next) or ">file"
                continue
            if not command and ASSIGNMENT.match(word):
                continue
            command.append(word)


def ttsd_commands(text: str) -> Iterator[list[str]]:
    for words in sh_commands(text):
        if words and Path(words[0]).name == "ttsd":
            yield words[1:]


def parse_error(args: list[str]) -> str | None:
    """Why ``ttsd ARGS`` does not parse against the real CLI, or None: each group's own options,
    then the sub-command, down to the command that runs, parsed with ``make_context``."""
    from ttsd.cli import main

    command: click.Command = main
    parent: click.Context | None = None
    name = "ttsd"
    try:
        while True:
            ctx = command.make_context(name, list(args), parent=parent, resilient_parsing=False)
            if not isinstance(command, click.Group):
                return None
            # click 8.2 keeps the sub-command in _protected_args (protected_args is deprecated)
            protected = ctx._protected_args if hasattr(ctx, "_protected_args") else ctx.protected_args
            rest = [*protected, *ctx.args]
            if not rest:
                return None  # a group alone prints its help
            sub = command.get_command(ctx, rest[0])
            if sub is None:
                return f"no command {rest[0]!r} in {ctx.command_path}"
            command, parent, name, args = sub, ctx, rest[0], rest[1:]
    except click.exceptions.Exit:  # --help, --version
        return None
    except click.ClickException as exc:
        return exc.format_message()


# -- curl and the HTTP API's routes --------------------------------------------------------------------
def registered_routes() -> list[tuple[str, re.Pattern[str], str]]:
    """(method, path pattern, path) of every ``router.add_<method>(path, ...)`` in
    ``ttsd/front/http_api.py`` and the modules it imports its routes from (``page.add_routes``)."""
    routes = []
    for name in ("http_api.py", "page.py"):
        tree = ast.parse((ROOT / "ttsd" / "front" / name).read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            method = node.func.attr.removeprefix("add_")
            if not node.func.attr.startswith("add_") or method not in {"get", "post", "put", "delete", "patch"}:
                continue
            if not node.args or not isinstance(node.args[0], ast.Constant) or not isinstance(node.args[0].value, str):
                continue
            path = node.args[0].value
            pattern = re.compile("^" + re.sub(r"\\\{\w+\\\}", "[^/]+", re.escape(path)) + "$")
            routes.append((method.upper(), pattern, path))
    return routes


DATA_FLAGS = ("-d", "--data", "--data-raw", "--data-binary", "--data-urlencode", "--json", "-F", "--form")


def curl_request(words: list[str]) -> tuple[str, str] | None:
    """(method, path) a curl command sends to the daemon, or None when it names no http(s) URL."""
    url = next((w for w in words if re.match(r"^https?://", w)), None)
    if url is None:
        return None
    method = "GET"
    for word in words:
        if word in DATA_FLAGS or any(word.startswith(f) and f.startswith("--") and "=" in word for f in DATA_FLAGS):
            method = "POST"
        if word in ("-I", "--head"):
            method = "HEAD"
    for i, word in enumerate(words):
        if word in ("-X", "--request") and i + 1 < len(words):
            method = words[i + 1].upper()
        elif word.startswith("-X") and len(word) > 2:
            method = word[2:].upper()
    return method, urlsplit(url).path or "/"


def route_problem(method: str, path: str) -> str | None:
    routes = registered_routes()
    matching = [(m, p) for m, pattern, p in routes if pattern.match(path)]
    if not matching:
        return f"no route {path} in ttsd/front/http_api.py"
    allowed = {m for m, _ in matching} | ({"HEAD"} if any(m == "GET" for m, _ in matching) else set())
    if method not in allowed:
        return f"{path} takes {', '.join(sorted(allowed))}, not {method}"
    return None


# -- paths named in the docs -----------------------------------------------------------------------
REPO_PATH = re.compile(r"(?<![\w./-])((?:examples|bench)/[\w./@-]*)")


def named_paths(text: str) -> Iterator[str]:
    for m in REPO_PATH.finditer(text):
        path = m.group(1).rstrip(".")
        if path.endswith("/") or re.search(r"\.\w+$", path) or "/" in path.strip("/"):
            yield path


# -- the tests -------------------------------------------------------------------------------------
def test_readme_is_at_most_300_lines() -> None:
    lines = len(README.read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_README_LINES, f"README.md has {lines} lines; move detail into docs/"


def test_there_are_pages_and_recipes() -> None:
    """The checks below would pass vacuously on empty docs."""
    assert len(pages()) > 5
    recipes = [b for p in pages() for b in split(p.read_text(encoding="utf-8"))[0] if b.lang == "sh"]
    assert any(list(ttsd_commands(b.text)) for b in recipes)
    assert any("curl" in b.text for b in recipes)
    assert len(registered_routes()) >= 10


@pytest.mark.parametrize("page", pages(), ids=rel)
def test_relative_links_resolve(page: Path) -> None:
    problems = [f"{rel(page)}:{n}: {t}: {why}" for n, t in links(page) if (why := link_problem(page, t))]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("page", pages(), ids=rel)
def test_ttsd_commands_in_sh_blocks_parse(page: Path) -> None:
    problems = []
    for block in split(page.read_text(encoding="utf-8"))[0]:
        if block.lang != "sh":
            continue
        for args in ttsd_commands(block.text):
            if why := parse_error(args):
                problems.append(f"{rel(page)} (block at line {block.line}): ttsd {shlex.join(args)}: {why}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("page", pages(), ids=rel)
def test_curl_in_sh_blocks_uses_real_routes(page: Path) -> None:
    problems = []
    for block in split(page.read_text(encoding="utf-8"))[0]:
        if block.lang != "sh":
            continue
        for words in sh_commands(block.text):
            if not words or words[0] != "curl":
                continue
            request = curl_request(words)
            if request is None:
                problems.append(f"{rel(page)} (block at line {block.line}): curl without a URL: {shlex.join(words)}")
            elif why := route_problem(*request):
                problems.append(f"{rel(page)} (block at line {block.line}): {why}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("page", pages(), ids=rel)
def test_named_examples_and_bench_paths_exist(page: Path) -> None:
    text = page.read_text(encoding="utf-8")
    missing = sorted({p for p in named_paths(text) if not (ROOT / p).exists()})
    assert not missing, f"{rel(page)} names paths that do not exist: {', '.join(missing)}"


# -- the helpers themselves --------------------------------------------------------------------------
def test_slug_follows_githubs_rules() -> None:
    assert slug("POST /v1/audio/speech (OpenAI)") == "post-v1audiospeech-openai"
    assert slug("Left alone: the soak") == "left-alone-the-soak"
    assert slug("The `ttsd` command") == "the-ttsd-command"
    assert slug("bf16: what each part buys") == "bf16-what-each-part-buys"


def test_shell_words_drop_redirections_pipes_and_assignments() -> None:
    text = "echo hi | ttsd say - -o - 2>/dev/null | aplay\nTTSD_MIRROR=http://x/ ttsd models get v > log &  # c"
    assert list(ttsd_commands(text)) == [["say", "-", "-o", "-"], ["models", "get", "v"]]


def test_a_renamed_flag_or_command_fails_to_parse() -> None:
    assert parse_error(["serve", "--listen", "127.0.0.1:8080"]) is None
    assert parse_error(["models", "get", "joe", "--upgrade"]) is None
    assert parse_error(["serve", "--no-such-flag"]) is not None
    assert parse_error(["models", "fetch", "joe"]) is not None
    assert parse_error(["say", "hello"]) is not None  # -o is required


def test_curl_routes_are_matched_with_their_method() -> None:
    assert route_problem("POST", "/v1/voices/joe/rollback") is None
    assert route_problem("GET", "/v1/voices/joe/rollback") is not None
    assert route_problem("GET", "/v1/speak") is not None
    assert curl_request(["curl", "http://localhost/v1/synthesize", "-d", "{}"]) == ("POST", "/v1/synthesize")


def exit_code_table() -> dict[int, str]:
    """docs/cli.md's table of exit codes: code -> "meaning | example"."""
    text = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    section = text.split("## Errors and exit codes", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| (\d+) \| (.*) \|$", section, re.M)
    return {int(code): rest for code, rest in rows}


def test_the_exit_code_table_is_the_codes_ttsd_exits_with() -> None:
    """Every exit code an error type carries, and the CLI's own (0, 1, 2, 130), is in the table
    once, and the table names no other: one table for every path (tests/test_cli.py checks an
    unknown voice in-process and through a daemon against it)."""
    import ttsd.errors as errors
    from ttsd.cli import EXIT_INTERNAL, EXIT_INTERRUPTED

    def subclasses(cls: type) -> Iterator[type]:
        for sub in cls.__subclasses__():
            yield sub
            yield from subclasses(sub)

    used = {cls.exit_code for cls in subclasses(errors.TtsdError)} | {0, EXIT_INTERNAL, 2, EXIT_INTERRUPTED}
    table = exit_code_table()
    assert set(table) == used, (sorted(set(table) - used), sorted(used - set(table)))
    assert "unknown voice" in table[errors.UnknownVoiceError.exit_code]
    assert "unknown voice" not in table[errors.ConfigError.exit_code]



def test_architecture_names_every_module() -> None:
    """docs/architecture.md's layout names each module of the package (a new module, or one split in
    two, shows up there too)."""
    layout = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    missing = [rel(p) for p in sorted((ROOT / "ttsd").rglob("*.py"))
               if p.name not in ("__init__.py", "__main__.py") and p.name not in layout]
    assert missing == []

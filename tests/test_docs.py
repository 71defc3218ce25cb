"""The documentation's code runs, and prints what the pages say it prints.

Every ```python block of every page of `docs/` (except the API reference, `docs/api/`,
whose code lives in docstrings, and pages still marked "(Being written.)") is executed,
in order, page by page, each page in one namespace of its own, in a fresh Python process
with the 8 CPU devices that `conftest.py` forces and its strict dtype promotion (except
where `PROMOTION` says otherwise). Rank promotion is left at JAX's default: the pages are
code as readers write it, and `x * weight` with shapes `(4, 16)` and `(16,)` should read
as such. A fresh process per page keeps the pages independent of each other and of the
other tests: a page that demonstrates a run-time error leaves JAX's runtime tokens
holding that error.

**Outputs.** A ```text block that follows a ```python block, with only blank lines
between, is that block's expected standard output. The block's output is captured and
compared with it line by line, trailing whitespace stripped (and trailing blank lines
ignored), where

- a line that is exactly `...` matches any number of lines, none included;
- a line ending in `...` matches any line that starts with the text before the `...`;
- where the text block says `rtol` (```` ```text {rtol="1e-5"} ````), the numbers in a
  line are compared with that relative tolerance, the text around them exactly: for
  losses printed to many digits, whose last digit differs between JAX versions (XLA's
  floating-point rounding changes between releases). Without it, lines match exactly.

A block that prints (a `print` call outside a function or class it defines, or any
output at all) must be followed by its text block, so that every output is shown on the
page. The printed outputs assume 8 devices.

Fence attributes, written after the language (```` ```python {.no-run} ````):

- `.no-run`: shown, never executed (use sparingly). Its text block, if any, is not
  checked.
- `.no-output`: executed, its output not shown nor checked: for what changes from run to
  run (timings, memory addresses). Use sparingly.
- `.xfail`: executed and expected to raise one of the errors in `KNOWN_ISSUES`, for a
  known issue that the page documents. When the block stops raising, this test fails so
  that the marker and the page's note about the issue are removed; when it raises
  something else, it fails too. Its output is not checked.

The code runs with warnings as errors, less the third-party warnings that
`pyproject.toml`'s `filterwarnings` ignores (the list pytest applies to the tests).

Tracebacks and mismatches point at the Markdown file and line.
"""

import ast
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import textwrap
import tomllib

import pytest


ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PLACEHOLDER = "(Being written.)"


def _is_placeholder(text: str) -> bool:
    """A page not written yet: a heading and "(Being written.)"."""
    body = [
        line.strip()
        for line in text.splitlines()
        if line.strip() and not line.startswith("#")
    ]
    return body == [PLACEHOLDER]


def _all_pages() -> list[str]:
    return sorted(
        p.relative_to(DOCS).as_posix()
        for p in DOCS.rglob("*.md")
        if p.relative_to(DOCS).parts[0] != "api"
    )


# optax mixes Python floats with int32 step counters, which strict promotion refuses; the
# pages that train with optax are run with JAX's default (standard) promotion, as their
# readers run them.
PROMOTION = {"tutorials/training.md": "standard", "tutorials/zero.md": "standard"}

# The errors that `.xfail` blocks may raise: substrings of their messages.
KNOWN_ISSUES: dict[str, str] = {
    # None at present. (The two BatchNorm issues once listed here, a collective over a
    # vmap axis and the device axis at once, and `mode="ema"`, were JAX's varying-axis
    # typing, which pmap2 no longer traces with.)
}

_OPEN = re.compile(r"^(?P<indent>[ \t]*)(?P<ticks>`{3,}|~{3,})\s*(?P<info>[^`]*?)\s*$")


def _info(info: str) -> tuple[str, set[str], dict[str, str]]:
    """The language, the classes and the key-value attributes of a fence's info string:
    `python {.no-run}`, `{.python .no-run}` or `text {rtol="1e-5"}`."""
    lang, classes, attrs_kv = "", set(), {}
    brace = info.find("{")
    head, attrs = (info, "") if brace < 0 else (info[:brace], info[brace:])
    head = head.strip()
    if head:
        lang = head.split()[0]
    for token in attrs.strip("{} ").split():
        if token.startswith("."):
            if not lang:
                lang = token[1:]
            else:
                classes.add(token[1:])
        elif "=" in token:
            key, _, value = token.partition("=")
            attrs_kv[key] = value.strip("\"'")
    return lang, classes, attrs_kv


def _fences(text: str) -> list[dict]:
    """Every fenced block of a Markdown page: language, classes, first and last line
    (1-based; the opening and closing fences) and body (dedented by the fence's indent)."""
    fences = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        m = _OPEN.match(lines[i])
        if not m:
            i += 1
            continue
        indent, ticks = m["indent"], m["ticks"]
        lang, classes, attrs = _info(m["info"])
        body = []
        j = i + 1
        while j < len(lines) and lines[j].strip() != ticks:
            body.append(lines[j])
            j += 1
        if j == len(lines):
            raise ValueError(f"The code block opened at line {i + 1} is never closed.")
        source = textwrap.dedent(
            "\n".join(
                line[len(indent) :] if line.startswith(indent) else line
                for line in body
            )
        )
        fences.append(
            {
                "lang": lang,
                "classes": classes,
                "attrs": attrs,
                "open": i + 1,
                "close": j + 1,
                "source": source,
            }
        )
        i = j + 1
    return fences


def _prints(source: str) -> bool:
    """Whether `source` calls `print` outside the functions and classes it defines."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return False

    def visit(node) -> bool:
        if isinstance(
            node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)
        ):
            return False
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id == "print"
        ):
            return True
        return any(visit(child) for child in ast.iter_child_nodes(node))

    return any(visit(node) for node in tree.body)


def code_blocks(text: str) -> list[dict]:
    """The ```python blocks of a Markdown page: their first line (1-based, in the page),
    their source (dedented, for blocks inside admonitions), their mode, and their
    expected output: the ```text block that follows, or None."""
    lines = text.splitlines()
    fences = _fences(text)
    blocks = []
    for k, fence in enumerate(fences):
        if fence["lang"] not in ("python", "py"):
            continue
        classes = fence["classes"]
        expected, expected_line, rtol = None, None, None
        if k + 1 < len(fences):
            nxt = fences[k + 1]
            between = lines[fence["close"] : nxt["open"] - 1]
            if nxt["lang"] == "text" and all(not line.strip() for line in between):
                expected, expected_line = nxt["source"], nxt["open"] + 1
                if "rtol" in nxt["attrs"]:
                    rtol = float(nxt["attrs"]["rtol"])
        mode = (
            "skip" if "no-run" in classes else "xfail" if "xfail" in classes else "run"
        )
        blocks.append(
            {
                "line": fence["open"] + 1,
                "source": fence["source"],
                "mode": mode,
                "expected": expected,
                "expected_line": expected_line,
                "rtol": rtol,
                "no_output": "no-output" in classes,
                "prints": _prints(fence["source"]),
            }
        )
    return blocks


def _norm(text: str) -> list[str]:
    lines = [line.rstrip() for line in text.splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    return lines


_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


def _same_line(want: str, got: str, rtol: float | None) -> bool:
    """Whether one printed line is the one expected: exactly, or, with `rtol`, the same
    text around numbers that agree to that relative tolerance."""
    if rtol is None or want == got:
        return want == got
    if _NUMBER.split(want) != _NUMBER.split(got):
        return False
    pairs = zip(_NUMBER.findall(want), _NUMBER.findall(got), strict=True)
    return all(
        abs(float(w) - float(g)) <= rtol * max(abs(float(w)), abs(float(g)))
        for w, g in pairs
    )


def output_matches(expected: str, actual: str, rtol: float | None = None) -> bool:
    """Whether the printed `actual` matches the page's `expected` (see the module's
    docstring for `...` and `rtol`)."""
    want, got = _norm(expected), _norm(actual)
    memo: dict = {}

    def match(i: int, j: int) -> bool:
        if (i, j) in memo:
            return memo[i, j]
        if i == len(want):
            result = j == len(got)
        elif want[i] == "...":
            result = match(i + 1, j) or (j < len(got) and match(i, j + 1))
        elif j == len(got):
            result = False
        else:
            w, g = want[i], got[j]
            if w.endswith("..."):
                prefix = w[:-3]
                ok = g.startswith(prefix) or g == prefix.rstrip()
            else:
                ok = _same_line(w, g, rtol)
            result = ok and match(i + 1, j + 1)
        memo[i, j] = result
        return result

    return match(0, 0)


_RUNNER = r"""
import io, json, sys, time, types

spec = json.load(sys.stdin)
import builtins, warnings

for action, message, category, module in spec["warnings"]:
    warnings.filterwarnings(action, message, getattr(builtins, category), module)
import jax

jax.config.update("jax_numpy_dtype_promotion", spec["promotion"])

page = types.ModuleType("docs_page")
page.__file__ = spec["path"]
sys.modules["docs_page"] = page
real_stdout = sys.stdout


def say(*args):
    print(*args, file=real_stdout, flush=True)


def run(block, code):
    # The block's standard output, captured (`jax.debug.print` included: its callbacks
    # are waited for before the block ends).
    buffer = io.StringIO()
    sys.stdout = buffer
    try:
        exec(code, page.__dict__)
        jax.effects_barrier()
    finally:
        sys.stdout = real_stdout
        with open(spec["results"], "a") as results:
            results.write(json.dumps({"line": block["line"], "stdout": buffer.getvalue()}) + "\n")


start = time.perf_counter()
for block in spec["blocks"]:
    if block["mode"] == "skip":
        continue
    # Padded so that tracebacks give the line in the Markdown file.
    code = compile("\n" * (block["line"] - 1) + block["source"], spec["path"], "exec")
    if block["mode"] == "xfail":
        try:
            exec(code, page.__dict__)
        except Exception as e:
            first = (str(e).splitlines() or [""])[0][:300]
            if not any(known in str(e) for known in spec["known_issues"]):
                say(f"[docs] the `.xfail` block at {spec['path']}:{block['line']} failed with an "
                    "error that is not a known issue:")
                raise
            say(f"[docs] expected failure at {spec['path']}:{block['line']}: {type(e).__name__}: {first}")
            continue
        say(f"[docs] UNEXPECTED PASS: the block at {spec['path']}:{block['line']} is marked "
            "`.xfail` but ran: remove the marker and the page's note about the issue.")
        sys.exit(3)
    try:
        run(block, code)
    except BaseException:
        say(f"[docs] the block at {spec['path']}:{block['line']} raised:")
        raise
say(f"[docs] {spec['path']}: {sum(b['mode'] != 'skip' for b in spec['blocks'])} block(s) in "
    f"{time.perf_counter() - start:.1f} s")
"""


def warning_filters() -> list[tuple[str, str, str, str]]:
    """`pyproject.toml`'s `filterwarnings` as `warnings.filterwarnings` arguments
    (`action:message:category:module`, regexes, as pytest reads its ini), in the order
    pytest applies them: a later entry wins."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    entries = config["tool"]["pytest"]["ini_options"]["filterwarnings"]
    filters = []
    for entry in entries:
        action, message, category, module = (entry.split(":", 4) + [""] * 4)[:4]
        filters.append((action, message, category or "Warning", module))
    return filters


def _indent(text: str) -> str:
    return textwrap.indent(text.rstrip("\n") or "(nothing)", "    ", lambda _: True)


def output_problems(
    path: str, blocks: list[dict], printed: dict[int, str]
) -> list[str]:
    """What is wrong with the outputs of the blocks that ran: `printed` maps each block's
    line to what it printed."""
    problems = []
    for b in blocks:
        if b["line"] not in printed or b["mode"] != "run" or b["no_output"]:
            continue
        got = printed[b["line"]]
        where = f"{path}:{b['line']}"
        if b["expected"] is None:
            if got.strip() or b["prints"]:
                problems.append(
                    f"The block at {where} prints, but no ```text block follows it "
                    "with its output (or mark it {.no-output} if the output changes "
                    f"from run to run). It printed:\n{_indent(got)}"
                )
        elif not output_matches(b["expected"], got, b["rtol"]):
            problems.append(
                f"The output of the block at {where} differs from the ```text block at "
                f"{path}:{b['expected_line']}.\n--- the page says:\n"
                f"{_indent(b['expected'])}\n--- the block printed:\n{_indent(got)}"
            )
    return problems


PAGES = [
    page
    for page in _all_pages()
    if not _is_placeholder((DOCS / page).read_text())
    and code_blocks((DOCS / page).read_text())
]


def test_pages_are_found():
    assert "tutorials/new_states.md" in PAGES and "tutorials/training.md" in PAGES
    assert "index.md" in PAGES
    assert not any(page.startswith("api/") for page in PAGES)


def test_tutorials_have_code():
    # Every written tutorial, and the home page, has code that runs.
    for page in ["index.md"] + [p for p in _all_pages() if p.startswith("tutorials/")]:
        text = (DOCS / page).read_text()
        if _is_placeholder(text):
            continue
        assert any(b["mode"] == "run" for b in code_blocks(text)), (
            f"docs/{page} has no code to run"
        )


def test_code_blocks_parser():
    text = (
        "# t\n\n```python\na = 1\n```\n\n```bash\nls\n```\n\n"
        "```python {.no-run}\nb = 2\n```\n\n!!! note\n\n    ```{.python .xfail}\n    c = 3\n    ```\n"
        "\n```python {.no-output}\nprint(4)\n```\n\n```python\nprint(5)\n```\n\n"
        "```text\n5\n```\n\n```python\ndef f():\n    print(6)\n```\n\nText.\n\n```text\n6\n```\n"
    )
    blocks = code_blocks(text)
    assert [(b["line"], b["source"], b["mode"]) for b in blocks] == [
        (4, "a = 1", "run"),
        (12, "b = 2", "skip"),
        (18, "c = 3", "xfail"),
        (22, "print(4)", "run"),
        (26, "print(5)", "run"),
        (34, "def f():\n    print(6)", "run"),
    ]
    assert [b["expected"] for b in blocks] == [None, None, None, None, "5", None]
    assert blocks[4]["expected_line"] == 30
    assert [b["no_output"] for b in blocks] == [False] * 3 + [True] + [False] * 2
    assert [b["prints"] for b in blocks] == [False] * 3 + [True, True, False]


def test_output_matching():
    assert output_matches("a\nb", "a  \nb\n\n")
    assert not output_matches("a\nb", "a\nc")
    assert not output_matches("a", "a\nb")
    assert output_matches("a\n...\nd", "a\nd")
    assert output_matches("a\n...\nd", "a\nb\nc\nd")
    assert not output_matches("a\n...\nd", "a\nb\nc")
    assert output_matches("...", "")
    assert output_matches("step 1: loss ...\ndone", "step 1: loss 0.25\ndone")
    assert not output_matches("step 1: loss ...", "step 2: loss 0.25")
    assert output_matches("x ...", "x")
    assert output_matches("...\nlast", "first\nlast")
    # With a tolerance, the numbers of a line may differ in their last digits only.
    assert not output_matches("loss 0.800415", "loss 0.800414")
    assert output_matches("loss 0.800415", "loss 0.800414", rtol=1e-5)
    assert not output_matches("loss 0.800415", "loss 0.800515", rtol=1e-5)
    assert not output_matches("loss 0.800415", "lost 0.800414", rtol=1e-5)
    assert not output_matches("step 1: 0.5", "step 2: 0.5", rtol=1e-5)
    assert not output_matches("a 1 2", "a 1", rtol=1e-5)
    assert output_matches("x = -1.5e-3, y", "x = -1.50001e-3, y", rtol=1e-4)


def test_fence_attributes_give_the_tolerance():
    text = '```python\nprint(0.5)\n```\n\n```text {rtol="1e-5"}\n0.5\n```\n'
    (block,) = code_blocks(text)
    assert block["rtol"] == 1e-5 and block["expected"] == "0.5"


def test_warning_filters_are_pyprojects():
    filters = warning_filters()
    assert filters[0] == ("error", "", "Warning", "")
    assert all(action == "ignore" and module for action, _, _, module in filters[1:])


def test_output_problems_are_reported():
    text = (
        "```python\nprint('a')\n```\n\n```text\nb\n```\n\n"
        "```python\nprint('c')\n```\n\n```python {.no-output}\nprint('d')\n```\n"
    )
    blocks = code_blocks(text)
    printed = {b["line"]: b["source"][7] + "\n" for b in blocks}
    problems = output_problems("docs/x.md", blocks, printed)
    assert len(problems) == 2
    assert "docs/x.md:2" in problems[0] and "docs/x.md:6" in problems[0]
    assert "    b" in problems[0] and "    a" in problems[0]
    assert "docs/x.md:10" in problems[1] and "no ```text block" in problems[1]


@pytest.mark.parametrize("page", PAGES)
def test_page_runs(page):
    path = DOCS / page
    rel = path.relative_to(ROOT).as_posix()
    blocks = code_blocks(path.read_text())
    env = dict(os.environ)
    env["JAX_NUM_CPU_DEVICES"] = "8"  # what the pages print is for 8 devices
    env.setdefault("JAX_PLATFORMS", "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        results = pathlib.Path(tmp) / "outputs.jsonl"
        spec = {
            "path": rel,
            "promotion": PROMOTION.get(page, "strict"),
            "known_issues": list(KNOWN_ISSUES.values()),
            "warnings": warning_filters(),
            "blocks": blocks,
            "results": str(results),
        }
        proc = subprocess.run(
            [sys.executable, "-W", "error", "-c", _RUNNER],
            input=json.dumps(spec),
            capture_output=True,
            text=True,
            cwd=ROOT,
            env=env,
            timeout=600,
        )
        printed = {}
        if results.exists():
            for line in results.read_text().splitlines():
                record = json.loads(line)
                printed[record["line"]] = record["stdout"]
    for line in proc.stdout.splitlines():
        if line.startswith("[docs]"):
            print(line)  # shown with `pytest -s` or `-rA`
    problems = output_problems(rel, blocks, printed)
    if proc.returncode != 0:
        # The block that raised shows its output so far, whatever its text block says.
        problems = [
            f"The code of {rel} failed (exit code {proc.returncode}).\n"
            f"--- stdout (end)\n{proc.stdout[-4000:]}\n--- stderr (end)\n{proc.stderr[-8000:]}"
        ] + problems
    assert not problems, "\n\n".join(problems)

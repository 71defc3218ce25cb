"""The documentation's code runs.

Every ```python block of `docs/index.md` and `docs/tutorials/*.md` is executed, in order,
page by page, each page in one namespace of its own, in a fresh Python process with the
8 CPU devices that `conftest.py` forces and its strict dtype promotion (except where
`PROMOTION` says otherwise). Rank promotion is left at JAX's default: the pages are code as
readers write it, and `x * weight` with shapes `(4, 16)` and `(16,)` should read as such.
A fresh process per page keeps the pages independent of each other and of the other
tests: a page that demonstrates a run-time error leaves JAX's runtime tokens holding that
error.

Fence attributes, written after the language (```` ```python {.no-run} ````):

- `.no-run`: shown, never executed (use sparingly).
- `.xfail`: executed and expected to raise one of the errors in `KNOWN_ISSUES`, for a
  known issue that the page documents. When the block stops raising, this test fails so
  that the marker and the page's note about the issue are removed; when it raises
  something else, it fails too.

Tracebacks point at the Markdown file and line of the failing code.
"""

import json
import os
import pathlib
import re
import subprocess
import sys
import textwrap

import pytest


ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = ["index.md"] + sorted(
    p.relative_to(DOCS).as_posix() for p in (DOCS / "tutorials").glob("*.md")
)

# optax mixes Python floats with int32 step counters, which strict promotion refuses; the
# training tutorial is run with JAX's default (standard) promotion, as its readers run it.
PROMOTION = {"tutorials/training.md": "standard"}

# The errors that `.xfail` blocks may raise: substrings of their messages.
KNOWN_ISSUES: dict[str, str] = {
    # None at present. (The two BatchNorm issues once listed here, a collective over a
    # vmap axis and the device axis at once, and `mode="ema"`, were JAX's varying-axis
    # typing, which pmap2 no longer traces with.)
}

_OPEN = re.compile(r"^(?P<indent>[ \t]*)(?P<ticks>`{3,}|~{3,})\s*(?P<info>[^`]*?)\s*$")


def _info(info: str) -> tuple[str, set[str]]:
    """The language and the classes of a fence's info string: `python {.no-run}` or
    `{.python .no-run}`."""
    lang, classes = "", set()
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
    return lang, classes


def code_blocks(text: str) -> list[dict]:
    """The ```python blocks of a Markdown page: their first line (1-based, in the page),
    their source (dedented, for blocks inside admonitions) and their mode."""
    blocks = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        m = _OPEN.match(lines[i])
        if not m:
            i += 1
            continue
        indent, ticks = m["indent"], m["ticks"]
        lang, classes = _info(m["info"])
        body = []
        j = i + 1
        while j < len(lines) and lines[j].strip() != ticks:
            body.append(lines[j])
            j += 1
        if j == len(lines):
            raise ValueError(f"The code block opened at line {i + 1} is never closed.")
        if lang in ("python", "py"):
            source = textwrap.dedent(
                "\n".join(
                    line[len(indent) :] if line.startswith(indent) else line
                    for line in body
                )
            )
            mode = (
                "skip"
                if "no-run" in classes
                else "xfail"
                if "xfail" in classes
                else "run"
            )
            blocks.append({"line": i + 2, "source": source, "mode": mode})
        i = j + 1
    return blocks


_RUNNER = r"""
import json, sys, time, types

spec = json.load(sys.stdin)
import jax

jax.config.update("jax_numpy_dtype_promotion", spec["promotion"])

page = types.ModuleType("docs_page")
page.__file__ = spec["path"]
sys.modules["docs_page"] = page
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
                print(f"[docs] the `.xfail` block at {spec['path']}:{block['line']} failed with an "
                      "error that is not a known issue:", flush=True)
                raise
            print(f"[docs] expected failure at {spec['path']}:{block['line']}: {type(e).__name__}: {first}", flush=True)
            continue
        print(f"[docs] UNEXPECTED PASS: the block at {spec['path']}:{block['line']} is marked "
              "`.xfail` but ran: remove the marker and the page's note about the issue.", flush=True)
        sys.exit(3)
    exec(code, page.__dict__)
print(f"[docs] {spec['path']}: {sum(b['mode'] != 'skip' for b in spec['blocks'])} block(s) in "
      f"{time.perf_counter() - start:.1f} s", flush=True)
"""


def test_pages_are_found():
    assert "tutorials/new_states.md" in PAGES and "tutorials/training.md" in PAGES


def test_code_blocks_parser():
    text = (
        "# t\n\n```python\na = 1\n```\n\n```bash\nls\n```\n\n"
        "```python {.no-run}\nb = 2\n```\n\n!!! note\n\n    ```{.python .xfail}\n    c = 3\n    ```\n"
    )
    blocks = code_blocks(text)
    assert [(b["line"], b["source"], b["mode"]) for b in blocks] == [
        (4, "a = 1", "run"),
        (12, "b = 2", "skip"),
        (18, "c = 3", "xfail"),
    ]


@pytest.mark.parametrize("page", PAGES)
def test_page_runs(page):
    path = DOCS / page
    blocks = code_blocks(path.read_text())
    assert any(b["mode"] == "run" for b in blocks), f"{page} has no code to run"
    env = dict(os.environ)
    if "--xla_force_host_platform_device_count" not in env.get("XLA_FLAGS", ""):
        env["XLA_FLAGS"] = (
            env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
        ).strip()
    env.setdefault("JAX_PLATFORMS", "cpu")
    spec = {
        "path": path.relative_to(ROOT).as_posix(),
        "promotion": PROMOTION.get(page, "strict"),
        "known_issues": list(KNOWN_ISSUES.values()),
        "blocks": blocks,
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
    for line in proc.stdout.splitlines():
        if line.startswith("[docs]"):
            print(line)  # shown with `pytest -s` or `-rA`
    assert proc.returncode == 0, (
        f"The code of docs/{page} failed (exit code {proc.returncode}).\n"
        f"--- stdout (end)\n{proc.stdout[-4000:]}\n--- stderr (end)\n{proc.stderr[-8000:]}"
    )

"""Checks the built documentation site in a real browser (`make docs-check`).

Serves the built site (`site/` by default) on a free localhost port, opens every page in
headless Chromium (Debian's `chromium` and `chromium-driver`, driven by Selenium; no
browser is downloaded) and fails if a page has

- a JavaScript error: a console error or an uncaught exception (or rejected promise);
- a missing image: an `<img>` that did not load;
- a file the page asked for that the server did not have (a 404: stylesheet, script,
  image, search index);
- an internal link (an `href` to the same site) that does not lead to an existing page,
  or to an anchor that exists on it;
- at 390 px wide (a phone), content wider than the window.

It also searches once ("pmap2_new_states"), which fails if nothing is found, and counts,
without failing, the code blocks that do not fit their box at the desktop width (they
scroll sideways). Prints a summary; the exit status is 1 if anything failed.

    python docs/scripts/check_site.py [SITE_DIR] [--screenshots DIR] [--width 1280]

`--screenshots DIR` saves the pages named by `--shoot` (the home page and a tutorial by
default) at the desktop width: `NAME.png`, the first screen, and `NAME-full.png`, the
whole page.
"""

from __future__ import annotations

import argparse
import base64
import functools
import html.parser
import http.server
import os
import pathlib
import posixpath
import shutil
import sys
import tempfile
import threading
import time
import urllib.parse


CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-dev-shm-usage",  # /dev/shm is small in containers
    # Only the local server is reachable: the check is the same with or without a
    # network (Google Fonts and GitHub's API, which Material asks, simply fail).
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
]
SEARCH = "pmap2_new_states"
MOBILE = (390, 844)

# Installed before any script of each page runs: keeps what the console might not say
# in the same words (uncaught errors, rejected promises, resources that failed).
ERROR_HOOK = """
window.__checkErrors = [];
window.addEventListener("error", function (e) {
  var t = e.target;
  if (t && t !== window && (t.src || t.href)) {
    window.__checkErrors.push("failed to load <" + t.tagName.toLowerCase() + "> " + (t.src || t.href));
  } else {
    window.__checkErrors.push("uncaught " + (e.message || e.error));
  }
}, true);
window.addEventListener("unhandledrejection", function (e) {
  window.__checkErrors.push("unhandled rejection: " + (e.reason && (e.reason.stack || e.reason)));
});
"""

# Waits for every image (lazy ones made eager) and returns those that did not load.
IMAGES = """
var done = arguments[arguments.length - 1];
var imgs = Array.from(document.images);
imgs.forEach(function (img) { img.loading = "eager"; });
var pending = imgs.filter(function (img) { return !img.complete; }).map(function (img) {
  return new Promise(function (resolve) {
    img.addEventListener("load", resolve); img.addEventListener("error", resolve);
    setTimeout(resolve, 5000);
  });
});
Promise.all(pending).then(function () {
  done({
    count: imgs.length,
    broken: imgs.filter(function (i) { return !(i.complete && i.naturalWidth > 0); })
               .map(function (i) { return i.getAttribute("src"); })
  });
});
"""

LINKS = """
return Array.from(document.querySelectorAll("a[href]")).map(function (a) {
  return [a.getAttribute("href"), a.href];
});
"""

WIDE_CODE = """
return Array.from(document.querySelectorAll(".md-content pre > code"))
  .filter(function (c) { return c.scrollWidth > c.clientWidth + 1; })
  .map(function (c) {
    var lines = c.textContent.split("\\n");
    return Math.max.apply(null, lines.map(function (l) { return l.length; }));
  });
"""

OVERFLOW = """
return [document.documentElement.scrollWidth, window.innerWidth];
"""


class _Ids(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.ids: set[str] = set()

    def handle_starttag(self, tag, attrs):
        for name, value in attrs:
            if name == "id" or (tag == "a" and name == "name"):
                if value:
                    self.ids.add(value)


@functools.cache
def _anchors(path: pathlib.Path) -> frozenset[str]:
    parser = _Ids()
    parser.feed(path.read_text(encoding="utf-8", errors="replace"))
    return frozenset(parser.ids)


def _serve(root: pathlib.Path):
    """A quiet HTTP server for `root` on a free localhost port, in a thread; it records
    the paths it answered with 404."""
    missing: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(root), **kwargs)

        def log_message(self, format, *args):
            pass

        def send_error(self, code, message=None, explain=None):
            if code == 404:
                missing.append(urllib.parse.unquote(self.path))
            super().send_error(code, message, explain)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, missing


def _external(message: str, base: str) -> bool:
    """Whether a failed request's message is about a URL of another site."""
    urls = [w for w in message.split() if w.startswith(("http://", "https://"))]
    return bool(urls) and not urls[0].startswith(base)


def _target(root: pathlib.Path, url_path: str) -> pathlib.Path | None:
    """The file of the site that a URL path resolves to, as the server would serve it."""
    rel = posixpath.normpath(urllib.parse.unquote(url_path)).lstrip("/")
    path = root / rel if rel not in ("", ".") else root
    if path.is_dir():
        path = path / "index.html"
    return path if path.is_file() else None


def _driver(width: int, height: int, profile: str):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile}")
    options.add_argument(f"--window-size={width},{height}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    driver.set_page_load_timeout(30)
    driver.set_script_timeout(30)
    driver.execute_cdp_cmd(
        "Page.addScriptToEvaluateOnNewDocument", {"source": ERROR_HOOK}
    )
    return driver


def _screenshot(driver, out: pathlib.Path, name: str, width: int) -> list[str]:
    out.mkdir(parents=True, exist_ok=True)
    first = out / f"{name}.png"
    first.write_bytes(driver.get_screenshot_as_png())
    height = driver.execute_script("return document.documentElement.scrollHeight")
    shot = driver.execute_cdp_cmd(
        "Page.captureScreenshot",
        {
            "format": "png",
            "captureBeyondViewport": True,
            "clip": {"x": 0, "y": 0, "width": width, "height": height, "scale": 1},
        },
    )
    full = out / f"{name}-full.png"
    full.write_bytes(base64.b64decode(shot["data"]))
    return [str(first), str(full)]


def check(args) -> int:
    root = pathlib.Path(args.site).resolve()
    if not (root / "index.html").is_file():
        print(f"check_site: no built site in {root} (run `make docs` first).")
        return 2
    for tool in (CHROMIUM, CHROMEDRIVER):
        if not os.access(tool, os.X_OK):
            print(
                f"check_site: {tool} not found: install Debian's browser with "
                "`apt-get install -y chromium chromium-driver`."
            )
            return 2
    pages = sorted(
        p.relative_to(root).as_posix()
        for p in root.rglob("*.html")
        if not p.relative_to(root).parts[0].startswith(("assets", "search"))
    )

    start = time.perf_counter()
    server, missing_files = _serve(root)
    base = f"http://127.0.0.1:{server.server_address[1]}/"
    profile = tempfile.mkdtemp(prefix="check-site-chromium-")
    errors: list[str] = []
    counts = dict(images=0, internal=0, external=0, blocked=0)
    wide: dict[str, list[int]] = {}
    shots: list[str] = []
    driver = _driver(args.width, args.height, profile)
    try:
        print(f"check_site: {driver.capabilities.get('browserVersion')} at {base}")
        for page in pages:
            where = page.removesuffix("index.html") or "/"
            missing_files.clear()
            driver.set_window_size(args.width, args.height)
            driver.get(base + page)
            driver.execute_script("return document.fonts && document.fonts.ready")
            images = driver.execute_async_script(IMAGES)
            time.sleep(0.2)  # late console errors (the search worker starts after load)
            counts["images"] += images["count"]
            # One error per cause: an image that did not load is also a failed request
            # in the console and a 404 of the server; an uncaught error is in the
            # console and in the page's own record.
            problems: list[str] = [
                f"image did not load: {src}" for src in images["broken"]
            ]
            reported = {
                urllib.parse.urljoin(base + page, src) for src in images["broken"]
            }
            console = 0
            for entry in driver.get_log("browser"):
                if entry["level"] != "SEVERE":
                    continue
                message = entry["message"]
                if entry["source"] == "network":
                    url = message.split()[0]
                    if _external(message, base):
                        counts["blocked"] += 1
                    elif url not in reported:
                        reported.add(url)
                        problems.append(f"missing file: {message}")
                else:
                    console += 1
                    problems.append(f"JS error: {message}")
            for e in driver.execute_script("return window.__checkErrors || []"):
                if e.startswith("failed to load"):
                    url = e.split()[-1]
                    if not _external(e, base) and url not in reported:
                        reported.add(url)
                        problems.append(e)
                elif not console:  # what the console did not say
                    problems.append(e)
            for path in missing_files:
                if urllib.parse.urljoin(base, path) not in reported:
                    problems.append(f"the server has no {path}")
            errors += [f"{where}: {e}" for e in problems]
            for href, absolute in driver.execute_script(LINKS):
                url = urllib.parse.urlsplit(absolute)
                if url.scheme not in ("http", "https"):
                    continue
                if not absolute.startswith(base):
                    counts["external"] += 1
                    continue
                counts["internal"] += 1
                target = _target(root, url.path)
                if target is None:
                    errors.append(f"{where}: broken link {href!r} (no such page)")
                elif url.fragment and target.suffix == ".html":
                    anchor = urllib.parse.unquote(url.fragment)
                    if anchor not in _anchors(target):
                        errors.append(f"{where}: broken link {href!r} (no such anchor)")
            lengths = driver.execute_script(WIDE_CODE)
            if lengths:
                wide[where] = lengths
            if args.screenshots and page in args.shoot:
                name = page.removesuffix("/index.html").replace("/", "-")
                name = "home" if page == "index.html" else name
                shots += _screenshot(
                    driver, pathlib.Path(args.screenshots), name, args.width
                )
            driver.set_window_size(*MOBILE)
            content, window = driver.execute_script(OVERFLOW)
            if content > window + 1:
                errors.append(
                    f"{where}: at {MOBILE[0]} px wide the page is {content} px wide"
                )
        driver.set_window_size(args.width, args.height)
        found = _search(driver, base)
        if found == 0:
            errors.append(f"search: nothing found for {SEARCH!r}")
    finally:
        driver.quit()
        server.shutdown()
        shutil.rmtree(profile, ignore_errors=True)

    for error in errors:
        print("  ERROR", error)
    for where, lengths in wide.items():
        print(
            f"  note: {where}: {len(lengths)} code block(s) scroll sideways at "
            f"{args.width} px (longest lines: {', '.join(map(str, sorted(lengths)[-3:]))} "
            "characters)"
        )
    for shot in shots:
        print(f"  screenshot: {shot}")
    print(
        f"check_site: {len(pages)} pages, {counts['images']} images, "
        f"{counts['internal']} internal links ({counts['external']} external, not "
        f"followed; {counts['blocked']} requests to other sites blocked), "
        f"search {SEARCH!r}: {found} results, "
        f"{sum(map(len, wide.values()))} code blocks wider than {args.width} px allows; "
        f"{len(errors)} error(s) in {time.perf_counter() - start:.0f} s"
    )
    return 1 if errors else 0


def _search(driver, base: str) -> int:
    """Types a query into Material's search on the home page; the number of results."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(base + "index.html")
    box = driver.find_element(By.CSS_SELECTOR, "input.md-search__input")
    box.click()
    box.send_keys(SEARCH)
    try:
        WebDriverWait(driver, 10).until(
            lambda d: d.find_elements(By.CSS_SELECTOR, ".md-search-result__item")
        )
    except Exception:
        return 0
    return len(driver.find_elements(By.CSS_SELECTOR, ".md-search-result__item"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("site", nargs="?", default="site")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=900)
    parser.add_argument("--screenshots", metavar="DIR")
    parser.add_argument(
        "--shoot",
        nargs="*",
        default=["index.html", "tutorials/new_states/index.html"],
        metavar="PAGE",
        help="pages to save with --screenshots (paths in the site)",
    )
    return check(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

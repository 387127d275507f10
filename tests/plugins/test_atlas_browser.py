"""The atlas in a real browser (headless Chromium over the DevTools protocol): index → layer →
unit and back, sorting and the search box, with no broken image or link and no console error.
Skips, naming the reason, only where Chromium is not installed (``.ci/run`` installs it)."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest

from tests.browser import Browser, find_chromium
from tests.plugins.test_atlas import atlas  # noqa: F401 - the module's site fixture

BROKEN_IMAGES = (
    "Array.from(document.images).filter(i => !(i.complete && i.naturalWidth > 0))"
    ".map(i => i.getAttribute('src'))"
)
LINKS = "Array.from(document.querySelectorAll('a[href]')).map(a => a.href)"


@pytest.fixture(scope="module")
def browser():
    if find_chromium() is None:
        pytest.skip("chromium is not installed (apt-get install chromium; .ci/run installs it)")
    b = Browser.launch()
    yield b
    b.close()


def _check_page(b: Browser, kind: str) -> None:
    assert b.evaluate("document.readyState") == "complete"
    assert b.evaluate(BROKEN_IMAGES) == [], f"broken images on the {kind} page {b.url()}"
    n_images = b.evaluate("document.images.length")
    assert n_images > 0, kind
    for href in b.evaluate(LINKS):
        u = urlparse(href)
        assert u.scheme == "file", f"{kind} page links outside the site: {href}"
        assert Path(unquote(u.path)).is_file(), f"{kind} page: broken link {href}"
    assert b.errors == [], f"{kind} page: {b.errors}"


def test_index_layer_unit_and_back_in_chromium(atlas, browser):  # noqa: F811
    site = atlas["site"]
    b = browser
    b.goto((site / "index.html").as_uri())
    _check_page(b, "index")
    assert b.evaluate("document.querySelectorAll('.strip a').length") == 12
    # sorting by activation rate reorders the strips, descending
    b.evaluate("var s=document.getElementById('sort'); s.value='rate';"
               "s.dispatchEvent(new Event('change'));")  # fmt: skip
    rates = b.evaluate("Array.from(document.querySelector('.strip').children)"
                       ".map(a => parseFloat(a.dataset.rate))")  # fmt: skip
    assert rates == sorted(rates, reverse=True)
    # the search box marks unit 2 in every layer
    b.evaluate("var f=document.getElementById('search'); f.elements.q.value='2';"
               "f.requestSubmit();")  # fmt: skip
    assert b.evaluate("document.querySelectorAll('.hit').length") == 3
    assert b.errors == []
    # index -> layer 2 page
    url = b.click("#layer2 h2 a")
    assert url.endswith("/2-conv2/index.html")
    _check_page(b, "layer")
    assert b.evaluate("document.querySelectorAll('.grid a.unit').length") == 4
    # layer -> unit 1 (by the search box), then the next unit, then back up
    b.evaluate("var f=document.getElementById('search'); f.elements.q.value='1';"
               "f.requestSubmit();")  # fmt: skip
    b.wait_event("Page.loadEventFired")
    assert b.url().endswith("/2-conv2/u0001.html")
    _check_page(b, "unit")
    assert b.evaluate("document.querySelector('figure img').naturalWidth") >= 500
    assert b.evaluate("document.querySelectorAll('table')[0].rows.length") == 1 + 9
    assert b.click("a[rel=next]").endswith("/2-conv2/u0002.html")
    _check_page(b, "unit")
    assert b.click("nav.crumbs a[href='index.html']").endswith("/2-conv2/index.html")
    assert b.click("nav.crumbs a").endswith("/atlas/index.html")
    _check_page(b, "index")


def test_the_checks_see_a_broken_image_link_and_script(browser, tmp_path):
    """The checks above can fail: a page with a missing image, a dead link and a script error."""
    page = tmp_path / "bad.html"
    page.write_text(
        "<!doctype html><html><head><link rel='icon' href='data:,'></head><body>"
        "<img src='missing.png'><a href='nowhere.html'>x</a>"
        "<script>console.error('boom'); undefinedFunction();</script></body></html>"
    )
    browser.errors.clear()
    browser.goto(page.as_uri())
    assert browser.evaluate(BROKEN_IMAGES) == ["missing.png"]
    with pytest.raises(AssertionError):
        _check_page(browser, "bad")
    text = " ".join(browser.errors)
    assert "boom" in text and "undefinedFunction" in text and "missing.png" in text
    browser.errors.clear()

"""The HTML report opened in real headless Chromium: the story's sections in order, a
caption under every figure, no console errors, no network, every figure rendered
(screenshots checked non-blank), hostile names escaped."""

from __future__ import annotations

import importlib.util
import json
import pathlib
import re

import pytest
from _chromium import Browser, blank_fraction, find_chromium, in_ci  # noqa: I001

import posenc
from posenc import analysis, registry
from posenc.encodings.absolute import Sinusoidal
from posenc.pipeline.report import write_report

EVIL = '<script>window.__pwned=1</script><img src=x onerror="window.__pwned=2">'
EVIL_DIR = "study-<img src=y onerror=window.__pwned=3>"


def _need_browser() -> str:
    exe = find_chromium()
    missing = []
    if exe is None:
        missing.append("no chromium on PATH (Debian: apt-get install chromium)")
    if importlib.util.find_spec("websockets") is None:
        missing.append("the websockets package is not installed (pip install -e '.[dev]')")
    if missing:
        if in_ci():
            pytest.fail("CI must run the browser test: " + "; ".join(missing))
        pytest.skip("; ".join(missing))
    return exe


def _study(tmp: pathlib.Path) -> pathlib.Path:
    d = tmp / EVIL_DIR
    d.mkdir()
    runs = []
    for enc in ("sinusoidal", "none", EVIL):
        for seed in (0, 1):
            runs.append(
                {
                    "run_id": f"{EVIL}-{enc}-{seed}",
                    "task": "copy" if enc != EVIL else EVIL,
                    "encoding": enc,
                    "seed": seed,
                    "train_length": 16,
                    "config": {"note": EVIL},
                    "git_commit": "0123456789abcdef",
                    "torch_version": "2.13.0",
                    "wall_time_s": 1.5,
                    "metrics": [
                        {"length": n, "exact_match": 1.0 / n + seed, "token_accuracy": 0.5} for n in (8, 16, 32)
                    ],
                }
            )
    (d / "results.jsonl").write_text("\n".join(json.dumps(r) for r in runs) + "\n")
    return d


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> pathlib.Path:
    tmp = tmp_path_factory.mktemp("report")
    Evil = type("Evil", (Sinusoidal,), {"name": EVIL, "formula": EVIL, "flaw": EVIL})
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(registry._REGISTRY, EVIL, Evil)
        # One encoding of every kind of figure; each one is shipped, so a missing one fails.
        wanted = ("none", "binary", "learned", "sine", "rope", "xpos", "alibi", "t5", "kerple", "fire")
        assert set(wanted) <= set(posenc.available()), sorted(set(wanted) - set(posenc.available()))
        names = [*wanted, EVIL]
        cfg = analysis.CardConfig(horizon=64, train_length=32, beyond_horizon=96, relative_length=16)
        return write_report(
            tmp / "report.html",
            study_dir=_study(tmp),
            encodings=names,
            config=cfg,
            attention_steps=5,
            attention_encodings=("sinusoidal", "rope", "alibi"),
            extra_sections=[
                {
                    "title": f"extra {EVIL}",
                    "text": EVIL,
                    "tables": [{"caption": EVIL, "columns": ["a"], "rows": [[EVIL]]}],
                }
            ],
        )


@pytest.mark.slow  # the `report` fixture builds a full report (~15 s)
def test_report_escapes_hostile_names(report):
    html = report.read_text(encoding="utf-8")
    assert EVIL not in html and EVIL_DIR not in html
    assert "&lt;script&gt;window.__pwned=1&lt;/script&gt;" in html
    # Nothing fetched from outside the file: plotly's JS is inline, images are data URIs.
    assert not re.search(r"<script[^>]+src=", html)
    assert not re.search(r'<img[^>]+src="(?!data:)', html)


#: The story's steps, in order: a keyword of each section heading.
STORY = (
    "blind to order",
    "Absolute positions",
    "Relative positions",
    "ALiBi",
    "RoPE: rotating",
    "RoPE scaling rules",
    "past the trained length",
    "report card",
)


@pytest.mark.slow
def test_report_renders_in_headless_chromium(report, tmp_path):
    exe = _need_browser()
    html = report.read_text(encoding="utf-8")
    n_img = html.count('class="figure-img"')
    n_plotly = html.count('class="plotly-graph-div"')
    assert n_img >= 10 and n_plotly >= 6  # the story's curves + the study's curves
    browser = Browser(exe)
    try:
        browser.open(report.resolve().as_uri())
        # The page unpacks its one plotly.js, then draws every curve: wait for that.
        browser.evaluate(
            "new Promise(r => { const t0 = Date.now(); (function poll() {"
            " if (document.body.dataset.plots === 'drawn' || Date.now() - t0 > 30000) r(true);"
            " else setTimeout(poll, 100); })(); })"
        )
        assert browser.evaluate("document.body.dataset.plots") == "drawn"
        assert browser.errors() == []
        outside = [u for u in browser.requests() if not u.startswith(("file:", "data:", "about:", "blob:"))]
        assert outside == [], f"the report fetched {outside}"
        assert browser.evaluate("typeof window.__pwned") == "undefined"
        assert EVIL in browser.evaluate("document.body.innerText")  # shown as text, not run
        # The story in order: one h2 per step, numbered, with its keyword.
        headings = browser.evaluate("[...document.querySelectorAll('main h2')].map(h => h.innerText)")
        assert len(headings) == len(STORY), headings
        for i, (heading, keyword) in enumerate(zip(headings, STORY, strict=True)):
            assert heading.startswith(f"{i + 1} · ") and keyword in heading, (i, heading)
        # Every figure (PNG or curve) has a caption that says what to notice.
        captions = browser.evaluate(
            "[...document.querySelectorAll('main figure')].map(f => (f.querySelector('figcaption') || {}).innerText)"
        )
        assert len(captions) == n_img + n_plotly
        assert all(c and len(c.strip()) > 30 for c in captions), captions
        state = browser.evaluate(
            "({imgs: [...document.querySelectorAll('img.figure-img')].map(i => [i.complete, i.naturalWidth]),"
            " plots: [...document.querySelectorAll('.plotly-graph-div')].map(d =>"
            "   [!!d.querySelector('svg.main-svg'), d.querySelectorAll('.scatterlayer .trace').length])})"
        )
        assert len(state["imgs"]) == n_img and all(ok and w > 100 for ok, w in state["imgs"])
        assert len(state["plots"]) == n_plotly and all(svg and traces > 0 for svg, traces in state["plots"])
        shots = tmp_path / "shots"
        shots.mkdir()
        (shots / "page.png").write_bytes(browser.screenshot())
        selector = "img.figure-img, .plotly-graph-div"
        count = browser.evaluate(f"document.querySelectorAll('{selector}').length")
        assert count == n_img + n_plotly
        for i in range(count):
            rect = browser.evaluate(
                f"(() => {{ const e = document.querySelectorAll('{selector}')[{i}]; e.scrollIntoView();"
                " const r = e.getBoundingClientRect();"
                " return {x: r.left + scrollX, y: r.top + scrollY, width: r.width, height: r.height}; })()"
            )
            assert rect["width"] > 50 and rect["height"] > 50, (i, rect)
            png = browser.screenshot(rect)
            (shots / f"figure-{i:03d}.png").write_bytes(png)
            inked, std = blank_fraction(png)
            assert inked > 0.01 and std > 3.0, f"figure {i} looks blank ({inked=:.4f}, {std=:.2f})"
        assert browser.errors() == []
    finally:
        browser.close()


def test_missing_browser_skips_locally_and_fails_in_ci(monkeypatch):
    import sys

    module = sys.modules[__name__]
    monkeypatch.setattr(module, "find_chromium", lambda: None)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI must run the browser test: no chromium"):
        _need_browser()
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match="no chromium on PATH"):
        _need_browser()

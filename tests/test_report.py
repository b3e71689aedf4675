"""report.html: links to each slide's outputs and viewer command, top tiles shown without a click, and the
page as Chromium renders it from disk."""

from __future__ import annotations

from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
from ckpt_util import random_checkpoint
from pipeline_util import blob_field
from PIL import Image

from wsi_pipeline.pipeline import RunOptions, run_batch
from wsi_pipeline.review import STATUS_COLOURS
from wsi_pipeline.review.browser import Browser, chromium_path


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    for i, n in enumerate((8, 20)):
        blob_field(root / "slides" / f"field {i}.png", seed=20 + i, n=n)  # a space: links must be quoted
    (root / "slides" / "broken.svs").write_bytes(b"not a slide")
    ckpt = random_checkpoint(root / "a.safetensors", seed=4)
    result = run_batch(root / "slides", root / "out", RunOptions(checkpoint=ckpt, mpp=0.5))
    assert result.n_failed == 1
    return result


class Links(HTMLParser):
    """Per table row: its links (text, href), the images inside a <details> and the view commands."""

    def __init__(self):
        super().__init__()
        self.rows: dict[str, dict] = {}
        self.row = None
        self.details = 0
        self.link = None
        self.code = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "tr" and "data-slide" in attrs:
            self.row = self.rows.setdefault(attrs["data-slide"], {"links": [], "hidden_images": 0, "images": 0,
                                                                  "view": []})
        elif self.row is None:
            return
        elif tag == "details":
            self.details += 1
        elif tag == "img":
            self.row["images"] += 1
            self.row["hidden_images"] += self.details > 0
        elif tag == "a":
            self.link = [attrs.get("href"), ""]
        elif tag == "code" and "view" in (attrs.get("class") or ""):
            self.code = True
            self.row["view"].append("")

    def handle_endtag(self, tag):
        if tag == "tr":
            self.row = None
        elif tag == "details":
            self.details -= 1
        elif tag == "a" and self.link and self.row is not None:
            self.row["links"].append((self.link[1], self.link[0]))
            self.link = None
        elif tag == "code":
            self.code = False

    def handle_data(self, data):
        if self.link is not None:
            self.link[1] += data
        if self.code and self.row is not None:
            self.row["view"][-1] += data


def test_each_slide_links_to_its_outputs_and_viewer_command_and_shows_top_tiles(batch):
    page = batch.report_html.read_text(encoding="utf-8")
    parser = Links()
    parser.feed(page)
    assert set(parser.rows) == {"field 0", "field 1", "broken"}
    for name in ("field 0", "field 1"):
        row = parser.rows[name]
        links = dict(row["links"])
        assert set(links) == {"folder", "overlay", "top tiles", "heatmap", "summary", "GeoJSON"}
        for text, href in links.items():
            assert not urlsplit(href).scheme and " " not in href  # relative and quoted: the folder can move
            target = batch.out / unquote(href)
            assert target.exists(), (text, href)
        assert (batch.out / unquote(links["folder"])).resolve() == (batch.out / name).resolve()
        assert unquote(links["GeoJSON"]).endswith(f"{name}.geojson")
        assert row["view"] == [f"wsi-triage view '{batch.out / name}'"]
        assert row["images"] == 3 and row["hidden_images"] == 0  # thumbnail, overlay and top tiles, all shown
    assert parser.rows["broken"]["links"] == [] and parser.rows["broken"]["view"] == []
    assert f"wsi-triage view {batch.out}" in page


@pytest.mark.skipif(chromium_path() is None, reason="chromium is not installed (apt-get install chromium; .ci/run does)")
def test_report_renders_in_chromium_without_errors(batch, tmp_path):
    with Browser(width=1600, height=1000) as b:
        b.goto(batch.report_html.as_uri())
        b.wait_for("[...document.images].every(i => i.complete)")
        images = b.evaluate("[...document.images].map(i => [i.alt, i.naturalWidth, i.getBoundingClientRect().height])")
        assert len(images) == 6 and all(w > 0 and h > 0 for _, w, h in images), images  # decoded and visible
        assert b.evaluate("document.querySelectorAll('details').length") == 0
        hrefs = b.evaluate("[...document.querySelectorAll('td.slide a')].map(a => a.href)")
        assert len(hrefs) == 12
        for href in hrefs:  # the browser resolves them to the files beside the report
            assert Path(unquote(urlsplit(href).path)).exists(), href
        colours = b.evaluate("Object.fromEntries([...document.querySelectorAll('td span[class^=status-]')]"
                             ".map(s => [s.textContent, getComputedStyle(s).color]))")
        assert {k: v for k, v in colours.items() if k in STATUS_COLOURS} == {
            "ok": _rgb(STATUS_COLOURS["ok"]), "error": _rgb(STATUS_COLOURS["error"])}  # the viewer's list uses these
        b.screenshot(tmp_path / "report.png")
        b.pump(0.3)
        assert b.console_errors() == []
    with Image.open(tmp_path / "report.png") as im:
        assert im.size == (1600, 1000)


def _rgb(hex_colour: str) -> str:
    r, g, b = (int(hex_colour[i:i + 2], 16) for i in (1, 3, 5))
    return f"rgb({r}, {g}, {b})"


def test_the_page_says_what_the_score_means(batch, tmp_path):
    """A checkpoint without a calibration: every score marked raw (ranks only) and the CSV says so; the
    bundled demo student carries one: 0.5 is named as the decision point."""
    import csv

    from wsi_pipeline.review import score_meaning

    page = batch.report_html.read_text(encoding="utf-8")
    assert "Not calibrated" in page and "decision point" in page
    assert page.count('class="num score raw"') == 2  # the two scored fields; the broken slide has no score
    rows = {r["slide"]: r for r in csv.DictReader(batch.triage_csv.open(encoding="utf-8"))}
    assert rows["field 0"]["calibrated"] == "False" and rows["broken"]["calibrated"] == ""

    blob_field(tmp_path / "slides" / "one.png", seed=31, n=12)
    demo = run_batch(tmp_path / "slides", tmp_path / "out", RunOptions(mpp=0.5))
    page = demo.report_html.read_text(encoding="utf-8")
    assert "0.5 is the decision point" in page and 'score raw"' not in page
    assert next(csv.DictReader(demo.triage_csv.open(encoding="utf-8")))["calibrated"] == "True"
    mixed = score_meaning([{"score": 0.7, "calibrated": True}, {"score": 0.2, "calibrated": False}], 0.5)
    assert "raw" in mixed and "0.5" in mixed
    assert score_meaning([{"score": None, "calibrated": None}], 0.5) == ""

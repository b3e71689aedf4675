"""`wsi-triage view`: the viewer served on a real port, its tiles and layers over HTTP, and the page in Chromium."""

from __future__ import annotations

import io
import json
import math
import shutil
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from pipeline_util import blob_field, cells_dir, smear
from PIL import Image

from wsi_pipeline.cli import main
from wsi_pipeline.review.browser import Browser, chromium_path
from wsi_pipeline.errors import OutputError, SlideError
from wsi_pipeline.pipeline import RunOptions, run_batch
from wsi_pipeline.slides import open_slide
from wsi_pipeline.review import SlideDeepZoom, find_view_slides, make_server

DZI_NS = "{http://schemas.microsoft.com/deepzoom/2008}"
POS_SIZE, NEG_SIZE = 1280, 1024


@pytest.fixture(scope="module", params=["cells", "grid"])
def batch(tmp_path_factory, request):
    """Two synthetic smears triaged by the demo student as a batch (one more positive than the other),
    with the placement the demo student declares (cells: the object heatmap) and with the grid."""
    cells = cells_dir(None)
    if cells == Path("__missing__"):
        pytest.skip("no cell images for synthetic smears (shipped cells missing and ../shared/data absent)")
    root = tmp_path_factory.mktemp("viewer")
    smear(root / "slides" / "pos.tiff", cells, fraction=0.6, size=POS_SIZE, seed=3)
    smear(root / "slides" / "neg.tiff", cells, fraction=0.0, size=NEG_SIZE, seed=4)
    result = run_batch(root / "slides", root / "out", RunOptions(tiling=None if request.param == "cells" else "grid"))
    assert result.n_failed == 0
    return root / "out"


class Served:
    """A viewer on a free local port, serving in a thread until closed."""

    def __init__(self, target) -> None:
        self.server = make_server(target, port=0)
        self.url = self.server.url
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def get(self, path: str) -> tuple[int, str, bytes]:
        try:
            with urllib.request.urlopen(self.url + path.lstrip("/"), timeout=60) as r:
                return r.status, r.headers["Content-Type"], r.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.headers["Content-Type"], exc.read()

    def json(self, path: str):
        status, ctype, body = self.get(path)
        assert status == 200 and ctype == "application/json", (path, status, body[:200])
        return json.loads(body)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)


@pytest.fixture()
def served(batch):
    s = Served(batch)
    yield s
    s.close()


def _dzi(body: bytes) -> dict:
    root = ET.fromstring(body)
    size = root.find(f"{DZI_NS}Size")
    return {"tile": int(root.get("TileSize")), "overlap": int(root.get("Overlap")), "format": root.get("Format"),
            "width": int(size.get("Width")), "height": int(size.get("Height"))}


def _expected_tile_size(d: dict, level: int, col: int, row: int) -> tuple[int, int]:
    max_level = math.ceil(math.log2(max(d["width"], d["height"])))
    scale = 2 ** (max_level - level)
    lw, lh = math.ceil(d["width"] / scale), math.ceil(d["height"] / scale)
    ts, ov = d["tile"], d["overlap"]
    w = min(lw, (col + 1) * ts + ov) - (col * ts - (ov if col else 0))
    h = min(lh, (row + 1) * ts + ov) - (row * ts - (ov if row else 0))
    return w, h


def test_find_view_slides_for_a_batch_an_output_folder_and_a_slide(batch, tmp_path):
    slides = find_view_slides(batch)
    assert [s.name for s in slides] == ["pos", "neg"] and [s.rank for s in slides] == [1, 2]  # triage.csv's order
    assert slides[0].score > slides[1].score and all(s.store and s.store.is_dir() for s in slides)
    one = find_view_slides(batch / "neg")
    assert len(one) == 1 and one[0].slide_path == slides[1].slide_path and one[0].out_dir == batch / "neg"
    alone = find_view_slides(slides[0].slide_path)
    assert alone[0].out_dir is None and alone[0].slide_path == slides[0].slide_path
    run_out = tmp_path / "run-out"  # `run`'s folders (no triage.csv): ranked by score
    for name in ("neg", "pos"):
        shutil.copytree(batch / name, run_out / name)
    assert [(s.name, s.rank) for s in find_view_slides(run_out)] == [("pos", 1), ("neg", 2)]
    with pytest.raises(SlideError, match="no such file"):
        find_view_slides(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(OutputError, match="not a slide"):
        find_view_slides(tmp_path / "empty")


def test_http_serves_the_page_dzi_tiles_at_several_levels_and_the_overlay(served, batch):
    status, ctype, page = served.get("/")
    assert status == 200 and ctype.startswith("text/html") and b"openseadragon.min.js" in page
    status, ctype, js = served.get("/static/openseadragon.min.js")
    assert status == 200 and js.startswith(b"//! openseadragon 5.0.1")
    assert served.get("/static/../viewer.py")[0] == 404 and served.get("/static/%2e%2e/viewer.py")[0] == 404
    listing = served.json("/api/slides.json")
    assert [s["name"] for s in listing["slides"]] == ["pos", "neg"]
    assert set(listing["status_colours"]) >= {"ok", "empty", "error"} and len(listing["legend"]) == 11

    status, ctype, body = served.get("/slide/0.dzi")
    d = _dzi(body)
    with open_slide(find_view_slides(batch)[0].slide_path) as slide:
        assert (d["width"], d["height"]) == slide.dimensions == (POS_SIZE, POS_SIZE)
        full = slide.read_region(0, 0, 0, POS_SIZE, POS_SIZE)
    max_level = math.ceil(math.log2(POS_SIZE))
    last = (POS_SIZE - 1) // d["tile"]  # the last column and row at full resolution
    for level, col, row in ((0, 0, 0), (5, 0, 0), (max_level - 2, 1, 1), (max_level - 1, 2, 1), (max_level, 0, 0),
                            (max_level, last, last), (max_level, 3, 2)):
        status, ctype, body = served.get(f"/slide/0_files/{level}/{col}_{row}.jpeg")
        assert status == 200 and ctype == "image/jpeg", (level, col, row, body[:100])
        with Image.open(io.BytesIO(body)) as im:
            assert im.size == _expected_tile_size(d, level, col, row), (level, col, row)
            if level == max_level:  # full resolution: the slide's own pixels (up to JPEG loss)
                ts, ov = d["tile"], d["overlap"]
                x0, y0 = col * ts - (ov if col else 0), row * ts - (ov if row else 0)
                ref = full[y0:y0 + im.size[1], x0:x0 + im.size[0]].astype(float)
                assert np.abs(np.asarray(im.convert("RGB"), float) - ref).mean() < 6
    assert served.get(f"/slide/0_files/{max_level + 1}/0_0.jpeg")[0] == 404
    assert served.get(f"/slide/0_files/{max_level}/99_0.jpeg")[0] == 404
    assert served.get("/slide/7.dzi")[0] == 404

    layers = served.json("/api/slide/0.json")
    summary = json.loads((batch / "pos" / "summary.json").read_text())
    assert layers["top_tiles"] == summary["top_tiles"] and layers["score"] == summary["score"]["value"]
    assert len(layers["tiles"]) == summary["tiles"]["n_tiles"]
    top = summary["top_tiles"][0]
    assert [top["x"], top["y"], top["w"], top["h"], round(top["suspicion"], 4)] in [t[:5] for t in layers["tiles"]]
    heat = np.load(batch / "pos" / "heatmap.npy")
    for floor in (0.0, 0.5):
        status, ctype, body = served.get(f"/overlay/0.png?floor={floor}")
        assert status == 200 and ctype == "image/png"
        with Image.open(io.BytesIO(body)) as im:
            rgba = np.asarray(im.convert("RGBA"))
        k = rgba.shape[0] // heat.shape[0]
        assert rgba.shape[:2] == (heat.shape[0] * k, heat.shape[1] * k) and k >= 1
        drawn = rgba[::k, ::k, 3] > 0
        np.testing.assert_array_equal(drawn, np.isfinite(heat) & (np.nan_to_num(heat, nan=-1) >= floor))
    assert served.get("/overlay/0.png?floor=nan")[0] == 404


def test_own_deep_zoom_matches_openslides_generator(batch):
    """The tiler used for non-OpenSlide backends gives OpenSlide's DeepZoomGenerator's tiles."""
    import openslide
    from openslide.deepzoom import DeepZoomGenerator

    path = find_view_slides(batch)[1].slide_path
    with open_slide(path) as slide, openslide.OpenSlide(str(path)) as osr:
        ours = SlideDeepZoom(slide)
        theirs = DeepZoomGenerator(osr, tile_size=254, overlap=1, limit_bounds=False)
        assert ours.level_count == theirs.level_count and ours.level_tiles == list(theirs.level_tiles)
        assert _dzi(ours.get_dzi("jpeg").encode()) == _dzi(theirs.get_dzi("jpeg").encode())
        for level in (3, theirs.level_count - 3, theirs.level_count - 2, theirs.level_count - 1):
            cols, rows = theirs.level_tiles[level]
            for address in {(0, 0), (cols - 1, rows - 1), (cols // 2, rows // 2)}:
                a = np.asarray(ours.get_tile(level, address).convert("RGB"), float)
                b = np.asarray(theirs.get_tile(level, address).convert("RGB"), float)
                assert a.shape == b.shape, (level, address)
                assert np.abs(a - b).mean() < 4, (level, address)


def test_a_plain_image_is_served_through_the_projects_reader(tmp_path):
    field = blob_field(tmp_path / "field.png", size=(700, 300))
    s = Served(field)
    try:
        d = _dzi(s.get("/slide/0.dzi")[2])
        assert (d["width"], d["height"]) == (700, 300)
        status, _, body = s.get("/slide/0_files/10/2_1.jpeg")
        with Image.open(io.BytesIO(body)) as im:
            assert status == 200 and im.size == _expected_tile_size(d, 10, 2, 1)
        layers = s.json("/api/slide/0.json")
        assert layers["overlay"] is None and layers["tiles"] == [] and layers["top_tiles"] == []
        assert s.get("/overlay/0.png")[0] == 404
    finally:
        s.close()


def test_cli_serves_and_prints_the_url_and_bad_input_is_one_line(batch, tmp_path):
    result = CliRunner().invoke(main, ["view", str(tmp_path / "nothing")])
    assert result.exit_code == 2 and result.output.strip().count("\n") == 0
    assert result.output.startswith("error: ") and "no such file" in result.output
    with socket.socket() as busy:  # a port already taken: one line, not a traceback
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        result = CliRunner().invoke(main, ["view", str(batch), "--port", str(busy.getsockname()[1])])
        assert result.exit_code == 2 and result.output.startswith("error: 127.0.0.1:")
        assert "cannot listen" in result.output and result.output.strip().count("\n") == 0
    proc = subprocess.Popen([sys.executable, "-m", "wsi_pipeline", "view", str(batch), "--port", "0", "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert "http://127.0.0.1:" in line, (line, proc.stderr.read() if proc.poll() is not None else "")
        url = line[line.index("http://"):].split()[0]
        with urllib.request.urlopen(url + "api/slides.json", timeout=60) as r:
            assert [s["name"] for s in json.loads(r.read())["slides"]] == ["pos", "neg"]
    finally:
        proc.terminate()
        proc.wait(30)


needs_chromium = pytest.mark.skipif(chromium_path() is None,
                                    reason="chromium is not installed (apt-get install chromium; .ci/run does)")

CENTRE_JS = """(() => { const s = window.wsiViewer, c = s.viewer.viewport.getCenter(true);
  const z = s.viewer.world.getItemAt(0).viewportToImageZoom(s.viewer.viewport.getZoom(true));
  return [c.x * s.data.width, c.y * s.data.width, z]; })()"""


@needs_chromium
def test_browser_shows_the_slide_overlay_outlines_and_flies_to_a_top_k_place(served, batch, tmp_path):
    summary = json.loads((batch / "pos" / "summary.json").read_text())
    with Browser() as b:
        b.goto(served.url)
        b.wait_for("window.wsiViewer && window.wsiViewer.ready && !!window.wsiViewer.overlay")
        b.wait_for("window.wsiViewer.viewer.world.getItemAt(0).getFullyLoaded()"
                   " && window.wsiViewer.overlay.getFullyLoaded()")
        assert b.evaluate("window.wsiViewer.viewer.world.getItemCount()") == 2  # slide + overlay
        assert b.evaluate("window.wsiViewer.overlay.getOpacity()") == pytest.approx(0.5)
        items = b.evaluate("[...document.querySelectorAll('#topk li')].map(li => li.textContent)")
        assert len(items) == len(summary["top_tiles"]) and f"{summary['top_tiles'][0]['suspicion']:.3f}" in items[0]
        n_above = sum(1 for t in b.evaluate("window.wsiViewer.data.tiles") if t[4] >= 0.2)
        assert b.evaluate("document.querySelectorAll('.outline').length") == n_above > 0
        assert b.evaluate("document.querySelectorAll('#slides li').length") == 2  # the batch's ranked slides
        b.screenshot(tmp_path / "viewer-home.png")

        t = summary["top_tiles"][2]
        b.click("#topk li:nth-child(3)")
        b.wait_for("(() => { const v = window.wsiViewer.viewer.viewport;"  # the flight has landed
                   " return v.getCenter(true).distanceTo(v.getCenter(false)) < 1e-9"
                   " && Math.abs(v.getZoom(true) - v.getZoom(false)) < 1e-9; })()")
        x, y, zoom = b.evaluate(CENTRE_JS)
        assert abs(x - (t["x"] + t["w"] / 2)) < t["w"] / 4 and abs(y - (t["y"] + t["h"] / 2)) < t["h"] / 4
        assert zoom > 0.5  # close to full resolution
        b.wait_for("window.wsiViewer.viewer.world.getItemAt(0).getFullyLoaded()")
        b.screenshot(tmp_path / "viewer-top3.png")

        b.evaluate("(() => { const f = document.getElementById('floor'); f.value = 0.9;"
                   " f.dispatchEvent(new Event('input')); })()")
        n_high = sum(1 for t in b.evaluate("window.wsiViewer.data.tiles") if t[4] >= 0.9)
        assert b.evaluate("document.querySelectorAll('.outline:not(.focus)').length") == n_high

        b.click("#slides li:nth-child(2)")
        b.wait_for("window.wsiViewer.ready && window.wsiViewer.data.name === 'neg'")
        b.wait_for("window.wsiViewer.viewer.world.getItemAt(0).getFullyLoaded()")
        assert b.evaluate("window.wsiViewer.data.width") == NEG_SIZE
        b.pump(0.5)
        assert b.console_errors() == []
    for name in ("viewer-home.png", "viewer-top3.png"):
        with Image.open(tmp_path / name) as im:
            assert im.size == (1400, 900)

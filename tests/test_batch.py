"""`wsi-triage batch`: bad slides recorded not fatal, ranked triage.csv, self-contained report, reruns."""

from __future__ import annotations

import base64
import csv
import io
import json
import shutil
import subprocess
from html.parser import HTMLParser

import pytest
from ckpt_util import random_checkpoint
from click.testing import CliRunner
from pipeline_util import blob_field
from PIL import Image

from wsi_pipeline.cli import main


class ReportParser(HTMLParser):
    """Collects the triage table's rows (cell texts) and every resource reference of the page."""

    def __init__(self):
        super().__init__()
        self.rows, self.refs, self.headers = [], [], []
        self._row = self._cell = None
        self._in_th = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        for key in ("src", "href"):
            if key in attrs:
                self.refs.append((tag, attrs[key]))
        if tag == "tr" and "data-slide" in attrs:
            self._row = {"slide": attrs["data-slide"], "cells": [], "images": []}
        elif tag == "td" and self._row is not None:
            self._cell = ""
        elif tag == "th":
            self._in_th = True
            self.headers.append("")
        elif tag == "img" and self._row is not None:
            self._row["images"].append(attrs["src"])
        if tag in ("script", "link", "iframe", "object"):
            self.refs.append((tag, attrs.get("src") or attrs.get("href") or ""))

    def handle_endtag(self, tag):
        if tag == "td" and self._row is not None and self._cell is not None:
            self._row["cells"].append(self._cell.strip())
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self.rows.append(self._row)
            self._row = None
        elif tag == "th":
            self._in_th = False

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data
        if self._in_th:
            self.headers[-1] += data


def _parse_report(path) -> ReportParser:
    parser = ReportParser()
    parser.feed(path.read_text(encoding="utf-8"))
    return parser


def _batch(*args, code: int):
    result = CliRunner().invoke(main, ["batch", *map(str, args)], catch_exceptions=False)
    assert result.exit_code == code, result.output
    return result


def _csv(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture()
def slides(tmp_path):
    folder = tmp_path / "slides"
    for i, n in enumerate((6, 14, 22)):  # more cells, more tiles
        blob_field(folder / f"field{i}.png", seed=10 + i, n=n)
    (folder / "bad.svs").write_bytes(b"this is not a slide at all")
    (folder / "notes.txt").write_text("ignored: not a slide suffix")
    return folder


def test_batch_records_failures_ranks_and_writes_a_self_contained_report(slides, tmp_path):
    ckpt = random_checkpoint(tmp_path / "a.safetensors", seed=0)
    out = tmp_path / "out"
    res = _batch(slides, "--out", out, "--checkpoint", ckpt, "--mpp", "0.5", "--json", code=1)
    doc = json.loads(res.stdout)
    assert doc["failed"] == 1 and len(doc["slides"]) == 4

    rows = _csv(out / "triage.csv")
    assert [r["rank"] for r in rows] == ["1", "2", "3", "4"]
    ok = [r for r in rows if r["status"] == "ok"]
    assert len(ok) == 3 and [float(r["score"]) for r in ok] == sorted((float(r["score"]) for r in ok), reverse=True)
    for r in ok:
        summary = json.loads((out / r["slide"] / "summary.json").read_text())
        assert float(r["score"]) == pytest.approx(summary["score"]["value"])
    bad = rows[-1]
    assert bad["slide"] == "bad" and bad["status"] == "error" and "bad.svs" in bad["error"] and bad["score"] == ""
    assert "\n" not in bad["error"]
    state = json.loads((out / "batch.json").read_text())
    assert state["slides"]["bad"]["status"] == "error" and state["slides"]["field1"]["status"] == "ok"

    report = _parse_report(out / "report.html")
    assert [r["slide"] for r in report.rows] == [r["slide"] for r in rows]
    assert "Change" not in report.headers  # no previous run to compare with
    for tag, ref in report.refs:  # opens from disk: nothing to fetch (links to the local outputs are fine)
        if tag == "a":
            assert "://" not in ref and not ref.startswith("//"), ref
            continue
        assert tag == "img" and ref.startswith("data:image/"), (tag, ref[:40])
    first = report.rows[0]
    assert first["cells"][2] == f"{float(rows[0]['score']):.3f}"
    assert len(first["images"]) == 3  # thumbnail, overlay, gallery
    for uri in first["images"]:
        head, data = uri.split(",", 1)
        with Image.open(io.BytesIO(base64.b64decode(data))) as im:
            im.verify()
    assert "bad.svs" in report.rows[-1]["cells"][5]
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if chromium:  # render the page as a browser would, from disk
        dom = subprocess.run([chromium, "--headless", "--disable-gpu", "--no-sandbox", "--dump-dom",
                              (out / "report.html").as_uri()], capture_output=True, text=True, timeout=60).stdout
        rendered = ReportParser()
        rendered.feed(dom)
        assert [r["slide"] for r in rendered.rows] == [r["slide"] for r in rows]


def test_only_failed_reruns_failures_and_a_new_checkpoint_reports_score_changes(slides, tmp_path):
    ckpt_a = random_checkpoint(tmp_path / "a.safetensors", seed=0)
    ckpt_b = random_checkpoint(tmp_path / "b.safetensors", seed=1)
    out = tmp_path / "out"
    _batch(slides, "--out", out, "--checkpoint", ckpt_a, "--mpp", "0.5", "--quiet", code=1)
    first = {r["slide"]: r for r in _csv(out / "triage.csv")}
    written = {name: (out / name / "summary.json").stat().st_mtime_ns for name in ("field0", "field1", "field2")}

    blob_field(slides / "fixed.png", seed=30)
    (slides / "fixed.png").replace(slides / "bad.svs")  # the bad slide is repaired (a PNG, read by content)
    res = _batch(slides, "--out", out, "--checkpoint", ckpt_a, "--mpp", "0.5", "--only-failed", "--json", code=0)
    doc = json.loads(res.stdout)
    assert doc["failed"] == 0
    by_slide = {r["slide"]: r for r in doc["slides"]}
    assert by_slide["bad"]["status"] == "ok" and by_slide["bad"]["score"] is not None
    for name in ("field0", "field1", "field2"):  # carried over, not rerun: same outputs, score and time
        assert (out / name / "summary.json").stat().st_mtime_ns == written[name]
        assert by_slide[name]["seconds"] == pytest.approx(float(first[name]["seconds"]))
        assert by_slide[name]["score"] == pytest.approx(float(first[name]["score"]))

    res = _batch(slides, "--out", out, "--checkpoint", ckpt_b, "--mpp", "0.5", "--json", code=0)
    doc = json.loads(res.stdout)
    assert doc["previous_checkpoint_sha256"] and doc["previous_checkpoint_sha256"] != doc["checkpoint_sha256"]
    rows = {r["slide"]: r for r in _csv(out / "triage.csv")}
    for name, row in rows.items():
        assert float(row["previous_score"]) == pytest.approx(by_slide[name]["score"])
        assert float(row["score_change"]) == pytest.approx(float(row["score"]) - float(row["previous_score"]), abs=1e-5)
    report = _parse_report(out / "report.html")
    assert "Change" in report.headers
    col = report.headers.index("Change")
    for r in report.rows:
        assert r["cells"][col] == f"{float(rows[r['slide']]['score_change']):+.3f}"

    # the same new checkpoint again: still compared with the older one, nothing recomputed
    res = _batch(slides, "--out", out, "--checkpoint", ckpt_b, "--mpp", "0.5", "--json", code=0)
    doc2 = json.loads(res.stdout)
    assert doc2["previous_checkpoint_sha256"] == doc["previous_checkpoint_sha256"]
    assert [r["score_change"] for r in doc2["slides"]] == [r["score_change"] for r in doc["slides"]]


def test_batch_with_nothing_to_do_is_a_one_line_error(tmp_path):
    res = _batch(tmp_path / "nowhere" / "*.svs", "--out", tmp_path / "o", code=2)
    assert res.stderr.startswith("error: ") and "no slide files found" in res.stderr


def test_hostile_names_every_slide_like_entry_and_rerun_seconds(tmp_path):
    """Formula-like, control-character and non-UTF-8 names; broken links, loops, a folder named
    like a slide: every entry gets a row, the CSV is inert in a spreadsheet, nothing crashes."""
    import os

    folder = tmp_path / "slides"
    folder.mkdir()
    src = blob_field(tmp_path / "src.png", seed=4, size=(160, 128), n=6)
    for name in ["=cmd|' -c calc'!A0.png", "@SUM(1+1).png", "a\rb.png", "-2+3.png"]:
        shutil.copyfile(src, folder / name)
    shutil.copyfile(src, os.fsencode(folder) + b"/bad\xff.png")
    os.symlink("nowhere.svs", folder / "gone.svs")
    os.symlink("loop.svs", folder / "loop.svs")
    (folder / "dir.svs").mkdir()
    ckpt = random_checkpoint(tmp_path / "a.safetensors", seed=0)
    out = tmp_path / "out"
    _batch(folder, "--out", out, "--checkpoint", ckpt, "--mpp", "0.5", "--quiet", code=1)
    raw = (out / "triage.csv").read_bytes()
    rows = _csv(out / "triage.csv")
    assert len(rows) == 8 and raw.count(b"\n") == 9  # one line per slide: no CR/LF splits a row
    by_slide = {r["slide"]: r for r in rows}
    for cell in ("'=cmd|' -c calc'!A0", "'@SUM(1+1)", "'-2+3", "a\\rb", "bad\\xff"):
        assert by_slide[cell]["status"] == "ok", (cell, by_slide.get(cell))
    for r in rows:
        for value in r.values():
            assert not value.startswith(("=", "+", "-", "@", "\t", "\r")), value
    assert "broken symbolic link" in by_slide["gone"]["error"]
    assert "symbolic link loop" in by_slide["loop"]["error"]
    assert "is a directory" in by_slide["dir"]["error"]
    report = _parse_report(out / "report.html")
    assert len(report.rows) == 8
    first = {r["slide"]: r["seconds"] for r in rows}
    _batch(folder, "--out", out, "--checkpoint", ckpt, "--mpp", "0.5", "--quiet", code=1)
    again = {r["slide"]: r["seconds"] for r in _csv(out / "triage.csv")}
    ok = [s for s in first if by_slide[s]["status"] == "ok"]
    assert {s: again[s] for s in ok} == {s: first[s] for s in ok}  # a rerun keeps each slide's own time


def test_skip_unreadable_makes_unopenable_files_skipped_rows_not_failures(tmp_path):
    """--skip-unreadable: a file that cannot be opened as a slide is a 'skipped' row with its reason
    (exit 0); a slide that opens but fails (here: no pixel size) is still a failure."""
    folder = tmp_path / "slides"
    blob_field(folder / "field.png", seed=2, size=(160, 128), n=6)
    (folder / "bad.svs").write_bytes(b"this is not a slide at all")
    (folder / "dir.svs").mkdir()
    ckpt = random_checkpoint(tmp_path / "a.safetensors", seed=0)
    out = tmp_path / "out"
    res = _batch(folder, "--out", out, "--checkpoint", ckpt, "--skip-unreadable", "--json", code=1)
    by_slide = {r["slide"]: r for r in json.loads(res.stdout)["slides"]}
    assert by_slide["field"]["status"] == "error" and "pixel size" in by_slide["field"]["error"]
    assert by_slide["bad"]["status"] == "skipped" and "bad.svs: not a readable slide" in by_slide["bad"]["error"]
    assert by_slide["dir"]["status"] == "skipped" and "is a directory" in by_slide["dir"]["error"]

    res = _batch(folder, "--out", out, "--checkpoint", ckpt, "--mpp", "0.5", "--skip-unreadable", "--json", code=0)
    doc = json.loads(res.stdout)
    assert doc["failed"] == 0
    rows = _csv(out / "triage.csv")
    assert [(r["slide"], r["status"]) for r in rows] == [("field", "ok"), ("bad", "skipped"), ("dir", "skipped")]
    assert "not a readable slide" in rows[1]["error"] and rows[1]["score"] == ""
    assert json.loads((out / "batch.json").read_text())["slides"]["bad"]["status"] == "skipped"
    assert [r["slide"] for r in _parse_report(out / "report.html").rows] == ["field", "bad", "dir"]
    page = (out / "report.html").read_text()
    assert "1 scored" in page and "0 failed, 2 skipped (not readable as slides)" in page
    assert page.count('class="status-skipped"') == 2
    _batch(folder, "--out", out, "--checkpoint", ckpt, "--mpp", "0.5", "--quiet", code=1)  # without: failures


def test_a_slide_over_the_memory_budget_fails_alone_and_the_batch_goes_on(tmp_path):
    """--slide-memory: each slide is read in a child process under that limit; a slide that needs more
    is a failed row naming the budget, the others are scored, and a larger budget reads it."""
    import numpy as np

    folder = tmp_path / "slides"
    blob_field(folder / "small.png", seed=2, size=(160, 128), n=6)
    Image.fromarray(np.full((9000, 9000, 3), 240, np.uint8)).save(folder / "huge.png")  # 81 Mpx, blank
    ckpt = random_checkpoint(tmp_path / "a.safetensors", seed=0)
    out = tmp_path / "out"
    res = _batch(folder, "--out", out, "--checkpoint", ckpt, "--mpp", "0.5", "--slide-memory", "600M", "--json",
                 code=1)
    by_slide = {r["slide"]: r for r in json.loads(res.stdout)["slides"]}
    assert by_slide["small"]["status"] == "ok"
    huge = by_slide["huge"]
    assert huge["status"] == "error" and "huge.png" in huge["error"] and "--slide-memory" in huge["error"], huge
    assert "600M" in huge["error"] and "\n" not in huge["error"]

    res = _batch(folder, "--out", out, "--checkpoint", ckpt, "--mpp", "0.5", "--slide-memory", "3G", "--json", code=0)
    by_slide = {r["slide"]: r for r in json.loads(res.stdout)["slides"]}
    assert by_slide["huge"]["status"] == "empty" and by_slide["small"]["status"] == "ok"

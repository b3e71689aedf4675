"""The batch report: one self-contained HTML page (no server, no network, images as data URIs).

The page lists the slides ranked by suspicion with their thumbnail, overlay and top-tile
gallery, and, when the previous batch in the same output used another checkpoint, each
slide's score change.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import os
import shlex
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np

from .. import __version__
from wsi_contracts import tilestore as tile_store
from ..aggregation import AggregateConfig, write_atomic
from wsi_contracts.checkpoint import CheckpointInfo

__all__ = ["STATUS_COLOURS", "score_meaning", "render_report", "write_report"]

THUMB_SIDE = 220
OVERLAY_SIDE = 900  # overlay.png is lettered to stay legible at about half its 1,600-2,400 px
GALLERY_SIDE = 760
#: the status colours of the report, shared with the viewer's slide list
STATUS_COLOURS = {"ok": "#176117", "empty": "#777777", "error": "#a31515", "out_of_domain": "#9a5b00",
                  "skipped": "#777777"}

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:1.5em;color:#222}
h1{font-size:1.4em;margin:0 0 .3em} .meta{color:#555;font-size:.9em;margin-bottom:1em}
.meta code{background:#f3f3f3;padding:0 .3em}
table{border-collapse:collapse;width:100%} th,td{border-bottom:1px solid #ddd;padding:.4em .5em;vertical-align:top;text-align:left}
th{background:#fafafa;position:sticky;top:0} td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.error td{background:#fff3f3} tr.empty td{background:#f7f7f7}
.status-ok{color:@ok} .status-empty{color:@empty} .status-error{color:@error;font-weight:600}
.status-out_of_domain{color:@ood;font-weight:600} .status-skipped{color:@skipped} tr.out_of_domain td.score{color:#999}
.up{color:#a31515} .down{color:#176117} .err{font-family:monospace;font-size:.85em;color:#a31515;max-width:40em}
img{max-width:100%;height:auto;display:block} details summary{cursor:pointer;color:#2456a6}
.links{font-size:.85em;margin-top:.4em} .links a{margin-right:.6em;white-space:nowrap}
.links code,.viewcmd code{background:#f3f3f3;padding:0 .3em;font-size:.9em;word-break:break-all}
h3{font-size:.95em;margin:.8em 0 .3em} td.slide{max-width:22em}
td.pictures{min-width:820px} img.overlay{width:100%;max-width:900px}
td.score.raw::after{content:" raw";font-size:.75em;color:#999}
""".replace("@ok", STATUS_COLOURS["ok"]).replace("@empty", STATUS_COLOURS["empty"]).replace(
    "@error", STATUS_COLOURS["error"]).replace("@ood", STATUS_COLOURS["out_of_domain"]).replace(
    "@skipped", STATUS_COLOURS["skipped"])


def _data_uri(image: np.ndarray | None, max_side: int, fmt: str = "JPEG") -> str | None:
    if image is None:
        return None
    from PIL import Image

    pil = Image.fromarray(np.ascontiguousarray(image[..., :3]))
    pil.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    if fmt == "JPEG":
        pil.convert("RGB").save(buf, format="JPEG", quality=85)
        mime = "image/jpeg"
    else:
        pil.save(buf, format="PNG")
        mime = "image/png"
    return f"data:{mime};base64,{base64.b64encode(buf.getvalue()).decode('ascii')}"


def _read_png(path: Path | None) -> np.ndarray | None:
    if path is None or not path.is_file():
        return None
    from PIL import Image

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except OSError:
        return None


def _store_thumbnail(store: Path | None) -> np.ndarray | None:
    if store is None or not store.exists():
        return None
    try:
        return np.asarray(tile_store.open_store(store)["thumbnail"][:])
    except Exception:  # noqa: BLE001 - a broken store only loses its thumbnail in the report
        return None


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return html.escape(str(value))


def _img(uri: str | None, alt: str, cls: str = "") -> str:
    if not uri:
        return '<span class="status-empty">–</span>'
    return f'<img src="{uri}" alt="{html.escape(alt)}"' + (f' class="{cls}"' if cls else "") + ">"


def _href(path: Path, base: Path | None) -> str:
    """A link to ``path``: relative to the report's folder ``base`` when given (the output folder can move
    as a whole), else a file URI."""
    if base is not None:
        try:
            return quote(os.path.relpath(path, base).replace(os.sep, "/"))
        except ValueError:  # another drive on Windows
            pass
    return path.resolve().as_uri()


def _links(out_dir: Path, base: Path | None) -> str:
    """Links to a slide's output folder and files, and the command that opens it in the viewer."""
    if not out_dir.is_dir():
        return ""
    folder = _href(out_dir, base)
    links = [f'<a href="{html.escape(folder)}/">folder</a>']
    for label, name in (("overlay", "overlay.png"), ("top tiles", "gallery.png"), ("heatmap", "heatmap.png"),
                        ("summary", "summary.json")):
        if (out_dir / name).is_file():
            links.append(f'<a href="{html.escape(_href(out_dir / name, base))}">{label}</a>')
    for geo in sorted(out_dir.glob("*.geojson")) + sorted(out_dir.glob("*.geojson.gz")):
        links.append(f'<a href="{html.escape(_href(geo, base))}" title="QuPath: File &gt; Import objects from file">GeoJSON</a>')
    command = f"wsi-triage view {shlex.quote(str(out_dir))}"
    return (f'<div class="links">{"".join(links)}</div>'
            f'<div class="links">view: <code class="view">{html.escape(command)}</code></div>')


def score_meaning(rows: list[dict[str, Any]], threshold: float) -> str:
    """What a pathologist may read from the scores on this page: a calibrated score has 0.5 as its
    decision point; a raw one only ranks (its values depend on the model and the slides)."""
    flags = {r.get("calibrated") for r in rows if r.get("score") is not None}
    calibrated = ("<b>Calibrated</b> on tuning slides for this checkpoint: <b>0.5 is the decision point</b> "
                  "(a score of 0.5 or more reads “suspicious, review first”; below, the model found no convincing "
                  "suspicious cell). The score orders slides for review; it is not a diagnosis.")
    raw = ("<b>Not calibrated</b>: this checkpoint carries no calibration for the score used, so the values only "
           f"rank the slides (read the most suspicious first); do not read {threshold:g} or any other value as a "
           "decision point.")
    if flags == {True}:
        return calibrated
    if flags == {False}:
        return raw
    if flags == {True, False}:
        return ("Scores marked <i>raw</i> are not calibrated (they only rank); the others are calibrated, with 0.5 "
                "as the decision point.")
    return ""


def render_report(rows: list[dict[str, Any]], *, info: CheckpointInfo, previous: dict | None,
                  aggregate: AggregateConfig, base: Path | None = None) -> str:
    """The report page as one HTML string; ``base`` is the report's folder (links are made relative to it)."""
    has_previous = bool(previous and previous.get("checkpoint_sha256"))
    counts = {s: sum(1 for r in rows if r["status"] == s) for s in ("ok", "out_of_domain", "empty", "error", "skipped")}
    settings = ", ".join(f"{k}={v}" for k, v in aggregate.score_settings().items())
    created = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    head = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        "<title>wsi-triage report</title>", f"<style>{CSS}</style></head><body>",
        "<h1>wsi-triage slide triage</h1>",
        '<div class="meta">',
        f"{len(rows)} slides: {counts['ok']} scored, "
        + (f"{counts['out_of_domain']} out of domain (unlike the model's training data; their score is no "
           "suspicion and they rank after the scored slides), " if counts["out_of_domain"] else "")
        + f"{counts['empty']} without tissue tiles, "
        f"{counts['error']} failed"
        + (f", {counts['skipped']} skipped (not readable as slides)" if counts["skipped"] else "") + ".<br>",
        f"Checkpoint <code>{html.escape(info.sha256[:12])}</code> ({html.escape(Path(info.path).name)}); "
        f"suspicious classes: {html.escape(', '.join(info.suspicious_classes))}; "
        f"tiles {info.tile_size} px at {info.tile_mpp:g} um/px.<br>",
        f"Slide score: <code>{html.escape(aggregate.method)}</code> ({html.escape(settings)}) of tile suspicion "
        "(summed probability of the suspicious classes), on a fixed 0–1 scale. "
        + score_meaning(rows, aggregate.threshold) + "<br>",
    ]
    if has_previous:
        head.append(f"Score change against the previous run with checkpoint "
                    f"<code>{html.escape(previous['checkpoint_sha256'][:12])}</code>.<br>")
    if base is not None:
        head.append(f'Zoom into every slide with its overlay: <code class="view">'
                    f'{html.escape("wsi-triage view " + shlex.quote(str(base)))}</code>.<br>')
    head.append(f"Generated {created} by wsi-triage {html.escape(__version__)}.</div>")

    cols = ["Rank", "Slide", "Suspicion"] + (["Change"] if has_previous else []) + \
           ["Tiles", f"Tiles &gt; {aggregate.threshold:g}", "Status", "Thumbnail", "Overlay and top tiles"]
    table = ['<table id="triage"><thead><tr>' + "".join(f"<th>{c}</th>" for c in cols) + "</tr></thead><tbody>"]
    for r in rows:
        out_dir = Path(r["out_dir"]) if r.get("out_dir") else None
        store = Path(r["store"]) if r.get("store") else None
        thumb = _data_uri(_store_thumbnail(store), THUMB_SIDE) if r["status"] != "error" else None
        overlay = _data_uri(_read_png(out_dir / "overlay.png" if out_dir else None), OVERLAY_SIDE)
        gallery = _data_uri(_read_png(out_dir / "gallery.png" if out_dir else None), GALLERY_SIDE)
        status = r["status"]
        status_cell = f'<span class="status-{status}">{html.escape(status)}</span>'
        if r.get("error"):
            status_cell += f'<div class="err">{html.escape(str(r["error"]))}</div>'
        if status == "out_of_domain" and r.get("ood_fraction") is not None:
            status_cell += (f'<div class="ood">{100 * float(r["ood_fraction"]):.0f} % of tiles out of domain: '
                            "not what this model was trained on</div>")
        cells = [f'<td class="num">{r["rank"]}</td>',
                 f'<td class="slide">{html.escape(r["slide"])}{_links(out_dir, base) if out_dir else ""}</td>',
                 (f'<td class="num score raw" title="not calibrated: ranks only">{_fmt(r["score"])}</td>'
                  if r.get("calibrated") is False and r.get("score") is not None
                  else f'<td class="num score">{_fmt(r["score"])}</td>')]
        if has_previous:
            change = r.get("score_change")
            cls = "" if change is None else (" up" if change > 0 else " down" if change < 0 else "")
            text = "–" if change is None else f"{change:+.3f}"
            title = f' title="previous {_fmt(r.get("previous_score"))}"'
            cells.append(f'<td class="num change{cls}"{title}>{text}</td>')
        cells += [f'<td class="num">{_fmt(r.get("n_tiles"))}</td>',
                  f'<td class="num">{_fmt(r.get("above_threshold"))}</td>',
                  f"<td>{status_cell}</td>",
                  f"<td>{_img(thumb, r['slide'] + ' thumbnail')}</td>"]
        overlay_cell = _img(overlay, r["slide"] + " overlay", "overlay")
        if gallery:
            overlay_cell += f'<h3>Top tiles</h3><div class="gallery">{_img(gallery, r["slide"] + " top tiles")}</div>'
        cells.append(f'<td class="pictures">{overlay_cell}</td>')
        table.append(f'<tr class="{html.escape(status)}" data-slide="{html.escape(r["slide"])}">' + "".join(cells) + "</tr>")
    table.append("</tbody></table></body></html>")
    return "\n".join(head + table)


def write_report(path: str | Path, rows: list[dict[str, Any]], *, info: CheckpointInfo,
                 previous: dict | None, aggregate: AggregateConfig) -> Path:
    """Write ``report.html`` atomically."""
    page = render_report(rows, info=info, previous=previous, aggregate=aggregate, base=Path(path).parent)
    return write_atomic(Path(path), page.encode("utf-8"))


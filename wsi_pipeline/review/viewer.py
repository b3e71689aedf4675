"""A local slide viewer: deep-zoom tiles straight from the slide with the suspicion layers on top.

Served by the standard library's ``ThreadingHTTPServer`` to the vendored OpenSeadragon page in
``wsi_pipeline/data/viewer/`` (nothing downloads; works offline). OpenSlide slides are tiled by
openslide-python's ``DeepZoomGenerator``; other backends through :class:`SlideDeepZoom` over
``Slide.read_region``. The suspicion layers come from the tile store (coords, grid and the scores
named in ``summary.json``); a batch output also lists its slides ranked as in ``triage.csv``.
"""

from __future__ import annotations

import csv
import io
import json
import math
import mimetypes
import re
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable
from urllib.parse import parse_qs, urlsplit

import numpy as np

from ..errors import OutputError, SlideError, StoreError

__all__ = ["ViewerSlide", "SlideDeepZoom", "ViewerApp", "ViewerServer", "find_view_slides", "make_server", "serve",
           "ASSETS", "DEFAULT_PORT", "TILE_SIZE", "TILE_OVERLAP"]

ASSETS = Path(__file__).parents[1] / "data" / "viewer"
DEFAULT_PORT = 8765
TILE_SIZE = 254
TILE_OVERLAP = 1
JPEG_QUALITY = 80
OVERLAY_LONG_SIDE = 2048  # the overlay PNG is the tile grid enlarged (nearest) to about this many px


@dataclass(frozen=True)
class ViewerSlide:
    """One slide the viewer shows: its file, and (when it was triaged) its outputs and store."""

    name: str
    slide_path: Path
    out_dir: Path | None = None
    store: Path | None = None
    rank: int | None = None
    status: str = "ok"
    score: float | None = None
    error: str | None = None


# --------------------------------------------------------------------------- finding slides


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return value if isinstance(value, dict) else None


def _existing(path: str | None, *bases: Path) -> Path | None:
    if not path:
        return None
    p = Path(path)
    for candidate in ([p] if p.is_absolute() else [p] + [b / p for b in bases]):
        if candidate.exists():
            return candidate.resolve()
    return None


def _from_out_dir(out_dir: Path, rank: int | None = None, status: str = "ok",
                  score: float | None = None) -> ViewerSlide | None:
    summary = _read_json(out_dir / "summary.json")
    if summary is None:
        return None
    prov = summary.get("provenance") or {}
    slide = _existing(prov.get("slide_path"), out_dir.parent, out_dir)
    store = _existing(prov.get("store"), out_dir.parent) or _existing(str(out_dir.parent / f"{out_dir.name}.zarr"))
    if slide is None:
        return ViewerSlide(summary.get("slide") or out_dir.name, Path(prov.get("slide_path") or "?"), out_dir, store,
                           rank, "error", score, f"{prov.get('slide_path')}: slide file not found (moved?)")
    return ViewerSlide(summary.get("slide") or out_dir.name, slide, out_dir, store, rank, status,
                       (summary.get("score") or {}).get("value") if score is None else score)


def _float(text: str | None) -> float | None:
    try:
        return float(text) if text not in (None, "") else None
    except ValueError:
        return None


def find_view_slides(target: str | Path) -> list[ViewerSlide]:
    """The slides to show for ``target``: a slide file, one slide's output folder (with summary.json),
    or a ``run``/``batch`` output folder (ranked by ``triage.csv`` when there is one)."""
    shown = str(target)
    target = Path(target)
    if not target.exists():
        raise SlideError(f"{shown}: no such file or directory")
    if target.is_file():
        return [ViewerSlide(target.stem, target.resolve())]
    single = _from_out_dir(target)
    if single is not None:
        return [single]
    slides: list[ViewerSlide] = []
    csv_path = target / "triage.csv"
    if csv_path.is_file():
        try:
            rows = list(csv.DictReader(io.StringIO(csv_path.read_text())))
        except (OSError, csv.Error, UnicodeDecodeError) as exc:
            raise OutputError(f"{csv_path}: cannot read ({exc})") from None
        for row in rows:
            name = row.get("slide") or "?"
            rank = int(row["rank"]) if (row.get("rank") or "").isdigit() else None
            out_dir = _existing(row.get("out_dir"), target) or target / name
            found = _from_out_dir(out_dir, rank, row.get("status") or "ok", _float(row.get("score")))
            if found is None:
                found = ViewerSlide(name, Path(row.get("slide_path") or name), None, None, rank,
                                    row.get("status") or "error", None,
                                    row.get("error") or f"{out_dir}: no summary.json")
            slides.append(found)
    else:
        for sub in sorted(p for p in target.iterdir() if p.is_dir() and not p.name.endswith(".zarr")):
            found = _from_out_dir(sub)
            if found is not None:
                slides.append(found)
        slides.sort(key=lambda s: -(s.score if s.score is not None else -1.0))
        slides = [ViewerSlide(s.name, s.slide_path, s.out_dir, s.store, i + 1, s.status, s.score, s.error)
                  for i, s in enumerate(slides)]
    if not slides:
        raise OutputError(f"{shown}: not a slide, a slide's output folder (summary.json) or a run/batch output "
                          "folder (triage.csv or <stem>/summary.json)")
    return slides


# --------------------------------------------------------------------------- deep zoom


class SlideDeepZoom:
    """Deep Zoom tiles (the DZI layout OpenSeadragon reads) from a :class:`~wsi_pipeline.slides.Slide`.

    Same interface as ``openslide.deepzoom.DeepZoomGenerator`` (``level_count``, ``get_dzi``,
    ``get_tile``) for the backends OpenSlide does not read. Each tile is read from the coarsest slide
    level at least as fine as the tile, so a coarse tile never decodes the full-resolution image.
    """

    def __init__(self, slide, tile_size: int = TILE_SIZE, overlap: int = TILE_OVERLAP) -> None:
        self.slide = slide
        self.tile_size, self.overlap = tile_size, overlap
        w, h = slide.dimensions
        self.level_count = int(math.ceil(math.log2(max(w, h, 1)))) + 1
        self.level_dimensions = [(max(1, math.ceil(w / 2 ** (self.level_count - 1 - L))),
                                  max(1, math.ceil(h / 2 ** (self.level_count - 1 - L)))) for L in range(self.level_count)]
        self.level_tiles = [(math.ceil(lw / tile_size), math.ceil(lh / tile_size)) for lw, lh in self.level_dimensions]

    def get_dzi(self, fmt: str) -> str:
        w, h = self.slide.dimensions
        return ('<?xml version="1.0" encoding="UTF-8"?>\n'
                f'<Image xmlns="http://schemas.microsoft.com/deepzoom/2008" Format="{fmt}" '
                f'Overlap="{self.overlap}" TileSize="{self.tile_size}"><Size Width="{w}" Height="{h}"/></Image>')

    def get_tile(self, level: int, address: tuple[int, int]):
        from PIL import Image

        if not 0 <= level < self.level_count:
            raise ValueError(f"invalid level {level}")
        col, row = address
        cols, rows = self.level_tiles[level]
        if not (0 <= col < cols and 0 <= row < rows):
            raise ValueError(f"invalid address {address}")
        lw, lh = self.level_dimensions[level]
        ts, ov = self.tile_size, self.overlap
        x0, y0 = col * ts - (ov if col else 0), row * ts - (ov if row else 0)
        x1, y1 = min(lw, (col + 1) * ts + ov), min(lh, (row + 1) * ts + ov)
        scale = 2.0 ** (self.level_count - 1 - level)
        downsamples = self.slide.level_downsamples
        src = max((i for i, d in enumerate(downsamples) if d <= scale * 1.01), key=lambda i: downsamples[i], default=0)
        ds = downsamples[src]
        w0, h0 = self.slide.dimensions
        X0, Y0 = int(x0 * scale), int(y0 * scale)
        X1, Y1 = min(w0, int(math.ceil(x1 * scale))), min(h0, int(math.ceil(y1 * scale)))
        sw, sh = max(1, int(math.ceil((X1 - X0) / ds))), max(1, int(math.ceil((Y1 - Y0) / ds)))
        region = Image.fromarray(self.slide.read_region(src, X0, Y0, sw, sh))
        size = (x1 - x0, y1 - y0)
        if region.size != size:
            region = region.resize(size, Image.Resampling.BOX if sw > size[0] else Image.Resampling.BILINEAR)
        return region


# --------------------------------------------------------------------------- per-slide data


def _viridis_hex(values: np.ndarray) -> list[str]:
    import matplotlib

    from ..aggregation import COLORMAP

    rgb = (matplotlib.colormaps[COLORMAP](np.clip(values, 0, 1))[..., :3] * 255).round().astype(int)
    return ["#%02x%02x%02x" % tuple(c) for c in rgb]


class _SlideData:
    """An opened slide (tile generator) with its scores, loaded on first use."""

    def __init__(self, entry: ViewerSlide) -> None:
        self.entry = entry
        self.lock = threading.Lock()
        self._dz = None
        self._slide = None
        self._layers: dict[str, Any] | None = None
        self._heat: tuple[np.ndarray, dict] | None = None

    def deepzoom(self):
        with self.lock:
            if self._dz is None:
                from ..slides import open_slide

                if self.entry.error:
                    raise SlideError(self.entry.error)
                self._slide = open_slide(self.entry.slide_path)
                if self._slide.backend == "openslide":
                    import openslide
                    from openslide.deepzoom import DeepZoomGenerator

                    osr = openslide.OpenSlide(str(self.entry.slide_path))
                    self._closers = [osr.close]
                    self._dz = DeepZoomGenerator(osr, tile_size=TILE_SIZE, overlap=TILE_OVERLAP, limit_bounds=False)
                else:
                    self._dz = SlideDeepZoom(self._slide)
            return self._dz

    def dimensions(self) -> tuple[int, int]:
        self.deepzoom()
        return self._slide.dimensions

    def close(self) -> None:
        """Close the slide (idempotent: the server closes its app, and so does a failed start)."""
        with self.lock:
            closers, self._closers = getattr(self, "_closers", []), []
            slide, self._slide, self._dz = self._slide, None, None
        for closer in closers:
            closer()
        if slide is not None:
            slide.close()

    def _scores(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict, dict]:
        """(coords, grid, suspicion, grid meta, summary) from the store and summary.json."""
        from wsi_contracts import tilestore as tile_store
        from ..aggregation import tile_suspicion
        from ..scoring import read_scores

        summary = _read_json(self.entry.out_dir / "summary.json") if self.entry.out_dir else None
        if summary is None or self.entry.store is None:
            return np.zeros((0, 4), int), np.zeros((0, 2), int), np.zeros(0, np.float32), {}, summary or {}
        group = tile_store.open_store(self.entry.store)
        meta = tile_store.read_store_meta(group)
        n = meta.n_tiles
        sha = (summary.get("provenance") or {}).get("checkpoint_sha256")
        probs, attrs = read_scores(group, sha)
        coords = np.asarray(group["coords"][:]) if n else np.zeros((0, 4), int)
        grid = np.asarray(group["grid"][:]) if n else np.zeros((0, 2), int)
        suspicion = tile_suspicion(probs, list(attrs.class_names), list(attrs.suspicious_classes)) if n \
            else np.zeros(0, np.float32)
        return coords, grid, suspicion, meta.grid.as_dict() if meta.grid else {}, summary

    def _object_heat(self, summary: dict[str, Any]) -> tuple[np.ndarray, dict[str, Any]] | None:
        """A cells store's overlay: heatmap.npy (object suspicion on its own grid, summary's
        ``objects.heatmap_grid``), so the viewer shows what overlay.png shows; None for a grid store
        or when the file is missing or does not match its grid."""
        meta = (summary.get("objects") or {}).get("heatmap_grid")
        path = self.entry.out_dir / "heatmap.npy" if self.entry.out_dir else None
        if not isinstance(meta, dict) or path is None or not path.is_file():
            return None
        try:
            heat = np.load(path, allow_pickle=False)
        except (OSError, ValueError):
            return None
        if heat.ndim != 2 or list(heat.shape) != [int(v) for v in meta.get("shape", [])]:
            return None
        return heat.astype(np.float32, copy=False), meta

    def layers(self) -> dict[str, Any]:
        """What the page needs: size, score, top tiles, every tile's box/suspicion/colour, overlay placement."""
        with self.lock:
            if self._layers is not None:
                return self._layers
        coords, grid, suspicion, grid_meta, summary = self._scores()
        width, height = self.dimensions()
        colours = _viridis_hex(suspicion) if len(suspicion) else []
        overlay = None
        # a cells store shows its object-suspicion density (heatmap.npy), a grid store its tile grid
        object_heat = self._object_heat(summary) if len(suspicion) else None
        if object_heat is not None:
            heat, grid_meta = object_heat
        elif grid_meta and len(suspicion):
            from ..aggregation import heatmap_grid

            heat = heatmap_grid(suspicion, grid, tuple(int(v) for v in grid_meta["shape"]))
        if grid_meta and len(suspicion):
            rows, cols = (int(v) for v in grid_meta["shape"])
            sx, sy = (float(v) for v in grid_meta["stride"])
            ox, oy = (float(v) for v in grid_meta.get("origin", [0, 0]))
            with self.lock:
                self._heat = (heat, grid_meta)
            overlay = {"x": ox, "y": oy, "width": cols * sx, "height": rows * sy}
        score = summary.get("score") or {}
        layers = {
            "name": self.entry.name, "width": width, "height": height, "status": self.entry.status,
            "score": score.get("value"), "method": score.get("method"), "error": self.entry.error,
            "top_tiles": summary.get("top_tiles") or [],
            "tiles": [[int(c[0]), int(c[1]), int(c[2]), int(c[3]), round(float(s), 4), col]
                      for c, s, col in zip(coords, suspicion, colours)],
            "overlay": overlay,
        }
        with self.lock:
            self._layers = layers
        return layers

    def overlay_png(self, floor: float) -> bytes:
        """The tile grid on the fixed 0-1 viridis scale, enlarged (nearest); transparent below ``floor``."""
        from PIL import Image

        from ..aggregation import heatmap_rgba

        self.layers()
        if self._heat is None:
            raise LookupError("no scores")
        heat = self._heat[0]
        rgba = heatmap_rgba(heat)
        rgba[..., 3] = np.where(np.isfinite(heat) & (np.nan_to_num(heat, nan=-1.0) >= floor), 255, 0)
        rows, cols = heat.shape
        k = max(1, OVERLAY_LONG_SIDE // max(rows, cols, 1))
        image = Image.fromarray(rgba).resize((cols * k, rows * k), Image.Resampling.NEAREST)
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return buf.getvalue()


# --------------------------------------------------------------------------- the web app


def _status_colours() -> dict[str, str]:
    from .report import STATUS_COLOURS

    return dict(STATUS_COLOURS)


class ViewerApp:
    """Routes a GET path to (status, content type, body); independent of the HTTP server."""

    TILE_RE = re.compile(r"^/slide/(\d+)_files/(\d+)/(\d+)_(\d+)\.jpeg$")

    def __init__(self, slides: list[ViewerSlide]) -> None:
        self.slides = [_SlideData(s) for s in slides]

    def close(self) -> None:
        for s in self.slides:
            s.close()

    def _slide(self, index: str) -> _SlideData:
        i = int(index)
        if not 0 <= i < len(self.slides):
            raise LookupError(f"no slide {i}")
        return self.slides[i]

    def slide_list(self) -> dict[str, Any]:
        return {"status_colours": _status_colours(), "legend": _viridis_hex(np.linspace(0, 1, 11)),
                "slides": [{"id": i, "name": s.entry.name, "rank": s.entry.rank, "status": s.entry.status,
                            "score": s.entry.score, "error": s.entry.error}
                           for i, s in enumerate(self.slides)]}

    def get(self, url: str) -> tuple[int, str, bytes]:
        parts = urlsplit(url)
        path, query = parts.path, parse_qs(parts.query)
        try:
            if path in ("/", "/index.html"):
                return 200, "text/html; charset=utf-8", (ASSETS / "viewer.html").read_bytes()
            if path.startswith("/static/"):
                return self._static(path[len("/static/"):])
            if path == "/api/slides.json":
                return 200, "application/json", json.dumps(self.slide_list()).encode()
            m = re.match(r"^/api/slide/(\d+)\.json$", path)
            if m:
                return 200, "application/json", json.dumps(self._slide(m.group(1)).layers()).encode()
            m = re.match(r"^/slide/(\d+)\.dzi$", path)
            if m:
                return 200, "application/xml", self._slide(m.group(1)).deepzoom().get_dzi("jpeg").encode()
            m = self.TILE_RE.match(path)
            if m:
                return self._tile(*m.groups())
            m = re.match(r"^/overlay/(\d+)\.png$", path)
            if m:
                floor = float((query.get("floor") or ["0"])[0])
                if not math.isfinite(floor):
                    raise ValueError("floor must be a number")
                return 200, "image/png", self._slide(m.group(1)).overlay_png(floor)
        except (LookupError, ValueError) as exc:
            return 404, "text/plain; charset=utf-8", f"not found: {exc}".encode()
        except (SlideError, StoreError, OutputError) as exc:
            return 500, "text/plain; charset=utf-8", f"error: {exc}".encode()
        return 404, "text/plain; charset=utf-8", b"not found"

    def _static(self, rel: str) -> tuple[int, str, bytes]:
        path = (ASSETS / rel).resolve()
        if ASSETS.resolve() not in path.parents or not path.is_file():
            raise LookupError(rel)
        ctype = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        if ctype.startswith("text/") or ctype.endswith("javascript"):
            ctype += "; charset=utf-8"
        return 200, ctype, path.read_bytes()

    def _tile(self, index: str, level: str, col: str, row: str) -> tuple[int, str, bytes]:
        dz = self._slide(index).deepzoom()
        tile = dz.get_tile(int(level), (int(col), int(row)))
        buf = io.BytesIO()
        tile.convert("RGB").save(buf, format="JPEG", quality=JPEG_QUALITY)
        return 200, "image/jpeg", buf.getvalue()


class _Handler(BaseHTTPRequestHandler):
    server: "ViewerServer"
    protocol_version = "HTTP/1.1"
    # headers and body go out as two writes on a kept-alive connection: with Nagle's algorithm the
    # body waits for the client's delayed ACK (about 40 ms a tile)
    disable_nagle_algorithm = True

    def do_GET(self) -> None:  # noqa: N802 - the http.server API
        status, ctype, body = self.server.app.get(self.path)
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-cache" if ctype.startswith(("text/html", "application/json"))
                         else "max-age=3600")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the http.server API
        if self.server.log is not None:
            self.server.log(format % args)


class ViewerServer(ThreadingHTTPServer):
    """The viewer's HTTP server; ``url`` is where a browser reaches it."""

    daemon_threads = True

    def __init__(self, app: ViewerApp, host: str, port: int, log: Callable[[str], None] | None = None) -> None:
        self.app, self.log = app, log
        super().__init__((host, port), _Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        shown = f"[{host}]" if ":" in str(host) else host
        return f"http://{shown}:{port}/"

    def server_close(self) -> None:
        super().server_close()
        self.app.close()


def make_server(target: str | Path, host: str = "127.0.0.1", port: int = DEFAULT_PORT,
                log: Callable[[str], None] | None = None) -> ViewerServer:
    """A ready (bound, not yet serving) viewer for ``target``; ``port=0`` picks a free port.

    Opens the first slide at once so that an unreadable slide is reported before serving."""
    slides = find_view_slides(target)
    app = ViewerApp(slides)
    for s in app.slides:
        if not s.entry.error:
            s.deepzoom()
            break
    try:
        return ViewerServer(app, host, port, log)
    except OSError as exc:
        app.close()
        raise OutputError(f"{host}:{port}: cannot listen ({exc.strerror or exc})") from None


def serve(target: str | Path, host: str = "127.0.0.1", port: int = DEFAULT_PORT,
          on_ready: Callable[[str], None] = print, log: Callable[[str], None] | None = None) -> None:
    """Serve the viewer until interrupted; ``on_ready`` gets the URL."""
    server = make_server(target, host, port, log)
    try:
        on_ready(server.url)
        server.serve_forever()
    finally:
        server.server_close()

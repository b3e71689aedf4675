"""Viewer tile latency: how long `wsi-triage view` takes to answer one deep-zoom tile request.

Writes a 40,000 x 40,000 px synthetic smear (`wsi-triage synth --size 40000x40000`, kept in the work
folder for the next run), serves it with ``wsi_pipeline.review.make_server`` on a local port and
requests tiles over HTTP the way OpenSeadragon does while a user zooms and pans: random views at
random zoom levels, each view's tiles in one burst over 6 connections (a browser's per-host limit,
so a request's latency includes waiting behind the others), then the same views one request at a
time (other views, so no tile is served twice). Prints p50 / p95 / max latency per request, overall and at full resolution, for both
(target: p95 < 100 ms with 6 connections).

Usage: python benchmarks/bench_viewer.py [--work DIR] [--views 60] [--size 40000] [--json FILE|-]
(``--json -``: the figures as JSON alone on stdout, the table on stderr)
"""

from __future__ import annotations

import argparse
import http.client
import math
import queue
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from wsi_pipeline.errors import WsiTriageError
from wsi_pipeline.review import TILE_SIZE, make_server
from wsi_pipeline.script import at_least, run_script

#: the smallest --size whose deep-zoom pyramid has the 8 levels a random view is drawn from
MIN_SIZE = 1024


def ensure_slide(work: Path, size: int) -> Path:
    """The synthetic smear of this size in ``work``, written once with ``wsi-triage synth``."""
    slide = work / f"smear-{size}.tiff"
    if not slide.exists():
        try:
            work.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise WsiTriageError(f"{work}: cannot create the folder ({exc.strerror or exc})") from None
        t0 = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "wsi_pipeline", "synth", str(slide), "--size", f"{size}x{size}",
                               "--seed", "1", "--quiet"], stdout=subprocess.DEVNULL)
        if done.returncode != 0:  # synth printed its own one-line error
            raise WsiTriageError(f"{slide}: wsi-triage synth exited with status {done.returncode}")
        print(f"wrote {slide} in {time.perf_counter() - t0:.0f} s")
    return slide


def view_requests(rng: random.Random, size: int, levels: int) -> list[tuple[int, int, int]]:
    """The tiles of one 1400 x 900 px view at a random level (the coarsest few levels are one tile)."""
    level = rng.randint(levels - 8, levels - 1)
    scale = 2 ** (levels - 1 - level)
    extent = math.ceil(size / scale)
    cols = rows = math.ceil(extent / TILE_SIZE)
    vw, vh = min(cols, math.ceil(1400 / TILE_SIZE) + 1), min(rows, math.ceil(900 / TILE_SIZE) + 1)
    c0, r0 = rng.randint(0, cols - vw), rng.randint(0, rows - vh)
    return [(level, c, r) for c in range(c0, c0 + vw) for r in range(r0, r0 + vh)]


def fetch_all(host: str, port: int, requests: list[tuple[int, int, int]], times: list[tuple[int, float]],
              connections: int) -> None:
    jobs: queue.Queue = queue.Queue()
    for r in requests:
        jobs.put(r)
    failures: list[str] = []

    def worker() -> None:
        conn = http.client.HTTPConnection(host, port, timeout=60)
        try:
            while not failures:
                try:
                    level, c, r = jobs.get_nowait()
                except queue.Empty:
                    break
                t0 = time.perf_counter()
                conn.request("GET", f"/slide/0_files/{level}/{c}_{r}.jpeg")
                resp = conn.getresponse()
                body = resp.read()
                dt = time.perf_counter() - t0
                if resp.status != 200 or not body:
                    failures.append(f"tile {level}/{c}_{r}: HTTP {resp.status}")
                    break
                times.append((level, dt))
        except OSError as exc:
            failures.append(f"{host}:{port}: {exc}")
        finally:
            conn.close()

    threads = [threading.Thread(target=worker) for _ in range(connections)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if failures:  # a figure over fewer tiles than requested would be wrong, not just slower
        raise RuntimeError(f"the viewer failed a request: {failures[0]}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/wsi-triage-bench-viewer"),
                    help="folder for the synthetic smear (kept and reused) [default: %(default)s]")
    ap.add_argument("--views", type=int, default=60, help="random views per pass")
    ap.add_argument("--size", type=int, default=40000, help=f"smear side, px (>= {MIN_SIZE})")
    ap.add_argument("--json", default=None, metavar="FILE", help="also write the figures as JSON ('-' = stdout)")
    args = ap.parse_args(argv)
    return run_script(lambda: measure(args.work, args.size, args.views), args.json)


def measure(work: Path, size: int, views: int) -> dict:
    """Serve the smear, request ``views`` random views with 6 connections then with 1; print the table."""
    at_least("--views", views)
    at_least("--size", size, MIN_SIZE)
    slide = ensure_slide(work, size)
    t0 = time.perf_counter()
    server = make_server(slide, port=0)
    opened = time.perf_counter() - t0
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    host, port = server.server_address[:2]
    levels = math.ceil(math.log2(size)) + 1
    results = {}
    try:
        for seed, connections in enumerate((6, 1)):  # other views for the second pass: no tile served twice
            rng = random.Random(seed)
            times: list[tuple[int, float]] = []
            t0 = time.perf_counter()
            for requests in [view_requests(rng, size, levels) for _ in range(views)]:
                fetch_all(host, port, requests, times, connections)
            results[connections] = (times, time.perf_counter() - t0)
    finally:
        server.shutdown()
        server.server_close()
    doc: dict = {"slide": str(slide), "size": size, "levels": levels, "opened_ms": round(opened * 1000, 1),
                 "views": views, "passes": []}
    print(f"slide {slide.name}: {size} x {size} px, {levels} deep-zoom levels; opened in {opened * 1000:.0f} ms")
    print(f"{'connections':>11s} {'tiles':16s} {'n':>5s} {'p50 ms':>8s} {'p95 ms':>8s} {'max ms':>8s} {'tiles/s':>8s}")
    for connections, (times, wall) in results.items():
        all_ms = np.array([t for _, t in times]) * 1000
        full_ms = np.array([t for lv, t in times if lv == levels - 1]) * 1000
        row: dict = {"connections": connections, "tiles_per_second": round(len(times) / wall, 1)}
        for label, ms in (("all levels", all_ms), ("full resolution", full_ms)):
            if len(ms):
                rate = f"{len(times) / wall:8.0f}" if label == "all levels" else ""
                print(f"{connections:11d} {label:16s} {len(ms):5d} {np.percentile(ms, 50):8.1f} "
                      f"{np.percentile(ms, 95):8.1f} {ms.max():8.1f} {rate:>8s}")
                row[label.replace(" ", "_")] = {"n": int(len(ms)), "p50_ms": round(float(np.percentile(ms, 50)), 1),
                                                "p95_ms": round(float(np.percentile(ms, 95)), 1),
                                                "max_ms": round(float(ms.max()), 1)}
        doc["passes"].append(row)
    p95 = np.percentile(np.array([t for _, t in results[6][0]]) * 1000, 95)
    print(f"target: p95 < 100 ms with 6 connections -> {'met' if p95 < 100 else 'NOT met'} ({p95:.1f} ms)")
    doc["target_p95_ms"] = 100
    doc["target_met"] = bool(p95 < 100)
    return doc


if __name__ == "__main__":
    sys.exit(main())

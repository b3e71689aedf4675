"""Make the README's pictures with the project's own commands.

Runs the README's quick start (``wsi-triage synth demo-smear.tiff --seed 1 --fraction 0.3`` and
``wsi-triage run demo-smear.tiff --out triage-out``) in WORK, then writes, reduced to small PNGs:

- ``overlay.png``: the run's ``overlay.png``;
- ``viewer.png``: ``wsi-triage view triage-out`` in headless Chromium after a click on the first
  of the most suspicious places (driven over the DevTools protocol, as the browser test does);
- ``qupath.png``: the run's GeoJSON detections (object boxes with the cells placement, tile outlines
  with the grid, in their class colours) and the
  smear's ground-truth GeoJSON cells of the same classes, drawn over the slide around the most
  suspicious tile, as QuPath shows them after File > Import objects (drawn here with Pillow).

Usage: python docs/img/make_images.py [WORK] [--out DIR]
(WORK default /tmp/wsi-triage-readme-images; DIR default docs/img, the folder of this script)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
from pathlib import Path

from PIL import Image, ImageDraw

from wsi_pipeline.errors import OutputError, WsiTriageError
from wsi_pipeline.script import run_script

HERE = Path(__file__).resolve().parent


def small_png(image: Image.Image, path: Path, width: int) -> None:
    image = image.convert("RGB")
    if image.width > width:
        image = image.resize((width, round(image.height * width / image.width)), Image.Resampling.LANCZOS)
    image.quantize(colors=128, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(path, optimize=True)
    print(f"{path}: {image.width} x {image.height}, {path.stat().st_size // 1024} KiB")


def wsi_triage(*args: str, cwd: Path) -> None:
    """Run one ``wsi-triage`` command as the README does; its own one-line error is on stderr already."""
    done = subprocess.run([sys.executable, "-m", "wsi_pipeline", *args], cwd=cwd, stdout=subprocess.DEVNULL)
    if done.returncode != 0:
        raise WsiTriageError(f"{cwd}: wsi-triage {' '.join(args)} exited with status {done.returncode}")


def viewer_screenshot(out: Path, path: Path) -> None:
    from wsi_pipeline.review import make_server
    from wsi_pipeline.review.browser import Browser, chromium_path

    if chromium_path() is None:
        raise WsiTriageError(f"{path}: chromium is not installed (apt-get install chromium), needed for the screenshot")

    server = make_server(out, port=0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with Browser(width=1280, height=760) as b:
            b.goto(server.url)
            b.wait_for("window.wsiViewer && window.wsiViewer.ready && !!window.wsiViewer.overlay", 120)
            b.click("#topk li:nth-child(1)")
            b.wait_for("(() => { const v = window.wsiViewer.viewer.viewport;"
                       " return v.getCenter(true).distanceTo(v.getCenter(false)) < 1e-9; })()", 60)
            b.evaluate("window.wsiViewer.viewer.viewport.zoomBy(0.5), true")
            b.wait_for("(() => { const v = window.wsiViewer.viewer.viewport;"
                       " return Math.abs(v.getZoom(true) - v.getZoom(false)) < 1e-9; })()", 60)
            b.wait_for("window.wsiViewer.viewer.world.getItemAt(0).getFullyLoaded()", 120)
            b.pump(1)
            shot = b.screenshot(path.with_suffix(".full.png"))
        small_png(Image.open(shot), path, 1024)
        shot.unlink()
    finally:
        server.shutdown()
        server.server_close()


def qupath_picture(slide: Path, run_dir: Path, truth: Path, path: Path) -> None:
    from PIL import ImageFont

    from wsi_pipeline.aggregation import class_colour
    from wsi_pipeline.slides import open_slide

    summary = json.loads((run_dir / "summary.json").read_text())
    top = summary["top_tiles"][0]
    side = 6 * top["w"]
    x0, y0 = max(0, top["x"] + top["w"] // 2 - side // 2), max(0, top["y"] + top["h"] // 2 - side // 2)
    out_side = 640
    k = out_side / side
    with open_slide(slide) as s:
        crop = Image.fromarray(s.read_region(0, x0, y0, side, side)).resize((out_side, out_side),
                                                                            Image.Resampling.LANCZOS)
    draw = ImageDraw.Draw(crop)
    font = ImageFont.load_default(size=16)

    def boxes(doc):
        for f in doc["features"]:
            ring = f["geometry"]["coordinates"][0]
            xs, ys = [p[0] for p in ring], [p[1] for p in ring]
            yield f["properties"], tuple(k * v for v in (min(xs) - x0, min(ys) - y0, max(xs) - x0, max(ys) - y0))

    truth_doc = json.loads(truth.read_text())
    names = set()
    for props, (a, b, c, d) in boxes(truth_doc):
        name = props["classification"]["name"]
        if props.get("suspicious") and 0 <= a < out_side and 0 <= b < out_side:
            draw.ellipse((a, b, c, d), outline=tuple(props["classification"]["color"]), width=3)
            names.add(name)
    for props, (a, b, c, d) in boxes(json.loads(next(run_dir.glob("*.geojson")).read_text())):
        if c < 0 or d < 0 or a > out_side or b > out_side or props["measurements"]["suspicion"] < 0.5:
            continue
        name = props["classification"]["name"]
        draw.rectangle((a, b, c, d), outline=tuple(props["classification"]["color"]), width=3)
        names.add(name)
    lines = ["squares: result detections (suspicion >= 0.5)", "circles: ground-truth suspicious cells",
             "one colour per class in both files"]
    draw.rectangle((0, 0, 330, 12 + 22 * (len(names) + len(lines))), fill=(255, 255, 255))
    y = 6
    for name in sorted(names):
        draw.rectangle((8, y + 2, 26, y + 18), fill=tuple(class_colour(name)))
        draw.text((34, y), name, fill=(0, 0, 0), font=font)
        y += 22
    for line in lines:
        draw.text((8, y), line, fill=(0, 0, 0), font=font)
        y += 22
    small_png(crop, path, out_side)


def make_images(work: Path, out: Path) -> None:
    """The README quick start in ``work``, then overlay.png, viewer.png and qupath.png in ``out``."""
    for folder in (work, out):
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"{folder}: cannot create the folder ({exc.strerror})") from None
    slide = work / "demo-smear.tiff"
    if not slide.exists():
        wsi_triage("synth", "demo-smear.tiff", "--seed", "1", "--fraction", "0.3", "--quiet", cwd=work)
    wsi_triage("run", "demo-smear.tiff", "--out", "triage-out", "--quiet", cwd=work)
    run_dir = work / "triage-out" / "demo-smear"
    small_png(Image.open(run_dir / "overlay.png"), out / "overlay.png", 760)
    viewer_screenshot(work / "triage-out", out / "viewer.png")
    qupath_picture(slide, run_dir, work / "demo-smear.truth.geojson", out / "qupath.png")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("work", nargs="?", type=Path, default=Path("/tmp/wsi-triage-readme-images"),
                    help="folder for the demo smear and its run (reused) [default: %(default)s]")
    ap.add_argument("--out", type=Path, default=HERE, help="where the pictures go [default: docs/img]")
    args = ap.parse_args(argv)
    return run_script(lambda: make_images(args.work, args.out))


if __name__ == "__main__":
    sys.exit(main())

"""Out-of-domain flag of a checkpoint (default: the bundled blood-cell demo student), measured.

Prints, per source, the share of tiles whose OOD distance is above the checkpoint's threshold and
whether the slide / image is flagged (more than half of its tiles: ``wsi_pipeline.scoring.ood``):

- in domain, must NOT be flagged: synthetic smears (``wsi_pipeline.synth``, default cells = the
  shipped held-out PBC cells no model was trained on), run through the pipeline (tile, score,
  aggregate) -> tile false-flag rate and slide status;
- out of domain, must be flagged: the shared H&E slides (CMU-1-Small-Region.svs; TCGA with
  ``--mpp 0.5``) through the pipeline, and the non-blood images of ../shared/data/tiles and
  ../shared/data/pap_fields (each cut into a grid of checkpoint-size tiles, at its own pixels; only
  tiles showing something count, an image is flagged when more than half of them are).

    python benchmarks/eval_ood.py [--smears 2] [--size 3072] [--no-tcga] [--shared DIR] [--json FILE|-]

``--json -`` prints the rows as JSON on stdout and everything else on stderr.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from wsi_contracts import tilestore as tile_store
from wsi_pipeline.scoring import load_checkpoint
from wsi_pipeline.errors import OptionError, WsiTriageError
from wsi_pipeline.scoring import SLIDE_FRACTION
from wsi_pipeline.pipeline import RunOptions, run_slide
from wsi_pipeline.scoring import predict_probs_ood, read_ood, read_scores
from wsi_pipeline.script import at_least, run_script
from wsi_pipeline.synth import SynthConfig, synthesize

#: ../shared/data beside the checkout, or $WSI_TRIAGE_SHARED_DATA (as the tests find it)
SHARED = Path(os.environ.get("WSI_TRIAGE_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


#: a tile "shows something" when at least this share of its pixels is darker than CONTENT_GREY: blank
#: glass is what the blood-cell model's ``background`` class was trained on, and `run` drops it anyway
CONTENT_SHARE, CONTENT_GREY = 0.10, 200


def image_tiles(path: Path, size: int) -> np.ndarray:
    """Non-overlapping size x size tiles of an image that show something; (0, size, size, 3) for an
    image smaller than one tile or blank."""
    from PIL import Image

    with Image.open(path) as im:
        a = np.asarray(im.convert("RGB"))
    h, w = a.shape[:2]
    tiles = [a[y:y + size, x:x + size] for y in range(0, h - size + 1, size) for x in range(0, w - size + 1, size)]
    tiles = [t for t in tiles if np.mean(t.mean(axis=-1) < CONTENT_GREY) >= CONTENT_SHARE]
    return np.stack(tiles) if tiles else np.zeros((0, size, size, 3), np.uint8)


def slide_row(name: str, run, expect_ood: bool) -> dict:
    group = tile_store.open_store(run.store)
    _, attrs = read_scores(group, None)
    ood = read_ood(group, attrs)
    d = ood[0] if ood else np.zeros(0)
    return {"source": name, "kind": "slide", "expect_ood": expect_ood, "tiles": int(d.size),
            "flagged_tiles": round(float(np.mean(d > ood[1])), 4) if d.size else None,
            "status": run.status, "flagged": run.status == "out_of_domain", "score": run.score,
            "seconds": round(run.seconds, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, default=None, help="student checkpoint [default: the bundled demo student]")
    p.add_argument("--smears", type=int, default=2, help="synthetic held-out smears (alternating 0.3 / 0 suspicious)")
    p.add_argument("--size", type=int, default=3072, help="synthetic smear side, px")
    p.add_argument("--no-tcga", action="store_true", help="skip the TCGA slide (the slowest source)")
    p.add_argument("--shared", type=Path, default=None, help=f"the shared data folder [default: {SHARED}]")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the rows as JSON ('-' = stdout)")
    a = p.parse_args(argv)
    return run_script(lambda: evaluate(a.checkpoint, a.smears, a.size, a.no_tcga, shared_folder(a.shared)), a.json)


def shared_folder(given: Path | None) -> Path:
    """--shared, which must exist when given, else the default (evaluate notes when it is absent)."""
    if given is not None and not given.is_dir():
        raise OptionError("--shared", f"{given}: not a folder")
    return given or SHARED


def evaluate(checkpoint: Path | None, smears: int, size_px: int, no_tcga: bool, shared: Path) -> list[dict]:
    """Every source's row (printed as it comes, then the table); see the module docstring."""
    at_least("--smears", smears, 0)
    loaded = load_checkpoint(checkpoint)
    if loaded.ood is None:
        raise WsiTriageError(f"{loaded.info.path}: checkpoint carries no OOD statistics")
    if not shared.is_dir():  # after the checks: a user mistake stays one line
        print(f"note: {shared}: not found; only the synthetic smears are measured", file=sys.stderr)
    info, size = loaded.info, loaded.info.tile_size
    print(f"checkpoint {info.sha12}: threshold {loaded.ood.threshold:g} ({loaded.ood.info.get('threshold_rule')}); "
          f"a slide is out_of_domain when > {SLIDE_FRACTION:.0%} of its tiles are above it")
    rows = []
    with tempfile.TemporaryDirectory(prefix="eval_ood_") as tmp:
        tmp = Path(tmp)
        opts = RunOptions(checkpoint=checkpoint)
        for i in range(smears):
            frac = 0.3 if i % 2 == 0 else 0.0
            slide = tmp / f"heldout_{i}.tiff"
            synthesize(slide, SynthConfig(width=size_px, height=size_px, seed=700 + i, fraction=frac))
            rows.append(slide_row(f"synth held-out seed {700 + i} fraction {frac}", run_slide(slide, tmp / "out", opts),
                                  False))
            print(rows[-1], flush=True)
        slides = shared / "slides"
        for name, mpp in (("CMU-1-Small-Region.svs", None), ("TCGA-CR-7395-01A-01-TS1.svs", 0.5)):
            if (name.startswith("TCGA") and no_tcga) or not (slides / name).is_file():
                continue
            o = RunOptions(checkpoint=checkpoint, mpp=mpp)
            rows.append(slide_row(f"H&E {name}" + (f" --mpp {mpp}" if mpp else ""),
                                  run_slide(slides / name, tmp / "out", o), True))
            print(rows[-1], flush=True)
    for folder in (shared / "tiles", shared / "pap_fields"):
        if not folder.is_dir():
            continue
        files = sorted(f for f in folder.rglob("*") if f.suffix.lower() in (".png", ".jpg", ".jpeg", ".tif", ".tiff"))
        t0 = time.perf_counter()
        flagged_tiles, n_tiles, flagged_images, used = 0, 0, 0, 0
        for f in files:
            tiles = image_tiles(f, size)
            if not len(tiles):
                continue  # smaller than one model tile, or blank glass only
            used += 1
            _, d = predict_probs_ood(loaded.model, info, tiles, ood=loaded.ood)
            flagged_tiles += int(np.sum(d > loaded.ood.threshold))
            n_tiles += len(d)
            flagged_images += int(np.mean(d > loaded.ood.threshold) > SLIDE_FRACTION)
        rows.append({"source": f"images {folder.name}/ ({used} of {len(files)} files have a {size} px tile "
                               "showing something)", "kind": "images", "expect_ood": True,
                     "tiles": n_tiles, "flagged_tiles": round(flagged_tiles / max(n_tiles, 1), 4),
                     "images": used, "flagged_images": flagged_images,
                     "flagged": flagged_images == used, "seconds": round(time.perf_counter() - t0, 1)})
        print(rows[-1], flush=True)

    print("\nsource | expected | tiles | tiles flagged | flagged (slide / images)")
    for r in rows:
        what = (f"{r['flagged_images']}/{r['images']} images" if r["kind"] == "images" else r["status"])
        print(f"{r['source']} | {'OOD' if r['expect_ood'] else 'in domain'} | {r['tiles']} | "
              f"{100 * (r['flagged_tiles'] or 0):.1f} % | {what}")
    ind = [r for r in rows if not r["expect_ood"]]
    if ind:
        tiles = sum(r["tiles"] for r in ind)
        false_tiles = sum(r["tiles"] * (r["flagged_tiles"] or 0) for r in ind)
        print(f"in-domain (held-out synthetic smears): tile false-flag rate {100 * false_tiles / max(tiles, 1):.2f} % "
              f"of {tiles} tiles; slides flagged {sum(r['flagged'] for r in ind)}/{len(ind)}")
    ood = [r for r in rows if r["expect_ood"]]
    if ood:
        print(f"out of domain: flagged {sum(r['flagged'] for r in ood)}/{len(ood)} sources")
    return rows


if __name__ == "__main__":
    sys.exit(main())

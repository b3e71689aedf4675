"""Before/after, side by side in one run: the large smear's ``wsi-triage run --tiling cells`` and its slow stages.

The issue's scale target (2 cores): the object placement's whole run on a 60,000 x 60,000 px
smear under 5 minutes and 1.5 GB. This script measures the code of a baseline git revision
(``--baseline``, default the last commit before the speed work) and of this checkout alternately,
each measurement in a fresh process, and prints them side by side with their ratio. The baseline
tree is extracted with ``git archive`` under ``--work`` and put first on ``PYTHONPATH`` (the
process runs outside the checkout, so the editable install does not shadow it).

``--stages`` (default): on the smear's overview and its cells store (made once under --work):

* ``stain``: ``decide_stain`` on the tiler's overview (``--stain auto``: Pap pass, then Romanowsky);
* ``objects``: ``detect_objects`` on that overview and its foreground mask;
* ``score``: ``--shards`` shards of the store scored as the scorer does (two threads, one torch
  thread each, bf16 where the CPU has it, OOD distances), decoding included.

Each stage also prints whether its outputs are identical (decision and mask digests, object
table, probabilities and OOD distances bitwise; else their max abs difference). Both codes score
with the same checkpoint (``--checkpoint``, default this checkout's demo student).

``--run``: the whole ``wsi-triage run SMEAR --tiling cells`` (a fresh process as a user runs it:
imports included): e2e, tile, score and aggregate seconds, peak RSS of the command with its
workers (sampled every 0.1 s), then the two stores' probabilities, OOD distances and slide score
compared.

    python benchmarks/bench_speed.py [--stages] [--run] [--smear PATH] [--baseline REV] [--repeat 2] [--work /tmp/wsi-speed]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_pipeline import made_once, measured, run_command  # noqa: E402  (one place for these)

ROOT = Path(__file__).resolve().parents[1]
#: the last commit before the speed work of issue 11 item 5 (the stain pass shared, objects,
#: OOD distances on torch's threads)
BASELINE = "3070416"


# --------------------------------------------------------------------------- children (one stage, one tree)


def child(stage: str, work: str, checkpoint: str, shards: int) -> None:
    """One stage in this process (whichever tree PYTHONPATH gives); prints one JSON line."""
    import hashlib

    import numpy as np

    import wsi_pipeline

    w = Path(work)
    out: dict = {"tree": str(Path(wsi_pipeline.__file__).parent.parent)}
    if stage == "stain":
        from wsi_pipeline.foreground import decide_stain

        thumb, mpp = np.load(w / "overview.npy"), float((w / "overview.mpp").read_text())
        t = time.perf_counter()
        decision, fg = decide_stain(thumb, mpp, 2)
        out["seconds"] = time.perf_counter() - t
        h = hashlib.sha256(json.dumps(decision.as_dict(), sort_keys=True).encode())
        for name in ("mask", "nuclei", "ink", "ink_spared", "ink_opaque"):
            h.update(np.ascontiguousarray(getattr(fg, name)).tobytes())
        out.update(stain=decision.stain, digest=h.hexdigest()[:16])
        np.save(w / "overview-mask.npy", fg.mask)
    elif stage == "objects":
        from wsi_pipeline.tiling import detect_objects

        thumb, mpp = np.load(w / "overview.npy"), float((w / "overview.mpp").read_text())
        mask = np.load(w / "overview-mask.npy")
        tile_um = 128 * 0.27  # the demo student's tile
        t = time.perf_counter()
        table = detect_objects(thumb, mask, mpp, float((w / "overview.ds").read_text()), tile_um=tile_um)
        out["seconds"] = time.perf_counter() - t
        h = hashlib.sha256()
        for a in (table.centre, table.area, table.bbox, table.n_nuclei):
            h.update(np.ascontiguousarray(a).tobytes())
        out.update(n_objects=len(table), digest=h.hexdigest()[:16])
    elif stage == "score":
        from concurrent.futures import ThreadPoolExecutor

        import torch

        from wsi_contracts import tilestore as tile_store
        from wsi_pipeline.scoring import choose_precision, read_checkpoint_info, scoring_model, ScoreConfig

        torch.set_num_threads(1)  # as the scorer's threads scheduler runs each task
        info = read_checkpoint_info(checkpoint)
        group = tile_store.open_store(w / "store.zarr")
        scoring = scoring_model(info.path, info.sha256, "cpu")
        precision = choose_precision(scoring, tile_store.read_shard(group, 0)[:32], ScoreConfig(), "cpu")[0]
        step = max(1, tile_store.read_store_meta(group).n_shards // shards)
        indices = list(range(0, step * shards, step))

        def task(i: int):
            tiles = tile_store.read_shard(group, i)
            return scoring.predict_with_ood(tiles, device="cpu", precision=precision, batch_size=64)

        t = time.perf_counter()
        with ThreadPoolExecutor(2) as pool:
            results = list(pool.map(task, indices))
        out["seconds"] = time.perf_counter() - t
        probs = np.concatenate([r[0] for r in results])
        ood = np.concatenate([r[1] for r in results]) if results[0][1] is not None else np.zeros(0, np.float32)
        np.save(w / f"score-{os.getpid()}.npy", np.concatenate([probs.ravel(), ood.ravel()]))
        out.update(n_tiles=int(len(probs)), precision=precision, arrays=str(w / f"score-{os.getpid()}.npy"))
    else:
        raise SystemExit(f"unknown stage {stage}")
    print(json.dumps(out))


# --------------------------------------------------------------------------- parent


def baseline_tree(work: Path, rev: str) -> Path:
    """``git archive REV`` of the packages, extracted under ``work`` (once per revision)."""
    try:
        sha = subprocess.run(["git", "rev-parse", "--verify", f"{rev}^{{commit}}"], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout.strip()
    except (subprocess.CalledProcessError, FileNotFoundError):
        raise SystemExit(f"error: --baseline: {rev!r} is not a commit of {ROOT}") from None
    tree = work / f"baseline-{sha[:12]}"
    if not (tree / "wsi_pipeline" / "__init__.py").exists():
        tree.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "archive", sha, "wsi_pipeline", "wsi_contracts"], cwd=ROOT,
                                 capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    return tree


def env_for(tree: Path | None) -> dict:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    if tree is not None:
        env["PYTHONPATH"] = str(tree)
    return env


def prepare(work: Path, smear: Path, checkpoint: str) -> None:
    """The smear's overview (as the tiler reads it) and a cells store of it, made once with this checkout."""
    if not (work / "overview.npy").exists():
        import numpy as np

        from wsi_pipeline.slides import open_slide
        from wsi_pipeline.tiling import TilerConfig, mask_mpp_for

        with open_slide(smear) as slide:
            mpp = float(slide.require_mpp().mean)
            thumb, ds = slide.thumbnail(mask_mpp_for(slide, TilerConfig(target_mpp=0.27, tile_size=128), mpp), workers=2)
        np.save(work / "overview.npy", thumb)
        (work / "overview.mpp").write_text(repr(mpp * ds))
        (work / "overview.ds").write_text(repr(float(ds)))
    if not (work / "store.zarr").exists():
        from wsi_pipeline.pipeline import RunOptions, tiler_config_for
        from wsi_pipeline.scoring import read_checkpoint_info
        from wsi_pipeline.tiling import tile_slide

        config = tiler_config_for(read_checkpoint_info(checkpoint), RunOptions(tiling="cells"))
        tiled = tile_slide(smear, work / "tiles", config, workers=2)
        shutil.move(str(tiled.path), str(work / "store.zarr"))


def compare_arrays(a, b) -> str:
    import numpy as np

    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        return f"shapes differ {a.shape} vs {b.shape}"
    if np.array_equal(a, b):
        return "identical"
    return f"max abs diff {float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)))):.3g}"


def stages(args, work: Path, smear: Path, tree: Path) -> dict:
    import numpy as np

    prepare(work, smear, args.checkpoint)
    print(f"stages on {smear.name}'s overview and cells store; baseline {args.baseline} vs this checkout, "
          f"alternating x{args.repeat} (fresh process each)")
    print(f"{'stage':8} {'baseline s':>10} {'current s':>10} {'current/baseline':>16}  outputs")
    doc = {}
    for stage in ("stain", "objects", "score"):
        times = {"baseline": [], "current": []}
        last = {}
        for _ in range(args.repeat):
            for name, t in (("baseline", tree), ("current", None)):
                cmd = [sys.executable, str(Path(__file__).resolve()), "--child", stage, str(work), args.checkpoint,
                       str(args.shards)]
                _, _, stdout = measured(cmd, env_for(t), cwd=work)
                res = json.loads(stdout.strip().splitlines()[-1])
                times[name].append(res["seconds"])
                last[name] = res
        b, c = min(times["baseline"]), min(times["current"])
        if stage == "score":
            arrays = [np.load(last[n]["arrays"]) for n in ("baseline", "current")]
            same = f"probabilities + OOD distances of {last['current']['n_tiles']} tiles " \
                   f"({last['current']['precision']}): {compare_arrays(*arrays)}"
            for n in ("baseline", "current"):
                Path(last[n]["arrays"]).unlink(missing_ok=True)
        else:
            same = "identical" if last["baseline"]["digest"] == last["current"]["digest"] else "DIFFER"
            same += f" ({last['current'].get('stain') or last['current'].get('n_objects')})"
        print(f"{stage:8} {b:10.2f} {c:10.2f} {c / b:16.2f}  {same}", flush=True)
        doc[stage] = {"baseline_seconds": times["baseline"], "current_seconds": times["current"], "outputs": same}
    return doc


def whole_run(args, work: Path, smear: Path, tree: Path) -> dict:
    import numpy as np
    import zarr

    print(f"whole `wsi-triage run {smear.name} --tiling cells` (fresh process each, imports included); "
          f"baseline {args.baseline} vs this checkout, alternating x{args.repeat}")
    print(f"{'code':9} {'tiles':>6} {'e2e s':>7} {'tile s':>7} {'score s':>8} {'agg s':>6} {'peak RSS MB':>11} {'score':>8}")
    doc = {"baseline": [], "current": []}
    stores = {}
    for _ in range(args.repeat):
        for name, t in (("baseline", tree), ("current", None)):
            out = work / f"run-{name}"
            res = run_command(smear, Path(args.checkpoint), out, "threads", "cells", env_for(t), work)
            r = {"n_tiles": res["n_tiles"], "seconds": res["seconds"], "tile": res["tile_seconds"],
                 "score": res["score_seconds"], "aggregate": res["aggregate_seconds"], "peak_rss_mb": res["peak_rss_mb"],
                 "slide_score": res["score"], "precision": res["precision"]}
            doc[name].append(r)
            stores[name] = next(out.glob("*.zarr"))
            print(f"{name:9} {r['n_tiles']:6d} {r['seconds']:7.1f} {r['tile']:7.1f} {r['score']:8.1f} {r['aggregate']:6.1f} "
                  f"{r['peak_rss_mb']:11.0f} {r['slide_score']:8.4f}", flush=True)
    b = min(doc["baseline"], key=lambda r: r["seconds"])
    c = min(doc["current"], key=lambda r: r["seconds"])
    print(f"current / baseline (best of each): e2e {c['seconds'] / b['seconds']:.2f}, tile {c['tile'] / b['tile']:.2f}, "
          f"score {c['score'] / b['score']:.2f}, peak RSS {c['peak_rss_mb'] / b['peak_rss_mb']:.2f}")
    groups = {n: zarr.open_group(str(p), mode="r") for n, p in stores.items()}
    for what in ("coords", "tile_object"):
        print(f"stored {what}: {compare_arrays(groups['baseline'][what][:], groups['current'][what][:])}")
    for what in ("probs", "ood"):
        arr = [np.asarray(g["scores"][next(iter(g["scores"].keys()))][what][:]) for g in groups.values()]
        res = compare_arrays(*arr)
        doc[f"stored_{what}"] = res
        print(f"stored {what}: {res}")
    print(f"slide score: baseline {b['slide_score']} current {c['slide_score']}")
    return doc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", nargs=4, metavar=("STAGE", "WORK", "CHECKPOINT", "SHARDS"), help=argparse.SUPPRESS)
    ap.add_argument("--stages", action="store_true", help="the slow stages, baseline vs current (default)")
    ap.add_argument("--run", action="store_true", help="the whole run command, baseline vs current")
    ap.add_argument("--smear", default=None,
                    help="the large smear [default: made once under --work as bench_pipeline --placements makes it]")
    ap.add_argument("--large-size", type=int, default=60000, help="side in px of the smear made when --smear is not given")
    ap.add_argument("--baseline", default=BASELINE, help=f"git revision to compare with [default: {BASELINE}]")
    ap.add_argument("--repeat", type=int, default=None, help="alternations [default: 2 for --stages, 1 for --run]")
    ap.add_argument("--shards", type=int, default=16, help="--stages: shards scored (spread over the store)")
    ap.add_argument("--checkpoint", default=None,
                    help="checkpoint both codes score with [default: this checkout's bundled demo student]")
    ap.add_argument("--work", default="/tmp/wsi-speed", help="scratch folder (overview, store, baseline tree, runs)")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()
    if args.child:
        child(args.child[0], args.child[1], args.child[2], int(args.child[3]))
        return
    if args.shards < 1 or (args.repeat is not None and args.repeat < 1):
        print("error: --shards and --repeat must be at least 1", file=sys.stderr)
        sys.exit(2)
    work = Path(args.work).resolve()
    try:
        work.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        print(f"error: {work}: cannot create the folder ({exc.strerror or exc})", file=sys.stderr)
        sys.exit(2)
    if args.smear:
        smear = Path(args.smear).resolve()
        if not smear.is_file():
            print(f"error: {smear}: no such slide (--smear)", file=sys.stderr)
            sys.exit(2)
    else:
        smear = made_once(work / f"smear-large-{args.large_size}.tiff", args.large_size, seed=7)
    if args.checkpoint is None:
        args.checkpoint = str(ROOT / "wsi_pipeline" / "data" / "demo_student.safetensors")
    elif not Path(args.checkpoint).is_file():
        print(f"error: {args.checkpoint}: no such checkpoint (--checkpoint)", file=sys.stderr)
        sys.exit(2)
    args.checkpoint = str(Path(args.checkpoint).resolve())
    tree = baseline_tree(work, args.baseline)
    print(f"{os.cpu_count()} CPUs; baseline tree {tree}")
    doc = {}
    if args.stages or not args.run:
        args.repeat = args.repeat or 2
        doc["stages"] = stages(args, work, smear, tree)
    if args.run:
        args.repeat = args.repeat or 1
        doc["run"] = whole_run(args, work, smear, tree)
    if args.json:
        Path(args.json).write_text(json.dumps(doc, indent=2))


if __name__ == "__main__":
    main()

"""Fault injection at scale: does anything end in a traceback, a hang, or a silently wrong result?

Five families of faults, each tried many times, every outcome classified:

* corrupted slides (>= 100 inputs): truncations, bit flips, zeroed headers, zero length, wrong
  extension, hostile TIFF headers (huge tiled levels, offsets past the end), a huge PNG; run as
  one ``batch`` (a hang is the batch passing its timeout; the file is then retried alone to name
  it) -> survived = a result or a one-line recorded error. The batch runs twice, side by side:
  with each slide read in the batch's own process (``--slide-memory 0``, as before the budget) and
  with each slide read in a child process under ``--budget`` (default 1G); it prints the peak
  RSS of the whole process tree for both and the slides stopped by the budget. The tally counts
  the budgeted run;
* damaged stores: shard files deleted, swapped, bit-flipped, truncated; nodes and chunks removed;
  score chunks flipped -> then ``run`` again: survived = the reference score or a one-line error,
  wrong = exit 0 with any other score;
* kill -9 at random moments of ``run`` (tile, score, aggregate) -> rerun: wrong = a different score;
* concurrent runs: 3 ``run`` processes on one slide and output at once -> all exit 0 with the
  reference score;
* hostile checkpoints: malformed architecture fields, NaN weights, non-safetensors -> one line.

It prints one table: tried / survived / tracebacks / hangs / wrong results per family. Target:
0 tracebacks, 0 hangs, 0 wrong results.

    python benchmarks/faults.py [--work /tmp/wsi-faults] [--timeout 120] [--kills 12] [--budget 1G] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("WSI_TRIAGE_SHARED_DATA", ROOT.parent / "shared" / "data"))


def cli(*args: str, timeout: float, peak: list | None = None) -> tuple[int | None, str, str, float]:
    """(exit code or None on timeout, stdout, stderr, seconds) of one ``wsi-triage`` process.

    ``peak``: a list that receives the peak RSS in bytes of the process and all its descendants
    together (sampled every 0.1 s: a batch's children read slides while the batch holds the model)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "wsi_pipeline", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, errors="replace", start_new_session=True)
    done = threading.Event()
    sampler = threading.Thread(target=_sample_tree_rss, args=(proc.pid, done, peak), daemon=True)
    if peak is not None:
        sampler.start()
    try:
        out, err = proc.communicate(timeout=timeout)
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        rc = None
    done.set()
    if peak is not None:
        sampler.join()
    return rc, out, err, time.perf_counter() - t0


def _sample_tree_rss(pid: int, done: threading.Event, peak: list) -> None:
    import psutil

    best = 0
    try:
        root = psutil.Process(pid)
        while not done.is_set():
            total = 0
            for p in [root, *root.children(recursive=True)]:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
            best = max(best, total)
            done.wait(0.1)
    except psutil.Error:
        pass
    peak.append(best)


def one_line_error(rc: int | None, err: str) -> bool:
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("warning:")]
    return rc == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err


class Tally:
    def __init__(self, name: str) -> None:
        self.name = name
        self.tried = self.survived = self.tracebacks = self.hangs = self.wrong = 0
        self.examples: list[str] = []

    def add(self, outcome: str, label: str, detail: str = "") -> None:
        self.tried += 1
        if outcome == "ok":
            self.survived += 1
            return
        setattr(self, {"traceback": "tracebacks", "hang": "hangs", "wrong": "wrong"}[outcome],
                getattr(self, {"traceback": "tracebacks", "hang": "hangs", "wrong": "wrong"}[outcome]) + 1)
        self.examples.append(f"{outcome}: {label}: {detail[-300:]}".replace("\n", " | "))

    def row(self) -> dict:
        return {"family": self.name, "tried": self.tried, "survived": self.survived, "tracebacks": self.tracebacks,
                "hangs": self.hangs, "wrong": self.wrong}


# --------------------------------------------------------------------------- inputs

PBC_CLASSES = ["basophil", "eosinophil", "erythroblast", "ig", "lymphocyte", "monocyte", "neutrophil", "platelet"]


def architecture(img_size: int = 32, depth: int = 1, embed_dim: int = 48, num_heads: int = 3) -> dict:
    return {"family": "timm-vit", "img_size": img_size, "patch_size": 16, "embed_dim": embed_dim,
            "depth": depth, "num_heads": num_heads, "mlp_ratio": 4.0, "num_classes": len(PBC_CLASSES),
            "class_token": True, "global_pool": "token"}


def small_checkpoint(work: Path) -> Path:
    """A one-block random ViT in the student checkpoint format: 64 px tiles at 1 um/px."""
    import torch
    from timm.models.vision_transformer import VisionTransformer

    from wsi_contracts.checkpoint import write_checkpoint

    arch = architecture(img_size=64)
    torch.manual_seed(0)
    model = VisionTransformer(**{k: v for k, v in arch.items() if k != "family"})
    with torch.no_grad():
        model.head.weight.mul_(20.0)  # spread the class probabilities per tile
    meta = {"format": "wsi-triage-student", "format_version": "1", "architecture": arch,
            "class_names": PBC_CLASSES, "suspicious_classes": ["erythroblast", "ig"],
            "normalization": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]},
            "input_size": 64, "tile_size": 64, "tile_mpp": 1.0, "provenance": {"note": "random weights (benchmark)"}}
    path = work / "student.safetensors"
    write_checkpoint(path, model.state_dict(), meta)
    return path


def source_slides(work: Path) -> list[Path]:
    """Real and generated slides of each reader path: Aperio JPEG tiles, JPEG 2000, pyramidal
    JPEG TIFF (direct JPEG-tile path), OME-TIFF, PNG, JPEG."""
    from PIL import Image

    from wsi_pipeline.synth import SynthConfig, blob_field, synthesize

    src = work / "sources"
    src.mkdir(parents=True, exist_ok=True)
    out = []
    for name in ("CMU-1-Small-Region.svs", "TCGA-CR-7395-01A-01-TS1.svs"):
        if (SHARED / "slides" / name).is_file():
            out.append(SHARED / "slides" / name)
    for ome in (False, True):
        path = src / f"synth{'-ome' if ome else ''}.tiff"
        if not path.exists():
            synthesize(path, SynthConfig(width=2048, height=2048, mpp=0.25, seed=3, fraction=0.25, ome=ome))
        out.append(path)
    png = blob_field(src / "field.png", seed=1, size=(512, 384), n=30)
    jpg = src / "field.jpg"
    Image.open(png).convert("RGB").save(jpg, quality=90)
    return out + [png, jpg]


def hostile_tiff(path: Path, *, width: int, height: int, tile: int = 256, past_end: bool = False,
                 one_offset: bool = False) -> Path:
    """A tiny tiled JPEG TIFF whose header then claims a ``width`` x ``height`` level (every tile the
    same few bytes, or past the end of the file, or one tile for all of it)."""
    import numpy as np
    import tifffile

    data = np.full((tile, tile, 3), 200, np.uint8)
    tifffile.imwrite(path, data, tile=(tile, tile), compression="jpeg", photometric="rgb",
                     resolution=(1e4 / 0.5, 1e4 / 0.5), resolutionunit="CENTIMETER")
    with tifffile.TiffFile(path, mode="r+b") as tif:
        page = tif.pages[0]
        page.tags["ImageWidth"].overwrite(width)
        page.tags["ImageLength"].overwrite(height)
        n = -(-width // tile) * -(-height // tile)
        if one_offset:
            return path
        if past_end:
            page.tags["TileOffsets"].overwrite([10**9] * n)
            page.tags["TileByteCounts"].overwrite([10**6] * n)
        else:
            page.tags["TileOffsets"].overwrite(list(page.dataoffsets) * n)
            page.tags["TileByteCounts"].overwrite(list(page.databytecounts) * n)
    return path


def corrupted_inputs(work: Path, sources: list[Path], seed: int) -> list[Path]:
    """Truncations, bit flips, zeroed headers, zero length, wrong extension, hostile headers."""
    import numpy as np
    from PIL import Image

    rng = random.Random(seed)
    bad = work / "bad"
    shutil.rmtree(bad, ignore_errors=True)
    bad.mkdir(parents=True)
    out: list[Path] = []

    def put(name: str, data: bytes) -> None:
        path = bad / name
        path.write_bytes(data)
        out.append(path)

    for src in sources:
        data = src.read_bytes()
        stem, ext = src.stem, src.suffix
        for frac in (0.0005, 0.01, 0.1, 0.35, 0.6, 0.9, 0.999):
            put(f"{stem}-trunc{frac}{ext}", data[: max(1, int(len(data) * frac))])
        for k, n_flips in enumerate((1, 1, 8, 8, 64, 512)):
            buf = bytearray(data)
            for _ in range(n_flips):
                buf[rng.randrange(len(buf))] ^= 1 << rng.randrange(8)
            put(f"{stem}-flip{n_flips}-{k}{ext}", bytes(buf))
        buf = bytearray(data)
        for _ in range(16):  # inside the header / first IFD
            buf[rng.randrange(min(len(buf), 4096))] = rng.randrange(256)
        put(f"{stem}-header{ext}", bytes(buf))
        buf = bytearray(data)
        start = rng.randrange(len(buf) // 4, len(buf) // 2)
        buf[start:start + 65536] = bytes(min(65536, len(buf) - start))
        put(f"{stem}-zeroed{ext}", bytes(buf))
        put(f"{stem}-wrongext.png" if ext != ".png" else f"{stem}-wrongext.svs", data)
    put("empty.svs", b"")
    put("text.tiff", b"II*\x00 this is not a TIFF at all" * 10)
    put("pickle.png", b"\x80\x04\x95" + bytes(64))
    out.append(hostile_tiff(bad / "huge-level.tiff", width=200_000, height=200_000))
    out.append(hostile_tiff(bad / "huge-claim.tiff", width=2_000_000, height=2_000_000, one_offset=True))
    out.append(hostile_tiff(bad / "huge-past-end.tiff", width=100_000, height=100_000, past_end=True))
    out.append(hostile_tiff(bad / "wide-level.tiff", width=10**6, height=256))
    rgba = np.zeros((12000, 12000, 4), np.uint8)  # 144 Mpx, transparent, no pixel size: tiny file
    Image.fromarray(rgba).save(bad / "transparent-huge.png", optimize=True)
    out.append(bad / "transparent-huge.png")
    for name in ("gone.svs", "loop.svs"):
        os.symlink("nowhere.svs" if name == "gone.svs" else "loop.svs", bad / name)
        out.append(bad / name)
    (bad / "folder.svs").mkdir()
    out.append(bad / "folder.svs")
    return out


# --------------------------------------------------------------------------- families


def family_slides(work: Path, ckpt: Path, inputs: list[Path], timeout: float, tally: Tally, budget: str) -> dict:
    """One ``batch`` over every corrupted input, read in the batch's own process (no budget, as before
    the budget) and then under ``budget``: peak RSS of each; the budgeted run is tallied (a batch that
    hangs is retried file by file)."""
    folder = inputs[0].parent
    runs = {}
    for label, memory in (("in-process, no budget", "0"), (f"child per slide, budget {budget}", budget)):
        out = work / f"bad-out-{memory}"
        shutil.rmtree(out, ignore_errors=True)
        peak: list = []
        rc, stdout, err, secs = cli("batch", folder, "--out", out, "--checkpoint", ckpt, "--mpp", "0.5", "--json",
                                    "--quiet", "--slide-timeout", str(timeout / 2), "--slide-memory", memory,
                                    timeout=timeout * len(inputs) / 4, peak=peak)
        rows = {r["slide_path"]: r for r in json.loads(stdout)["slides"]} if stdout.strip() else {}
        over = sorted(Path(r["slide_path"]).name for r in rows.values() if "--slide-memory" in (r["error"] or ""))
        runs[label] = {"exit": rc, "seconds": round(secs, 1), "peak_rss_mb": round(peak[0] / 2**20) if peak else None,
                       "over_budget": over}
        print(f"  batch over {len(inputs)} corrupted inputs, {label}: exit {rc}, {secs:.0f} s, "
              f"peak RSS (batch and its children) {runs[label]['peak_rss_mb']} MB, "
              f"{len(over)} over the memory budget{': ' + ', '.join(over) if over else ''}", flush=True)
    if rc is None or "Traceback" in err or not rows:
        for path in inputs:  # name the culprit
            rc1, _, err1, _ = cli("run", path, "--out", work / "single", "--checkpoint", ckpt, "--mpp", "0.5",
                                  "--quiet", timeout=timeout)
            outcome = "hang" if rc1 is None else "traceback" if "Traceback" in err1 else "ok"
            tally.add(outcome, path.name, err1)
        return runs
    from wsi_pipeline.names import printable

    for path in inputs:
        row = rows.get(printable(str(path)))
        if row is None:
            tally.add("wrong", path.name, "no row in triage.csv")
        elif row["status"] == "error" and ": unexpected " in (row["error"] or ""):
            tally.add("traceback", path.name, row["error"])
        else:
            tally.add("ok", path.name)
    return runs


def _score(out: Path, stem: str) -> float | None:
    try:
        return json.loads((out / stem / "summary.json").read_text())["score"]["value"]
    except (OSError, ValueError, KeyError):
        return None


def store_damages(store: Path, rng: random.Random):
    """(label, function damaging a copy of ``store``) pairs."""
    from wsi_contracts import tilestore as tile_store

    group = tile_store.open_store(store)
    n_shards = tile_store.read_store_meta(group).n_shards

    def shard(root: Path, i: int) -> Path:  # the zarr v3 chunk key of tile shard i
        tiles = tile_store.open_store(root)["tiles"]
        return root / "tiles" / tiles.metadata.encode_chunk_key((i, 0, 0, 0))

    def flip(path: Path, n: int, lo: float = 0.0, hi: float = 1.0) -> None:
        buf = bytearray(path.read_bytes())
        for _ in range(n):
            buf[rng.randrange(int(len(buf) * lo), max(int(len(buf) * hi), int(len(buf) * lo) + 1))] ^= 0xFF
        path.write_bytes(bytes(buf))

    def chunk_files(root: Path, node: str) -> list[Path]:
        return sorted(p for p in (root / node).rglob("*") if p.is_file() and p.name != "zarr.json")

    damages = []
    for i in sorted({0, n_shards // 2, n_shards - 1}):  # first, middle, last (partial) shard
        damages.append((f"delete shard {i}", lambda r, i=i: shard(r, i).unlink()))
        damages.append((f"swap shard {i}", lambda r, i=i: shutil.copyfile(shard(r, (i + 1) % n_shards), shard(r, i))))
        damages.append((f"flip jpeg bytes shard {i}", lambda r, i=i: flip(shard(r, i), 3, 0.05, 0.8)))
        damages.append((f"flip index shard {i}", lambda r, i=i: flip(shard(r, i), 1, 0.99, 1.0)))
        damages.append((f"truncate shard {i}", lambda r, i=i: shard(r, i).write_bytes(shard(r, i).read_bytes()[:-64])))
    for node in ("tiles/zarr.json", "coords/zarr.json", "thumbnail", "mask", "shard_done", "shard_digest", "zarr.json"):
        damages.append((f"remove {node}", lambda r, node=node: (shutil.rmtree(r / node) if (r / node).is_dir()
                                                                 else (r / node).unlink())))
    for node in ("coords", "grid", "qc/foreground", "shard_done", "shard_digest"):
        damages.append((f"remove a chunk of {node}", lambda r, node=node: chunk_files(r, node)[-1].unlink()))
        damages.append((f"flip a chunk of {node}", lambda r, node=node: flip(chunk_files(r, node)[0], 2)))
    damages.append(("flip a chunk of scores", lambda r: flip(chunk_files(r, "scores")[0], 2)))
    damages.append(("remove a chunk of scores", lambda r: [p for p in chunk_files(r, "scores") if "probs" in str(p)][0].unlink()))
    damages.append(("meta says complete=false", lambda r: tile_store.update_meta(tile_store.open_store(r, "r+"), complete=False)))
    return damages


def family_stores(work: Path, ckpt: Path, slide: Path, timeout: float, tally: Tally, seed: int) -> None:
    ref_out = work / "ref"
    shutil.rmtree(ref_out, ignore_errors=True)
    rc, _, err, _ = cli("run", slide, "--out", ref_out, "--checkpoint", ckpt, "--mpp", "0.5", "--quiet", timeout=timeout)
    assert rc == 0, err
    stem = slide.stem
    ref = _score(ref_out, stem)
    rng = random.Random(seed)
    for label, damage in store_damages(ref_out / f"{stem}.zarr", rng):
        out = work / "damaged"
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(ref_out, out)
        shutil.rmtree(out / stem)  # outputs go: aggregate must run again on the damaged store
        damage(out / f"{stem}.zarr")
        # the store alone (no slide): score and aggregate must refuse or be right
        rc, _, err, _ = cli("aggregate", out / f"{stem}.zarr", "--out", out / stem, "--json", timeout=timeout)
        tally.add(_judged(rc, err, out, stem, ref), f"aggregate after {label}", err)
        # then `run` with the slide: repaired to the reference, or a one-line error
        rc, _, err, _ = cli("run", slide, "--out", out, "--checkpoint", ckpt, "--mpp", "0.5", "--quiet",
                            timeout=timeout)
        tally.add(_judged(rc, err, out, stem, ref), f"run after {label}", err)


def _judged(rc, err: str, out: Path, stem: str, ref) -> str:
    """hang, traceback, wrong (exit 0 with another score than the reference) or ok."""
    if rc is None:
        return "hang"
    if "Traceback" in err or (rc != 0 and not one_line_error(rc, err)):
        return "traceback"
    return "wrong" if rc == 0 and _score(out, stem) != ref else "ok"


def family_kills(work: Path, ckpt: Path, slide: Path, timeout: float, tally: Tally, kills: int, seed: int) -> None:
    """kill -9 at a random moment of `run`, then rerun to completion: the reference score."""
    ref = _score(work / "ref", slide.stem)
    rng = random.Random(seed)
    rc, _, _, full = cli("run", slide, "--out", work / "timing", "--checkpoint", ckpt, "--mpp", "0.5", "--quiet",
                         timeout=timeout)
    out = work / "killed"
    for k in range(kills):
        if k % 3 == 0:
            shutil.rmtree(out, ignore_errors=True)
        delay = rng.uniform(0.5, full)
        proc = subprocess.Popen([sys.executable, "-m", "wsi_pipeline", "run", str(slide), "--out", str(out),
                                 "--checkpoint", str(ckpt), "--mpp", "0.5", "--quiet"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        proc.kill()
        proc.wait()
        rc, _, err, _ = cli("run", slide, "--out", out, "--checkpoint", ckpt, "--mpp", "0.5", "--quiet",
                            timeout=timeout)
        outcome = "hang" if rc is None else "traceback" if "Traceback" in err else "ok"
        if outcome == "ok" and (rc != 0 or _score(out, slide.stem) != ref):
            outcome = "wrong"
        tally.add(outcome, f"kill at {delay:.1f} s", err)
        leftovers = [p for p in out.rglob("*.tmp*")]
        if outcome == "ok" and leftovers:
            tally.survived -= 1
            tally.add("wrong", f"kill at {delay:.1f} s left temporaries", str(leftovers[:3]))
            tally.tried -= 1


def family_concurrent(work: Path, ckpt: Path, slide: Path, timeout: float, tally: Tally, rounds: int) -> None:
    ref = _score(work / "ref", slide.stem)
    for k in range(rounds):
        out = work / f"concurrent{k}"
        shutil.rmtree(out, ignore_errors=True)
        cmd = [sys.executable, "-m", "wsi_pipeline", "run", str(slide), "--out", str(out), "--checkpoint",
               str(ckpt), "--mpp", "0.5", "--quiet"]
        procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
        for p in procs:
            try:
                _, err = p.communicate(timeout=timeout * 3)
            except subprocess.TimeoutExpired:
                p.kill()
                tally.add("hang", f"concurrent round {k}")
                continue
            outcome = "traceback" if "Traceback" in err else "ok" if p.returncode == 0 else "wrong"
            if outcome == "ok" and _score(out, slide.stem) != ref:
                outcome = "wrong"
            tally.add(outcome, f"concurrent round {k}", err)


def family_checkpoints(work: Path, ckpt: Path, slide: Path, timeout: float, tally: Tally) -> None:
    from safetensors.torch import load_file, save_file

    with open(ckpt, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        meta = json.loads(fh.read(n))["__metadata__"]
    arch = architecture(img_size=32, depth=1, embed_dim=48)
    bad_arch = {"embed_dim-string": {"embed_dim": "48"}, "img_size-list": {"img_size": [32, 32]},
                "embed_dim-huge": {"embed_dim": 2**40}, "embed_dim-wide": {"embed_dim": 96000, "num_heads": 1},
                "num_classes-nine": {"num_classes": "nine"}, "depth-negative": {"depth": -1},
                "mlp_ratio-nan": {"mlp_ratio": float("nan")}, "unknown-field": {"act_layer": "os.system"},
                "patch-0": {"patch_size": 0}, "heads-0": {"num_heads": 0}}
    cases = {f"architecture {k}": {"architecture": json.dumps({**arch, **v})} for k, v in bad_arch.items()}
    cases.update({"tile_mpp Infinity": {"tile_mpp": "Infinity"}, "tile_mpp -1": {"tile_mpp": "-1"},
                  "tile_size 1e9": {"tile_size": "1000000000"}, "class_names number": {"class_names": "7"},
                  "normalization std 0": {"normalization": json.dumps({"mean": [0, 0, 0], "std": [0, 0, 0]})}})
    state = load_file(str(ckpt))
    folder = work / "ckpts"
    folder.mkdir(exist_ok=True)
    paths = []
    for label, change in cases.items():
        path = folder / f"{len(paths)}.safetensors"
        save_file(state, str(path), metadata={**meta, **change})
        paths.append((label, path))
    nan_state = {k: v.clone() for k, v in state.items()}
    nan_state["head.weight"][:] = float("nan")
    save_file(nan_state, str(folder / "nan.safetensors"), metadata=meta)
    paths.append(("NaN weights", folder / "nan.safetensors"))
    (folder / "pickle.safetensors").write_bytes(b"\x80\x04\x95" + bytes(100))
    paths.append(("pickle", folder / "pickle.safetensors"))
    (folder / "trunc.safetensors").write_bytes(ckpt.read_bytes()[:-1000])
    paths.append(("truncated", folder / "trunc.safetensors"))
    for label, path in paths:
        rc, _, err, _ = cli("run", slide, "--out", work / "ckpt-out", "--checkpoint", path, "--mpp", "0.5", "--quiet",
                            timeout=timeout)
        outcome = "hang" if rc is None else "ok" if one_line_error(rc, err) else "traceback" if "Traceback" in err \
            else "wrong"
        tally.add(outcome, label, err)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="/tmp/wsi-faults")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds before one command counts as a hang")
    parser.add_argument("--kills", type=int, default=12)
    parser.add_argument("--concurrent", type=int, default=2, help="rounds of 3 simultaneous runs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--budget", default="1G", help="--slide-memory of the budgeted batch over the corrupted slides")
    parser.add_argument("--only", default="slides,stores,kills,concurrent,checkpoints")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    only = set(args.only.split(","))
    t0 = time.perf_counter()
    ckpt = small_checkpoint(work)
    sources = source_slides(work)
    slide = next(p for p in sources if p.suffix == ".png")
    tallies = []
    memory = None
    if "slides" in only:
        tally = Tally("corrupted slides")
        inputs = corrupted_inputs(work, sources, args.seed)
        memory = family_slides(work, ckpt, inputs, args.timeout, tally, args.budget)
        tallies.append(tally)
    if {"stores", "kills", "concurrent"} & only:
        tally = Tally("damaged stores")
        family_stores(work, ckpt, slide, args.timeout, tally, args.seed)
        if "stores" in only:
            tallies.append(tally)
    if "kills" in only:
        tally = Tally("kill -9 then rerun")
        family_kills(work, ckpt, slide, args.timeout, tally, args.kills, args.seed)
        tallies.append(tally)
    if "concurrent" in only:
        tally = Tally("3 concurrent runs")
        family_concurrent(work, ckpt, slide, args.timeout, tally, args.concurrent)
        tallies.append(tally)
    if "checkpoints" in only:
        tally = Tally("hostile checkpoints")
        family_checkpoints(work, ckpt, slide, args.timeout, tally)
        tallies.append(tally)
    rows = [t.row() for t in tallies]
    total = {k: sum(r[k] for r in rows) for k in ("tried", "survived", "tracebacks", "hangs", "wrong")}
    print(f"\n{'family':24s} {'tried':>6s} {'survived':>9s} {'tracebacks':>11s} {'hangs':>6s} {'wrong':>6s}")
    for r in rows + [{"family": "total", **total}]:
        print(f"{r['family']:24s} {r['tried']:6d} {r['survived']:9d} {r['tracebacks']:11d} {r['hangs']:6d} {r['wrong']:6d}")
    print(f"({time.perf_counter() - t0:.0f} s; hang = over {args.timeout:g} s per command)")
    for label, r in (memory or {}).items():
        print(f"batch over the corrupted slides, {label}: peak RSS {r['peak_rss_mb']} MB (batch and children), "
              f"{r['seconds']:.0f} s, {len(r['over_budget'])} slides over the memory budget")
    for t in tallies:
        for line in t.examples[:12]:
            print(f"  {t.name}: {line}")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "total": total, "batch_memory": memory,
                                               "examples": {t.name: t.examples for t in tallies}}, indent=2))


if __name__ == "__main__":
    main()

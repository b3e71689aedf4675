"""Pack PBC minus the held-out list into `.pack/pbc` (JPEG q80, ~47 MB) so it can travel to a
GPU machine with the checkout (examples/train_pbc_gpu.sh). Relative paths are unchanged, so the
train/validation split is the same as with ../shared/data/pbc.

    python examples/pack_pbc.py [--src ../shared/data/pbc] [--out .pack/pbc] [--quality 80]

Each image is written to a temporary name and renamed, so an interrupted run leaves no half
image; a rerun writes them all again.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from PIL import Image

from wsi_pipeline.errors import OptionError, WsiTriageError
from wsi_pipeline.script import run_script

ROOT = Path(__file__).resolve().parents[1]
#: ../shared/data beside the checkout, or $WSI_TRIAGE_SHARED_DATA (as the tests find it)
SHARED = Path(os.environ.get("WSI_TRIAGE_SHARED_DATA", ROOT.parent / "shared" / "data"))


def pack(src: Path, out: Path, heldout: Path, quality: int) -> int:
    """Re-encode every ``src/*/*.jpg`` not in the held-out list under ``out``; says and returns how many."""
    if not 1 <= quality <= 95:
        raise OptionError("--quality", f"must be 1-95, got {quality}")
    if not src.is_dir():
        raise WsiTriageError(f"{src}: not a folder (the PBC ImageFolder, --src)")
    from distill.data import read_exclude  # imports torch: only when there is work to do

    held = read_exclude(heldout)
    images = [p for p in sorted(src.glob("*/*.jpg")) if p.relative_to(src).as_posix() not in held]
    if not images:
        raise WsiTriageError(f"{src}: no class/*.jpg images outside the held-out list {heldout}")
    for path in images:
        target = out / path.relative_to(src)
        partial = target.with_name(f".{target.name}.partial")
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            with Image.open(path) as im:
                im.convert("RGB").save(partial, format="JPEG", quality=quality)
            os.replace(partial, target)
        except OSError as exc:
            raise WsiTriageError(f"{exc.filename or target}: cannot write ({exc.strerror or exc})") from None
    print(f"packed {len(images)} images into {out}")
    return len(images)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", type=Path, default=SHARED / "pbc", help="PBC ImageFolder [default: %(default)s]")
    parser.add_argument("--out", type=Path, default=ROOT / ".pack" / "pbc", help="[default: %(default)s]")
    parser.add_argument("--heldout", type=Path, default=ROOT / "configs" / "pbc_heldout.txt",
                        help="relpaths left out [default: %(default)s]")
    parser.add_argument("--quality", type=int, default=80, help="JPEG quality, 1-95")
    args = parser.parse_args(argv)
    return run_script(lambda: pack(args.src, args.out, args.heldout, args.quality))


if __name__ == "__main__":
    sys.exit(main())

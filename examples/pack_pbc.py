"""Pack PBC minus the held-out list into `.pack/pbc` (JPEG q80, ~47 MB) so it can travel to a
GPU machine with the checkout (examples/train_pbc_gpu.sh). Relative paths are unchanged, so the
train/validation split is the same as with ../shared/data/pbc.

    python examples/pack_pbc.py [--src ../shared/data/pbc] [--out .pack/pbc]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", type=Path, default=ROOT.parent / "shared" / "data" / "pbc")
    parser.add_argument("--out", type=Path, default=ROOT / ".pack" / "pbc")
    parser.add_argument("--quality", type=int, default=80)
    args = parser.parse_args()
    held = {line.strip() for line in (ROOT / "configs" / "pbc_heldout.txt").read_text().splitlines()
            if line.strip() and not line.startswith("#")}
    n = 0
    for path in sorted(args.src.glob("*/*.jpg")):
        rel = path.relative_to(args.src).as_posix()
        if rel in held:
            continue
        target = args.out / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.open(path).convert("RGB").save(target, quality=args.quality)
        n += 1
    print(f"packed {n} images into {args.out}")


if __name__ == "__main__":
    main()

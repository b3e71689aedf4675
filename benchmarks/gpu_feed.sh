#!/usr/bin/env bash
# The GPU half of the "triage end to end" benchmark: does the scorer keep the GPU fed (scorer
# tiles/s within 2x of the student's bare batch throughput)? Runs benchmarks/bench_scorer_feed.py.
#
#   here, where pip can download (once):  bash benchmarks/gpu_feed.sh fetch   # .whl/, ~41 MB
#   on the GPU machine (repo root):       bash benchmarks/gpu_feed.sh run     # $OUT/feed.json, feed.log
#
# The GPU image has torch, timm, numpy, scipy, scikit-image, tifffile, safetensors, click, tqdm
# and matplotlib, but not zarr, imagecodecs, dask or openslide: those travel as Python 3.12
# wheels pinned to the versions CI installs (.whl/ is ignored by git; carry it with the call).
# Environment: OUT (results folder), WORKERS (scorer worker counts, default 4,8,16), SIZE (smear
# side in px, default 24576), PY (python3).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
WHEELS=(zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1 google-crc32c==1.9.0 imagecodecs==2026.3.6
        dask==2026.8.0 distributed==2026.8.0 partd==1.4.2 locket==1.0.0 tblib==3.2.2 zict==3.0.0
        tornado==6.6.1 openslide-python==1.4.7 openslide-bin==4.0.1.2)
case "${1:-run}" in
  fetch)
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      --platform manylinux1_x86_64 --platform manylinux_2_5_x86_64 -d .whl "${WHEELS[@]}"
    du -sh .whl ;;
  run)
    OUT=${OUT:-/tmp/gpu-feed-out}
    mkdir -p "$OUT"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
    { nvidia-smi -L || echo "no nvidia-smi"; nproc
      "$PY" -c "import torch, timm, zarr, dask, imagecodecs; print('torch', torch.__version__, 'timm', timm.__version__, 'zarr', zarr.__version__, 'dask', dask.__version__, 'imagecodecs', imagecodecs.__version__, 'cuda', torch.cuda.is_available())"
    } > "$OUT/feed.log" 2>&1
    "$PY" benchmarks/bench_scorer_feed.py --workers "${WORKERS:-4,8,16}" --size "${SIZE:-24576}" --batch 256 \
      --work /tmp/wsi-feed --json "$OUT/feed.json" 2>&1 | tee -a "$OUT/feed.log" ;;
  *) echo "usage: $0 fetch|run" >&2; exit 2 ;;
esac

#!/usr/bin/env bash
# Fetch the public tables that torchxrayvision ships inside its wheel (the OpenI/NLMCXR
# report archive and, where present, the NIH / RSNA / VinDr / CheXpert label tables) into a
# cache OUTSIDE the repository, for `medfuse data import`.
#
# Why a download and not `pip install`: torchxrayvision depends on a CUDA torchvision; we
# only want its package data, so the wheel is fetched with --no-deps and unzipped.
# Why outside the repo: the OpenI reports are CC BY-NC-ND; nothing derived from them may be
# committed. Idempotent: a wheel or file already in the cache is not fetched or unpacked again.
#
#   scripts/fetch-public-tables.sh [CACHE]      (default: $MEDFUSE_PUBLIC_TABLES or
#                                                ~/.cache/medfuse/public-tables)
set -euo pipefail

VERSION="1.5.7"
CACHE="${1:-${MEDFUSE_PUBLIC_TABLES:-$HOME/.cache/medfuse/public-tables}}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-$HERE/.venv/bin/python}"
[ -x "$PY" ] || PY="$(command -v python3)"

case "$(cd "$(dirname "$CACHE")" 2>/dev/null && pwd)/$(basename "$CACHE")/" in
  "$HERE"/*) echo "error: cache $CACHE is inside the repository $HERE; choose a folder outside it" >&2; exit 2 ;;
esac

mkdir -p "$CACHE/wheels"
WHEEL="$(ls "$CACHE"/wheels/torchxrayvision-"$VERSION"-*.whl 2>/dev/null | head -n1 || true)"
if [ -z "$WHEEL" ]; then
  "$PY" -m pip download --quiet --no-deps "torchxrayvision==$VERSION" -d "$CACHE/wheels"
  WHEEL="$(ls "$CACHE"/wheels/torchxrayvision-"$VERSION"-*.whl | head -n1)"
fi
echo "wheel: $WHEEL"

# Unpack only the tables an importer may need; list the whole data folder of the wheel.
"$PY" - "$WHEEL" "$CACHE" <<'PYEOF'
import sys
import zipfile
from pathlib import Path

wheel, cache = Path(sys.argv[1]), Path(sys.argv[2])
WANTED = (
    "nlmcxr",                  # OpenI: reports (tgz of XMLs), DICOM metadata (views)
    "bbox_list_2017",          # NIH ChestX-ray14 boxes
    "data_entry_2017",         # NIH ChestX-ray14 labels
    "rsna", "kaggle_stage_2",  # RSNA pneumonia
    "vinbigdata", "vindr",     # VinDr-CXR
    "chexpert",                # CheXpert tables
)
with zipfile.ZipFile(wheel) as zf:
    data = [i for i in zf.infolist() if i.filename.startswith("torchxrayvision/data/")
            and not i.is_dir()]
    print(f"{len(data)} files under torchxrayvision/data/ in {wheel.name}:")
    for info in sorted(data, key=lambda i: i.filename):
        name = info.filename.removeprefix("torchxrayvision/data/")
        keep = any(w in name.lower() for w in WANTED)
        print(f"  {'*' if keep else ' '} {info.file_size:>12,d}  {name}")
        if not keep:
            continue
        dest = cache / name
        if dest.is_file() and dest.stat().st_size == info.file_size:
            continue
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(dest.name + ".part")
        with zf.open(info) as src, open(tmp, "wb") as out:
            while chunk := src.read(1 << 20):
                out.write(chunk)
        tmp.replace(dest)
print(f"unpacked (*) into {cache}")
PYEOF

#!/usr/bin/env bash
# Fetches into .whl/ the wheels the lent GPU image (nvidia-h200: Python 3.12, torch 2.11, no network) lacks
# for `import diffusers`, and nothing else: everything in --target /tmp/site comes before the image's own
# site-packages on PYTHONPATH, so a wheel the image already has (torch, numpy, huggingface_hub, ...) would
# shadow it. Run here (where pip reaches the index), once; .whl/ is ignored by git (.git/info/exclude) and
# travels with `carry: [".whl"]`.
#
# Why exactly these (diffusers 0.42.1's Requires-Dist against the image's package list,
# /work/.library/device/KINDS.md, 2026-11-17):
#   diffusers==0.42.1            missing there: carried (py3-none-any, the version installed here)
#   huggingface-hub>=1.32,<3     there (1.33.0)            filelock, numpy, requests   there
#   safetensors>=0.8.0           there (0.8.0)             regex, Pillow               there
#   importlib_metadata           NOT carried: diffusers imports it only under Python < 3.8
#                                (utils/import_utils.py; 3.12 uses the standard importlib.metadata), and
#                                its 10.x wheel needs lazy-importer, which the image lacks too: carrying it
#                                would give every library that prefers the backport over the standard
#                                importlib.metadata a package that cannot import its own dependency.
#                                `--check` below proves the import without it.
#   (diffusers also imports packaging and, through huggingface_hub, tqdm: both there.)
# Size: one 6.1 MB wheel (the carried tree's limit is 64 MiB).
# On the GPU (any call whose `carry` names .whl):
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
#     .whl/*.whl && export PYTHONPATH=/tmp/site:$PYTHONPATH
# Usage: bash scripts/fetch_gpu_wheels.sh [--check]
#   --check  also runs the GPU's install line into a temporary --target here and imports diffusers (and its SD3
#            classes) from there with importlib_metadata blocked.
set -euo pipefail
cd "$(dirname "$0")/.."
DIFFUSERS_VERSION=0.42.1
WHEELS=("diffusers==$DIFFUSERS_VERSION")

grep -qxF /.whl/ .git/info/exclude 2>/dev/null || { mkdir -p .git/info; echo /.whl/ >> .git/info/exclude; }
mkdir -p .whl
# keep one version of each: a stale wheel of another version would stop the whole install there
find .whl -type f -name '*.whl' ! -name "diffusers-$DIFFUSERS_VERSION-*" -delete
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${WHEELS[@]}"

echo "--- .whl/"
ls -l .whl
du -ch .whl/*.whl | tail -1
echo "--- Requires-Dist of diffusers (extras skipped)"
unzip -p .whl/diffusers-*.whl '*/METADATA' | grep ^Requires-Dist | grep -v extra || true

if [ "${1:-}" = "--check" ]; then
  # the GPU's install line, into a temporary target, then `import diffusers` from there (not from this
  # machine's own copy) with importlib_metadata made unimportable, as it is on the image
  site=$(mktemp -d)
  trap 'rm -rf "$site"' EXIT
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl
  PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" python3 - "$site" <<'PY'
import sys
from importlib.abc import MetaPathFinder

class Block(MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "importlib_metadata":
            raise ModuleNotFoundError(f"blocked: {name} (absent on the GPU image)")

sys.meta_path.insert(0, Block())
import diffusers
from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline  # noqa: F401  (resolve the lazy imports)
assert diffusers.__file__.startswith(sys.argv[1]), diffusers.__file__
print("--check: import diffusers", diffusers.__version__, "from", diffusers.__file__, "OK without importlib_metadata")
PY
fi

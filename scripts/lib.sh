# Shared set-up steps for scripts/*. Each step is idempotent and installs into ignored folders
# of the repository, from the package registries only.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ORT_VERSION=1.31.1
export ORT_DYLIB_PATH="${ORT_DYLIB_PATH:-$ROOT/.ort/lib/libonnxruntime.so.$ORT_VERSION}"

log() { printf '==> %s\n' "$*" >&2; }

# The ONNX Runtime shared library, taken from the onnxruntime wheel on PyPI (no Python needed
# to use it; pip is only the downloader).
ensure_ort() {
  [ -f "$ROOT/.ort/lib/libonnxruntime.so.$ORT_VERSION" ] && return 0
  log "fetching ONNX Runtime $ORT_VERSION (PyPI wheel)"
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.11 \
    "onnxruntime==$ORT_VERSION" -d "$ROOT/.ort/whl"
  python3 - "$ROOT" "$ORT_VERSION" <<'PY'
import glob, os, sys, zipfile
root, ver = sys.argv[1], sys.argv[2]
whl = glob.glob(f"{root}/.ort/whl/onnxruntime-{ver}-*.whl")[0]
os.makedirs(f"{root}/.ort/lib", exist_ok=True)
with zipfile.ZipFile(whl) as z:
    for n in z.namelist():
        if n.startswith("onnxruntime/capi/libonnxruntime.so"):
            with open(f"{root}/.ort/lib/{os.path.basename(n)}", "wb") as f:
                f.write(z.read(n))
PY
}

# A virtualenv with what the test models are made with.
ensure_venv() {
  local stamp="$ROOT/.venv/.modelhub-reqs"
  local reqs="$ROOT/scripts/models/requirements.txt"
  if [ -f "$stamp" ] && cmp -s "$stamp" "$reqs"; then return 0; fi
  log "creating .venv (test-model tools from PyPI)"
  python3 -m venv "$ROOT/.venv"
  "$ROOT/.venv/bin/pip" install -q --disable-pip-version-check -r "$reqs"
  cp "$reqs" "$stamp"
}

# The generated test models in .cache/test-models.
ensure_test_models() {
  local out="$ROOT/.cache/test-models"
  local stamp="$out/.source-sha256"
  local want
  want="$(sha256sum "$ROOT/scripts/models/make_test_models.py" | cut -d' ' -f1)"
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then return 0; fi
  ensure_venv
  log "generating test models"
  "$ROOT/.venv/bin/python" "$ROOT/scripts/models/make_test_models.py" --out "$out" 2>/dev/null
  echo "$want" > "$stamp"
}

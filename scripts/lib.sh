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

# A MongoDB-wire server for tests: nx-27017 (a MongoDB wire-protocol server on SQLite, from
# PyPI) in its own virtualenv, .cache/mongo-venv (sets MONGO_VENV). Real MongoDB cannot be
# installed here. Concurrent callers (parallel tests) wait on a lock for one install.
ensure_mongo() {
  MONGO_VENV="$ROOT/.cache/mongo-venv"
  local reqs="nx-27017==0.8.1 neosqlite==1.17.2"
  local stamp="$MONGO_VENV/.modelhub-reqs"
  if [ -x "$MONGO_VENV/bin/nx-27017" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$reqs" ]; then
    return 0
  fi
  mkdir -p "$ROOT/.cache"
  (
    flock 9
    if [ -x "$MONGO_VENV/bin/nx-27017" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$reqs" ]; then
      exit 0
    fi
    log "creating .cache/mongo-venv (nx-27017 MongoDB-wire server from PyPI)"
    rm -rf "$MONGO_VENV"
    python3 -m venv "$MONGO_VENV"
    # shellcheck disable=SC2086
    "$MONGO_VENV/bin/pip" install -q --disable-pip-version-check $reqs >&2
    echo "$reqs" > "$stamp"
  ) 9>"$ROOT/.cache/mongo-venv.lock"
}

# An IPFS node for tests and local runs, in .cache/ipfs-node: kubo can't be installed here (its
# npm package downloads the binary), so this is the JavaScript node, npm ipfs@0.66.1, which
# serves the same RPC API offline. Fixes (docs TOOLING.md, "IPFS"): mortice pinned to 3.0.6
# (newer needs Node 22); wrtc and electron-webrtc replaced by an empty local package (else npm
# fetches a tarball from a code host); the RPC answers of add and pin patched to print CIDv1 in
# base32 and add's Size as a string, as kubo does. scripts/ipfs writes the node's config.
# Concurrent callers (parallel tests) wait on a lock for one install.
IPFS_NODE="$ROOT/.cache/ipfs-node"
IPFS_RECIPE="ipfs@0.66.1 mortice@3.0.6 stub-webrtc kubo-answers-v1"
ipfs_installed() {
  [ -x "$IPFS_NODE/node_modules/.bin/jsipfs" ] && [ -f "$IPFS_NODE/.modelhub-recipe" ] \
    && [ "$(cat "$IPFS_NODE/.modelhub-recipe")" = "$IPFS_RECIPE" ]
}
ensure_ipfs() {
  ipfs_installed && return 0
  command -v npm >/dev/null || { log "npm is needed to install the IPFS node"; return 1; }
  mkdir -p "$ROOT/.cache"
  (
    flock 9
    ipfs_installed && exit 0
    log "installing the IPFS node into .cache/ipfs-node (npm ipfs@0.66.1, about a minute)"
    mkdir -p "$IPFS_NODE/stub-empty"
    cat > "$IPFS_NODE/stub-empty/package.json" <<'JSON'
{"name": "stub-empty", "version": "1.0.0", "description": "empty stand-in for optional WebRTC packages", "license": "MIT"}
JSON
    cat > "$IPFS_NODE/package.json" <<'JSON'
{
  "name": "modelhub-ipfs-node",
  "private": true,
  "dependencies": { "ipfs": "0.66.1" },
  "overrides": {
    "mortice": "3.0.6",
    "wrtc": "file:./stub-empty",
    "electron-webrtc": "file:./stub-empty"
  }
}
JSON
    (cd "$IPFS_NODE" && npm install --no-audit --no-fund --loglevel=error >&2)
    local res="$IPFS_NODE/node_modules/ipfs-http-server/src/api/resources" f
    for f in files-regular.js pin.js; do
      grep -q 'modelhub-patched' "$res/$f" && continue
      # CIDv1 in base32 unless a base is asked for (CIDv0 stays base58btc); add's Size a string.
      perl -0pi -e '
        s/cidBase: Joi\.string\(\)\.default\(\x27base58btc\x27\)/cidBase: Joi.string().default(\x27base32\x27)/g;
        s/\b([a-z]+(?:\.cid)?)\.toString\(base\.encoder\)/($1.version === 0 ? $1.toString() : $1.toString(base.encoder))/g;
        s/Size: file\.size,/Size: String(file.size),/g;
        $_ = "// modelhub-patched: kubo-style answers\n" . $_;
      ' "$res/$f"
    done
    echo "$IPFS_RECIPE" > "$IPFS_NODE/.modelhub-recipe"
  ) 9>"$ROOT/.cache/ipfs-node.lock"
}

# An EVM dev node for tests and local runs: anvil from npm @foundry-rs/anvil-linux-amd64 (the
# npm package ships the binary itself; foundryup downloads from a code host and fails here),
# installed into .cache/anvil. Concurrent callers (parallel tests) wait on a lock for one install.
ANVIL_VERSION=1.7.1
ANVIL_HOME="$ROOT/.cache/anvil"
ANVIL_BIN="$ANVIL_HOME/node_modules/@foundry-rs/anvil-linux-amd64/bin/anvil"
anvil_installed() {
  [ -x "$ANVIL_BIN" ] && [ "$(cat "$ANVIL_HOME/.modelhub-version" 2>/dev/null)" = "$ANVIL_VERSION" ]
}
ensure_anvil() {
  anvil_installed && return 0
  command -v npm >/dev/null || { log "npm is needed to install anvil"; return 1; }
  mkdir -p "$ROOT/.cache"
  (
    flock 9
    anvil_installed && exit 0
    log "installing anvil $ANVIL_VERSION into .cache/anvil (npm @foundry-rs/anvil-linux-amd64)"
    rm -rf "$ANVIL_HOME"
    mkdir -p "$ANVIL_HOME"
    cat > "$ANVIL_HOME/package.json" <<'JSON'
{"name": "modelhub-anvil", "private": true}
JSON
    (cd "$ANVIL_HOME" && npm install --no-audit --no-fund --loglevel=error \
      "@foundry-rs/anvil-linux-amd64@$ANVIL_VERSION" >&2)
    chmod +x "$ANVIL_BIN"
    "$ANVIL_BIN" --version >&2
    echo "$ANVIL_VERSION" > "$ANVIL_HOME/.modelhub-version"
  ) 9>"$ROOT/.cache/anvil.lock"
}

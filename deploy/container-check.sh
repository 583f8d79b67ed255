#!/usr/bin/env bash
# Build deploy/Dockerfile with podman and run the image against the simulator: the container
# check that a machine without a Docker engine (and without Docker Hub) can still make.
#
#   sudo deploy/container-check.sh                    # base localhost/bookworm-python:3.11
#   sudo deploy/container-check.sh --base python:3.11-slim-bookworm   # where Docker Hub answers
#   sudo deploy/container-check.sh --make-base        # first make the stand-in base (~3 min)
#   sudo deploy/container-check.sh --build-ca /etc/ssl/certs/ca-certificates.crt
#                                  # behind a TLS-inspecting proxy whose CA this host trusts
#
# The stand-in base (--make-base): Debian bookworm minbase from debootstrap with Debian's
# python3 (3.11.2, in /usr/bin, python-is-python3 for `python`), python3-venv and
# ca-certificates, imported with `podman import` as localhost/bookworm-python:3.11. It is NOT
# python:3.11-slim-bookworm: that one has CPython 3.11.x built from source in /usr/local and a
# newer pip. Figures with the stand-in are the stand-in's.
#
# Steps: `podman build --format docker` (Docker's format keeps the HEALTHCHECK; podman's
# default OCI format drops it) with --build-arg BASE; pip inside the build downloads from PyPI.
# Then, all with --network host and every server on 127.0.0.1 at a free port: the simulator
# (`retrofit-gw simulate`, from the image itself, in a second container), a mosquitto if one is
# installed here, `retrofit-gw check` and `retrofit-gw once` in the image, and `retrofit-gw run`
# the way deploy/compose.yaml runs it (read-only root, no capabilities, no-new-privileges) with
# the production example turned towards the simulator mounted over
# /etc/retrofit-gateway/gateway.yaml and a named volume on /var/lib/retrofit-gateway. Checked:
# the user is retrofit-gw, the image's HEALTHCHECK passes (`podman healthcheck run`), /healthz
# answers from the host, RSS of the gateway process after --steady seconds, and SIGTERM
# (`podman stop`) ends it with exit code 0. Containers, volume, simulator and mosquitto are
# removed afterwards; the image stays (podman rmi retrofit-gateway:check).
#
# Needs root and podman (Debian: apt-get install podman; --make-base also debootstrap).
# PODMAN_OPTS adds global podman options, e.g. PODMAN_OPTS="--storage-driver vfs
# --cgroup-manager cgroupfs --events-backend file" where overlay or systemd are missing.
# Before building, a trial `podman run` of the base finds what this host allows, and the
# build and every container then use that: podman's defaults; else (a host without
# CAP_SYS_RESOURCE, e.g. inside a sandbox) ulimits no higher than this shell's
# (nofile = its hard limit, nproc 4096); else the same with runc instead of crun (crun 1.8
# refuses cgroup v1 hosts with controllers also on the cgroup2 hierarchy, "hybrid mode"). The
# JSON line says which ("runtime", "ulimits").
# Every step has a time limit. The last line printed is one JSON object with the results.
set -euo pipefail

SELF_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CHECKOUT=$(cd "$SELF_DIR/.." && pwd)
BASE=localhost/bookworm-python:3.11
MAKE_BASE=0
BASE_DIR=/var/tmp/ctr-base/rootfs
MIRROR=http://deb.debian.org/debian
TAG=retrofit-gateway:check
STEADY=20
BUILD_CA=""
NO_CACHE=()
HOST_PY=${PYTHON:-python3}

usage() {
  cat <<'EOF'
usage: container-check.sh [--base IMAGE] [--make-base [--base-dir DIR] [--mirror URL]]
                          [--tag TAG] [--no-cache] [--build-ca FILE] [--steady SECONDS]
  --base      the image for the Dockerfile's BASE (default localhost/bookworm-python:3.11)
  --make-base make the stand-in base first: debootstrap bookworm minbase + python3 into
              --base-dir (default /var/tmp/ctr-base/rootfs, made anew), podman import as --base
  --mirror    Debian mirror for --make-base (default http://deb.debian.org/debian)
  --tag       the tag of the built image (default retrofit-gateway:check)
  --no-cache  build every layer anew (a timing of the whole build)
  --steady    seconds the gateway runs before its RSS is read (default 20)
  --build-ca  a CA bundle mounted over the build's /etc/ssl/certs/ca-certificates.crt for its
              RUN steps only (pip to PyPI through a TLS-inspecting proxy; Debian's pip reads
              that file, python:3.11-slim's pip its own certifi); not kept in the image
EOF
}
die() { echo "container-check.sh: $*" >&2; exit 1; }
say() { echo "== $*" >&2; }

while (($#)); do
  case $1 in
    --base) BASE=${2:?}; shift 2 ;;
    --make-base) MAKE_BASE=1; shift ;;
    --base-dir) BASE_DIR=${2:?}; shift 2 ;;
    --mirror) MIRROR=${2:?}; shift 2 ;;
    --tag) TAG=${2:?}; shift 2 ;;
    --steady) STEADY=${2:?}; shift 2 ;;
    --no-cache) NO_CACHE=(--no-cache); shift ;;
    --build-ca) BUILD_CA=$(realpath "${2:?}"); shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; die "unknown argument: $1" ;;
  esac
done
[ "$(id -u)" = 0 ] || die "run as root (rootful podman)"
[ -z "$BUILD_CA" ] || [ -f "$BUILD_CA" ] || die "--build-ca: no file $BUILD_CA"
command -v podman >/dev/null || die "podman missing: apt-get install podman"
# shellcheck disable=SC2206
PODMAN=(podman ${PODMAN_OPTS:-})
pm() { timeout "$1" "${PODMAN[@]}" "${@:2}"; }

secs() { date +%s.%N; }
elapsed() { "$HOST_PY" -c "import sys; print(round(float(sys.argv[2]) - float(sys.argv[1]), 1))" "$1" "$2"; }
free_port() { "$HOST_PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() {
  "$HOST_PY" - "$1" "$2" <<'EOF'
import socket, sys, time
deadline = time.monotonic() + float(sys.argv[2])
while time.monotonic() < deadline:
    with socket.socket() as s:
        if s.connect_ex(("127.0.0.1", int(sys.argv[1]))) == 0:
            sys.exit(0)
    time.sleep(0.2)
sys.exit(f"nothing listens on 127.0.0.1:{sys.argv[1]}")
EOF
}
# GET a URL until it answers 200 (or the time is up); prints the status and the seconds taken.
wait_http() {
  "$HOST_PY" - "$1" "$2" <<'EOF'
import sys, time, urllib.error, urllib.request
t0 = time.monotonic()
status = None
while time.monotonic() - t0 < float(sys.argv[2]):
    try:
        with urllib.request.urlopen(sys.argv[1], timeout=5) as r:
            status = r.status
    except urllib.error.HTTPError as e:
        status = e.code
    except OSError:
        status = None
    if status == 200:
        break
    time.sleep(0.5)
print(status, round(time.monotonic() - t0, 1))
EOF
}

# ---- the stand-in base ------------------------------------------------------------------------
if ((MAKE_BASE)); then
  command -v debootstrap >/dev/null || die "debootstrap missing: apt-get install debootstrap"
  [ "$(dpkg --print-architecture)" = amd64 ] || say "note: the base is $(dpkg --print-architecture)"
  BASE_DIR=$(realpath -m "$BASE_DIR")
  case $BASE_DIR in /|/var|/var/tmp|/usr|/home) die "--base-dir $BASE_DIR: too broad" ;; esac
  say "debootstrap bookworm minbase + python3 into $BASE_DIR"
  rm -rf "$BASE_DIR"
  timeout 1800 debootstrap --variant=minbase \
    --include=python3,python3-venv,python-is-python3,ca-certificates bookworm "$BASE_DIR" "$MIRROR" >&2
  # No package lists or caches in the image.
  rm -rf "$BASE_DIR"/var/cache/apt/archives/*.deb "$BASE_DIR"/var/lib/apt/lists/*
  say "podman import as $BASE"
  tar -C "$BASE_DIR" -c . | pm 600 import - "$BASE" >/dev/null
fi
pm 60 image exists "$BASE" || die "no image $BASE here (--make-base makes the stand-in)"

# ---- what this host lets podman do ------------------------------------------------------------
LIMITS=()
RUNTIME=default
probe() { pm 120 run --rm --network host "${LIMITS[@]}" "$BASE" true 2>&1; }
if ! out=$(probe); then
  say "podman run with podman's defaults failed: $out"
  if [[ $out == *setrlimit* || $out == *rlimit* ]]; then
    LIMITS=(--ulimit "nofile=$(ulimit -Hn):$(ulimit -Hn)" --ulimit nproc=4096:4096)
  fi
  if ! out=$(probe); then
    say "with ${LIMITS[*]:-no ulimits}: $out"
    command -v runc >/dev/null \
      || die "podman cannot run a container here (runc, the last try, is missing: apt-get install runc)"
    PODMAN+=(--runtime runc)
    RUNTIME=runc
    out=$(probe) || die "podman cannot run a container here, even with runc: $out"
  fi
  say "containers run with runtime $RUNTIME, ${LIMITS[*]:-default ulimits}"
fi

# ---- build ------------------------------------------------------------------------------------
WORK=$(mktemp -d /var/tmp/retrofit-ctr-check.XXXXXX)
chmod 755 "$WORK"
ID=$$
SIM=retrofit-ctr-sim-$ID
GW=retrofit-ctr-gw-$ID
VOL=retrofit-ctr-data-$ID
BROKER_PID=""
cleanup() {
  set +e
  timeout 60 "${PODMAN[@]}" rm -f -v -t 5 "$GW" "$SIM" >/dev/null 2>&1
  timeout 60 "${PODMAN[@]}" rm -f -v "$GW-once" >/dev/null 2>&1
  timeout 60 "${PODMAN[@]}" volume rm -f "$VOL" >/dev/null 2>&1
  if [ -n "$BROKER_PID" ]; then kill "$BROKER_PID" 2>/dev/null; wait "$BROKER_PID" 2>/dev/null; fi
  rm -rf "$WORK"
}
trap cleanup EXIT

say "podman build --build-arg BASE=$BASE -f deploy/Dockerfile -t $TAG (log: $WORK/build.log)"
t0=$(secs)
BUILD_OPTS=("${LIMITS[@]}" "${NO_CACHE[@]}")
[ -z "$BUILD_CA" ] || BUILD_OPTS+=(--volume "$BUILD_CA:/etc/ssl/certs/ca-certificates.crt:ro")
if ! pm 1800 build --format docker "${BUILD_OPTS[@]}" --build-arg "BASE=$BASE" \
    -f "$CHECKOUT/deploy/Dockerfile" -t "$TAG" "$CHECKOUT" >"$WORK/build.log" 2>&1; then
  tail -n 40 "$WORK/build.log" >&2
  grep -q CERTIFICATE_VERIFY_FAILED "$WORK/build.log" \
    && say "pip does not trust the proxy's certificate: try --build-ca <this host's CA bundle>"
  die "the build failed"
fi
BUILD_S=$(elapsed "$t0" "$(secs)")
IMAGE_BYTES=$(pm 60 image inspect --format '{{.Size}}' "$TAG")
BASE_BYTES=$(pm 60 image inspect --format '{{.Size}}' "$BASE")
HEALTH_CMD=$(pm 60 image inspect --format '{{json .Config.Healthcheck}}' "$TAG")
case $HEALTH_CMD in *healthz*) ;; *) die "the image has no HEALTHCHECK: $HEALTH_CMD" ;; esac
IMAGE_USER=$(pm 60 image inspect --format '{{.Config.User}}' "$TAG")
PY_VERSION=$(pm 120 run --rm --network host "${LIMITS[@]}" --no-healthcheck --entrypoint python "$TAG" -c \
  'import sys; print(sys.version.split()[0], sys.base_prefix)')
say "built in ${BUILD_S}s: $IMAGE_BYTES bytes (base $BASE_BYTES), user $IMAGE_USER, python $PY_VERSION"

# ---- simulator, broker, config ----------------------------------------------------------------
SIM_PORT=$(free_port)
say "simulator (from the image) on 127.0.0.1:$SIM_PORT"
pm 120 run -d --name "$SIM" --network host "${LIMITS[@]}" --no-healthcheck --entrypoint retrofit-gw "$TAG" \
  simulate --host 127.0.0.1 --port "$SIM_PORT" >/dev/null
wait_port "$SIM_PORT" 120

BROKER_PORT=$(free_port)
BROKER=false
if command -v mosquitto >/dev/null; then
  printf 'listener %s 127.0.0.1\nallow_anonymous true\npersistence false\n' "$BROKER_PORT" >"$WORK/mosquitto.conf"
  mosquitto -c "$WORK/mosquitto.conf" >"$WORK/mosquitto.log" 2>&1 &
  BROKER_PID=$!
  wait_port "$BROKER_PORT" 20
  BROKER=true
fi

# The image's own example, changed only where this machine differs from a shop: the device is
# the simulator, and every listener is on 127.0.0.1 at a free port.
OPCUA_PORT=$(free_port); WEB_PORT=$(free_port)
pm 120 run --rm --network host "${LIMITS[@]}" --no-healthcheck --entrypoint cat "$TAG" \
  /etc/retrofit-gateway/gateway.yaml >"$WORK/example.yaml"
"$HOST_PY" - "$WORK/example.yaml" "$WORK/gateway.yaml" \
  "$SIM_PORT" "$OPCUA_PORT" "$BROKER_PORT" "$WEB_PORT" <<'EOF'
import sys
src, dst, sim, opcua, broker, web = sys.argv[1:]
text = open(src).read()
for old, new in [
    ("host: 192.0.2.10", "host: 127.0.0.1"), ("port: 502\n", f"port: {sim}\n"),
    ("host: 0.0.0.0 ", "host: 127.0.0.1 "), ("port: 4840\n", f"port: {opcua}\n"),
    ("port: 1883\n", f"port: {broker}\n"), ("port: 8080\n", f"port: {web}\n"),
]:
    assert old in text, f"{old!r} not in the image's example"
    text = text.replace(old, new, 1)
open(dst, "w").write(text)
EOF
# The test broker takes anyone; the file must still exist and be the service user's.
echo unused >"$WORK/mqtt-password"
SVC_UID=$(pm 120 run --rm --network host "${LIMITS[@]}" --no-healthcheck --entrypoint id "$TAG" -u)
SVC_GID=$(pm 120 run --rm --network host "${LIMITS[@]}" --no-healthcheck --entrypoint id "$TAG" -g)
chown "$SVC_UID:$SVC_GID" "$WORK/gateway.yaml" "$WORK/mqtt-password"
chmod 600 "$WORK/mqtt-password"
pm 60 volume create "$VOL" >/dev/null
RUN_ARGS=("${LIMITS[@]}" --network host --read-only --cap-drop ALL --security-opt no-new-privileges
  -v "$WORK/gateway.yaml:/etc/retrofit-gateway/gateway.yaml:ro"
  -v "$WORK/mqtt-password:/etc/retrofit-gateway/mqtt-password:ro"
  -v "$VOL:/var/lib/retrofit-gateway"
  -e "RETROFIT_GW_HEALTHZ=http://127.0.0.1:$WEB_PORT/healthz")

say "retrofit-gw check and once, in the image"
pm 300 run --rm "${RUN_ARGS[@]}" --no-healthcheck "$TAG" check /etc/retrofit-gateway/gateway.yaml >"$WORK/check.txt"
t0=$(secs)
pm 300 run --rm --name "$GW-once" "${RUN_ARGS[@]}" --no-healthcheck "$TAG" \
  once --json /etc/retrofit-gateway/gateway.yaml | tee "$WORK/once.txt" >&2
ONCE_S=$(elapsed "$t0" "$(secs)")
ONCE_GOOD=$(grep -c '"quality": "good"' "$WORK/once.txt" || true)
ONCE_ROWS=$(grep -c '^{' "$WORK/once.txt" || true)
[ "$ONCE_GOOD" -gt 0 ] || die "retrofit-gw once read no good value"

# ---- run --------------------------------------------------------------------------------------
say "retrofit-gw run in $GW (page on 127.0.0.1:$WEB_PORT, OPC UA on 127.0.0.1:$OPCUA_PORT)"
t0=$(secs)
[ -d /run/systemd/system ] || say "no systemd here: podman logs errors about healthcheck timers," \
  "its periodic checks do not run; the check below runs the HEALTHCHECK by hand"
pm 120 run -d --name "$GW" "${RUN_ARGS[@]}" "$TAG" >/dev/null
read -r HEALTHZ HEALTHZ_S < <(wait_http "http://127.0.0.1:$WEB_PORT/healthz" 300)
if [ "$HEALTHZ" != 200 ]; then
  timeout 30 "${PODMAN[@]}" logs --tail 40 "$GW" >&2 || true
  die "/healthz answered $HEALTHZ after ${HEALTHZ_S}s"
fi
say "/healthz 200 after ${HEALTHZ_S}s"
PID=$(pm 60 inspect --format '{{.State.Pid}}' "$GW")
CMDLINE=$(tr '\0' ' ' <"/proc/$PID/cmdline")
case $CMDLINE in *retrofit-gw*run*) ;; *) die "pid $PID is not the gateway: $CMDLINE" ;; esac
EXEC_USER=$(pm 60 exec "$GW" id -un)
PROC_UID=$(awk '/^Uid:/ {print $2}' "/proc/$PID/status")
if [ "$EXEC_USER" != retrofit-gw ] || [ "$PROC_UID" != "$SVC_UID" ]; then
  die "not the service user: exec $EXEC_USER, uid $PROC_UID (retrofit-gw is $SVC_UID)"
fi
# The image's HEALTHCHECK, run by podman as its timer would (podman exec of the command).
if pm 60 healthcheck run "$GW" >"$WORK/health.txt" 2>&1; then HEALTHCHECK=healthy; else
  HEALTHCHECK="failed: $(tr '\n' ' ' <"$WORK/health.txt")"; fi
say "healthcheck: $HEALTHCHECK"
say "running ${STEADY}s before reading RSS"
sleep "$STEADY"
RSS_KB=$(awk '/^VmRSS:/ {print $2}' "/proc/$PID/status")
HWM_KB=$(awk '/^VmHWM:/ {print $2}' "/proc/$PID/status")
read -r HEALTHZ_LATE _ < <(wait_http "http://127.0.0.1:$WEB_PORT/healthz" 10)
RESTARTS=$(pm 60 inspect --format '{{.RestartCount}}' "$GW")

say "podman stop (SIGTERM, 30 s before SIGKILL)"
t0=$(secs)
pm 120 stop -t 30 "$GW" >/dev/null
STOP_S=$(elapsed "$t0" "$(secs)")
EXIT_CODE=$(pm 60 inspect --format '{{.State.ExitCode}}' "$GW")
timeout 30 "${PODMAN[@]}" logs "$GW" >"$WORK/run.log" 2>&1 || true
TRACEBACKS=$(grep -c Traceback "$WORK/run.log" || true)
if [ "$EXIT_CODE" != 0 ]; then tail -n 30 "$WORK/run.log" >&2; fi

HOST_INFO="$(uname -m), $(nproc) cores, podman $(podman --version | awk '{print $3}'), $(pm 60 info --format '{{.Store.GraphDriverName}}')"
ULIMITS="${LIMITS[*]:-podman defaults}"
export BASE PY_VERSION HOST_INFO EXEC_USER HEALTHCHECK RUNTIME ULIMITS
# Strings through the environment (a failed healthcheck's text may hold quotes), numbers inline.
"$HOST_PY" - <<EOF
import json, os
e = os.environ
print(json.dumps({
    "bench": "container-check", "base": e["BASE"], "python": e["PY_VERSION"],
    "host": e["HOST_INFO"], "runtime": e["RUNTIME"], "ulimits": e["ULIMITS"],
    "build_s": $BUILD_S, "image_mb": round($IMAGE_BYTES / 1e6, 1),
    "base_mb": round($BASE_BYTES / 1e6, 1), "user": e["EXEC_USER"], "uid": $PROC_UID,
    "once_s": $ONCE_S, "once_good_rows": $ONCE_GOOD, "once_rows": $ONCE_ROWS,
    "broker": $( [ "$BROKER" = true ] && echo True || echo False ),
    "healthz_first_200_s": $HEALTHZ_S, "healthcheck": e["HEALTHCHECK"],
    "healthz_after_steady": ${HEALTHZ_LATE:-None}, "steady_s": $STEADY,
    "rss_mb": round($RSS_KB / 1024, 1), "rss_peak_mb": round($HWM_KB / 1024, 1),
    "restarts": $RESTARTS, "stop_s": $STOP_S, "exit_code": $EXIT_CODE,
    "tracebacks": $TRACEBACKS,
}))
EOF
[ "$EXIT_CODE" = 0 ] || die "the gateway exited with $EXIT_CODE on SIGTERM"

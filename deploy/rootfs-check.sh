#!/usr/bin/env bash
# Prove the install where it will live: build a Debian bookworm root filesystem for the edge
# box's architecture (arm64 by default, run under qemu-user-static), install the gateway into
# it from an offline wheelhouse bundle with the bundle's own install.sh, exactly as a
# technician does from a USB stick, then run `retrofit-gw check` and `retrofit-gw once`
# against the simulator and measure start-up time and memory of `retrofit-gw run`.
#
#   sudo deploy/rootfs-check.sh                       # arm64, emulated: ~25 min the first time
#   sudo deploy/rootfs-check.sh --arch amd64          # native, the same steps: the baseline
#   sudo deploy/rootfs-check.sh --arch armhf          # 32-bit (armv7l), emulated; the bundle's
#                                                     # PyYAML and cffi wheels are built here by
#                                                     # make-wheelhouse.sh --build-missing
#   sudo deploy/rootfs-check.sh --boot                # also boot the rootfs with systemd-nspawn
#                                                     # and run the unit under a real systemd
#
# Needs root and, from Debian's packages: debootstrap, qemu-user-static (foreign arches),
# systemd-container (--boot), python3; mosquitto is used when present. Downloads Debian
# packages (deb.debian.org or --mirror) and the bundle's wheels (PyPI) on this machine;
# inside the rootfs nothing is downloaded: pip runs with --no-index.
#
# The rootfs is kept in --dir and reused by the next run (--fresh builds it anew). Every server
# binds 127.0.0.1 of this machine (the rootfs shares its network); the ports are free ones.
#
# Figures under emulation are qemu-user figures: every instruction is translated, and the
# process's RSS includes the emulator and its translation cache. They say "it runs, and
# roughly how heavy", never what a Raspberry Pi measures. The last line printed is one JSON
# object with the results (also written to <dir>.json).
set -euo pipefail

SELF_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CHECKOUT=$(cd "$SELF_DIR/.." && pwd)
ARCH=arm64
DIR=""
MIRROR=http://deb.debian.org/debian
BUNDLE=""
FRESH=0
BOOT=0
WITH_BROKER=""
STEADY=30
HOST_PY=${PYTHON:-python3}

usage() {
  cat <<'EOF'
usage: rootfs-check.sh [--arch arm64|armhf|amd64] [--dir DIR] [--mirror URL] [--bundle DIR]
                       [--fresh] [--boot [--with-broker]] [--steady SECONDS]
  --arch      Debian architecture of the rootfs (default arm64)
  --dir       where the rootfs lives (default /var/tmp/retrofit-rootfs-<arch>)
  --mirror    Debian mirror for debootstrap (default http://deb.debian.org/debian)
  --bundle    an offline bundle made by make-wheelhouse.sh for this arch (default: made now)
  --fresh     build the rootfs anew even if DIR holds one
  --boot      afterwards boot the rootfs with systemd-nspawn and check the unit under systemd:
              READY, watchdog, reload, a refused bad reload, stop
  --with-broker with --boot: install.sh --with-broker inside the booted rootfs (mosquitto
              from Debian on 127.0.0.1:1883, which must be free here) and publish to it
  --steady    seconds of polling after READY over which CPU and RSS are measured (default 30)
EOF
}
die() { echo "rootfs-check.sh: $*" >&2; exit 1; }
say() { echo "== $*"; }

while (($#)); do
  case $1 in
    --arch) ARCH=${2:?}; shift 2 ;;
    --dir) DIR=${2:?}; shift 2 ;;
    --mirror) MIRROR=${2:?}; shift 2 ;;
    --bundle) BUNDLE=${2:?}; shift 2 ;;
    --fresh) FRESH=1; shift ;;
    --boot) BOOT=1; shift ;;
    --with-broker) WITH_BROKER=--with-broker; shift ;;
    --steady) STEADY=${2:?}; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; die "unknown argument: $1" ;;
  esac
done
case $ARCH in
  arm64) PYARCH=aarch64; QEMU=aarch64 ;;
  armhf) PYARCH=armv7l; QEMU=arm ;;
  amd64) PYARCH=x86_64; QEMU="" ;;
  *) die "unsupported --arch $ARCH: arm64, armhf or amd64" ;;
esac
[ -n "$WITH_BROKER" ] && ! ((BOOT)) && die "--with-broker goes with --boot"
DIR=${DIR:-/var/tmp/retrofit-rootfs-$ARCH}
DIR=$(realpath -m "$DIR")
[ "$(id -u)" = 0 ] || die "run as root (debootstrap, chroot and mounts need it)"
command -v debootstrap >/dev/null || die "debootstrap missing: apt-get install debootstrap"
HOST_DEB_ARCH=$(dpkg --print-architecture)
EMULATED=False
if [ "$ARCH" != "$HOST_DEB_ARCH" ]; then
  EMULATED=True
  [ -n "$QEMU" ] || die "cannot run $ARCH on $HOST_DEB_ARCH"
  command -v "qemu-$QEMU-static" >/dev/null \
    || die "qemu-user-static missing: apt-get install qemu-user-static"
  # The kernel runs foreign binaries through binfmt_misc; containers often lack the mount
  # or the registration that the package's postinst would have made.
  if [ ! -e /proc/sys/fs/binfmt_misc/register ]; then
    mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc \
      || die "cannot mount binfmt_misc (a container without CAP_SYS_ADMIN?)"
  fi
  if [ ! -e "/proc/sys/fs/binfmt_misc/qemu-$QEMU" ]; then
    [ -f "/usr/lib/binfmt.d/qemu-$QEMU.conf" ] || die "no /usr/lib/binfmt.d/qemu-$QEMU.conf"
    say "registering qemu-$QEMU with binfmt_misc"
    cat "/usr/lib/binfmt.d/qemu-$QEMU.conf" >/proc/sys/fs/binfmt_misc/register
  fi
fi

secs() { date +%s.%N; }
elapsed() { "$HOST_PY" -c "import sys; print(round(float(sys.argv[2]) - float(sys.argv[1]), 1))" "$1" "$2"; }

# ---- the root filesystem ----------------------------------------------------------------------
DEBOOTSTRAP_S=None
if ((FRESH)) || [ ! -f "$DIR/.retrofit-rootfs-ok" ]; then
  rm -rf "$DIR"
  say "debootstrap bookworm $ARCH into $DIR (from $MIRROR)"
  t0=$(secs)
  # minbase + what a Raspberry Pi OS Lite image has that the install needs: python3 with venv,
  # CA certificates, systemd (the unit, and --boot), procps.
  debootstrap --arch="$ARCH" --variant=minbase \
    --include=python3,python3-venv,ca-certificates,systemd,systemd-sysv,dbus,procps \
    bookworm "$DIR" "$MIRROR"
  DEBOOTSTRAP_S=$(elapsed "$t0" "$(secs)")
  touch "$DIR/.retrofit-rootfs-ok"
else
  say "reusing the rootfs in $DIR (--fresh builds it anew)"
fi

# ---- the offline bundle -----------------------------------------------------------------------
WORK=$(mktemp -d /var/tmp/retrofit-rootfs-work.XXXXXX)
# Whatever runs inside the rootfs (simulator, gateways) is found by its root directory: the
# wrappers (unshare, chroot, setpriv) are not always the processes a signal must reach.
inside_pids() {
  local p
  for p in /proc/[0-9]*; do
    [ "$(readlink "$p/root" 2>/dev/null)" = "$DIR" ] && echo "${p#/proc/}"
  done
  return 0
}
cleanup() {
  local pids i
  [ -n "${BROKER_PID:-}" ] && kill "$BROKER_PID" 2>/dev/null
  for i in 1 2 3 4 5 6 7 8 9 10; do
    pids=$(inside_pids)
    [ -z "$pids" ] && break
    # shellcheck disable=SC2086
    if ((i < 10)); then kill $pids 2>/dev/null; sleep 1; else kill -9 $pids 2>/dev/null; fi
  done
  wait 2>/dev/null
  rm -rf "$WORK"
}
trap cleanup EXIT
if [ -z "$BUNDLE" ]; then
  say "making the $PYARCH wheelhouse bundle"
  # PyPI has no armv7l wheels of some dependencies: those are built on this machine, in an
  # armhf rootfs of their own (make-wheelhouse.sh --build-missing).
  WH_EXTRA=()
  [ "$PYARCH" = armv7l ] && WH_EXTRA=(--build-missing)
  bash "$SELF_DIR/make-wheelhouse.sh" --arch "$PYARCH" "${WH_EXTRA[@]}" --out "$WORK/wh"
  BUNDLE=$(find "$WORK/wh" -mindepth 1 -maxdepth 1 -type d -name "retrofit-gateway-*-$PYARCH" | head -n 1)
fi
[ -x "$BUNDLE/install.sh" ] || die "not a bundle (no install.sh): $BUNDLE"
rm -rf "$DIR/root/bundle"
cp -a "$BUNDLE" "$DIR/root/bundle"

# Each chroot runs in its own mount namespace: the bind mounts vanish with it, even on failure.
in_root() {
  unshare --mount --propagation private -- bash -c '
    set -e
    root=$1; shift
    mount -t proc proc "$root/proc"
    mount --rbind /sys "$root/sys"
    mount --rbind /dev "$root/dev"
    mount -t tmpfs tmpfs "$root/run"
    mkdir -p "$root/run/retrofit-notify"
    mount --bind "$NOTIFY_HOST_DIR" "$root/run/retrofit-notify"
    exec chroot "$root" /usr/bin/env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
      HOME=/root LANG=C.UTF-8 ${NOTIFY_SOCKET:+NOTIFY_SOCKET=$NOTIFY_SOCKET} "$@"
  ' in_root "$DIR" "$@"
}
export NOTIFY_HOST_DIR=$WORK/notify
mkdir -p "$NOTIFY_HOST_DIR"
# Logs of the runs stay beside the rootfs for a look afterwards.
export LOG_DIR=$DIR.logs
rm -rf "$LOG_DIR"; mkdir -p "$LOG_DIR"

say "inside: $(in_root uname -m), $(in_root python3 -V)"
say "install.sh from the bundle (offline: pip --no-index)"
t0=$(secs)
in_root bash /root/bundle/install.sh
INSTALL_S=$(elapsed "$t0" "$(secs)")
GW=/opt/retrofit-gateway/current/bin/retrofit-gw
in_root "$GW" --version

# ---- check, once, run against the simulator ---------------------------------------------------
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
SIM_PORT=$(free_port)
say "simulator (inside the rootfs) on 127.0.0.1:$SIM_PORT"
in_root "$GW" simulate --host 127.0.0.1 --port "$SIM_PORT" >"$LOG_DIR/simulator.log" 2>&1 &
wait_port "$SIM_PORT" 180

BROKER_PORT=$(free_port)
if command -v mosquitto >/dev/null; then
  printf 'listener %s 127.0.0.1\nallow_anonymous true\npersistence false\n' "$BROKER_PORT" >"$WORK/mosquitto.conf"
  mosquitto -c "$WORK/mosquitto.conf" >"$LOG_DIR/mosquitto.log" 2>&1 &
  BROKER_PID=$!
  wait_port "$BROKER_PORT" 20
  BROKER=true
else
  BROKER=false
fi

# The installed example, changed only where this machine differs from a shop: the device is
# the simulator, and every listener is on 127.0.0.1 at a free port.
OPCUA_PORT=$(free_port); WEB_PORT=$(free_port)
"$HOST_PY" - "$DIR/etc/retrofit-gateway/gateway.yaml" "$DIR/etc/retrofit-gateway/local.yaml" \
  "$SIM_PORT" "$OPCUA_PORT" "$BROKER_PORT" "$WEB_PORT" <<'EOF'
import sys
src, dst, sim, opcua, broker, web = sys.argv[1:]
text = open(src).read()
for old, new in [
    ("host: 192.0.2.10", "host: 127.0.0.1"), ("port: 502\n", f"port: {sim}\n"),
    ("host: 0.0.0.0 ", "host: 127.0.0.1 "), ("port: 4840\n", f"port: {opcua}\n"),
    ("port: 1883\n", f"port: {broker}\n"), ("port: 8080\n", f"port: {web}\n"),
]:
    assert old in text, f"{old!r} not in the installed example"
    text = text.replace(old, new, 1)
open(dst, "w").write(text)
EOF
# install.sh without --with-broker writes no MQTT password; the test broker takes anyone.
[ -f "$DIR/etc/retrofit-gateway/mqtt-password" ] || echo unused >"$DIR/etc/retrofit-gateway/mqtt-password"
in_root chown -R retrofit-gw:retrofit-gw /etc/retrofit-gateway/local.yaml /etc/retrofit-gateway/mqtt-password

as_svc() { in_root setpriv --reuid retrofit-gw --regid retrofit-gw --init-groups "$@"; }
say "retrofit-gw check (the installed example, then the local copy)"
as_svc "$GW" check /etc/retrofit-gateway/gateway.yaml
t0=$(secs)
as_svc "$GW" check /etc/retrofit-gateway/local.yaml
CHECK_S=$(elapsed "$t0" "$(secs)")
say "retrofit-gw once"
t0=$(secs)
as_svc "$GW" once /etc/retrofit-gateway/local.yaml | tee "$WORK/once.txt"
ONCE_S=$(elapsed "$t0" "$(secs)")
ONCE_GOOD=$(grep -cw good "$WORK/once.txt" || true)

# `run` twice: the first start makes the OPC UA certificate (an RSA key), the second reuses it.
# READY=1 comes over NOTIFY_SOCKET as under systemd; the sender's pid (SCM_CREDENTIALS) is
# the process whose memory is read.
measure_run() {
  "$HOST_PY" - "$NOTIFY_HOST_DIR/notify.sock" "$1" "$STEADY" "$WEB_PORT" -- "$@" <<'EOF'
import json, os, signal, socket, struct, subprocess, sys, time, urllib.request
sock_path, label, steady, web = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
cmd = sys.argv[sys.argv.index("--") + 2:]
if os.path.exists(sock_path):
    os.unlink(sock_path)
srv = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
srv.bind(sock_path)
os.chmod(sock_path, 0o777)
srv.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
env = dict(os.environ, NOTIFY_SOCKET="/run/retrofit-notify/notify.sock")
t0 = time.monotonic()
proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=open(f"{os.environ['LOG_DIR']}/run-{label}.log", "w"))
pid, ready_s = None, None
srv.settimeout(1.0)
try:
    while ready_s is None and time.monotonic() - t0 < 600 and proc.poll() is None:
        try:
            msg, anc, _, _ = srv.recvmsg(4096, socket.CMSG_SPACE(12))
        except TimeoutError:
            continue
        for level, kind, data in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid = struct.unpack("3i", data[:12])[0]
        if b"READY=1" in msg.split(b"\n"):
            ready_s = time.monotonic() - t0
    if ready_s is None:
        sys.exit(f"no READY=1 from {label} (exit {proc.poll()})")
    def status():
        fields = {}
        for line in open(f"/proc/{pid}/status"):
            k, _, v = line.partition(":")
            fields[k] = v.split()
        return int(fields["VmRSS"][0]) / 1024, int(fields["VmHWM"][0]) / 1024
    def cpu():
        parts = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        return (int(parts[11]) + int(parts[12])) / os.sysconf("SC_CLK_TCK")
    rss_ready, _ = status()
    c0, w0 = cpu(), time.monotonic()
    time.sleep(steady)
    c1, w1 = cpu(), time.monotonic()
    rss_steady, hwm = status()
    with urllib.request.urlopen(f"http://127.0.0.1:{web}/healthz", timeout=30) as r:
        health = r.status
    print(json.dumps({
        f"{label}_ready_s": round(ready_s, 1),
        f"{label}_rss_ready_mb": round(rss_ready, 1),
        f"{label}_rss_steady_mb": round(rss_steady, 1),
        f"{label}_rss_peak_mb": round(hwm, 1),
        f"{label}_cpu_pct": round(100 * (c1 - c0) / (w1 - w0), 1),
        f"{label}_healthz": health,
    }))
finally:
    # The wrappers (unshare, chroot, setpriv) do not forward signals: stop the gateway itself,
    # as systemd would.
    try:
        os.kill(pid if pid else proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    srv.close()
EOF
}
export -f in_root
export DIR
say "retrofit-gw run: first start (makes the OPC UA certificate), ${STEADY}s of polling"
RUN1=$(measure_run first bash -c 'in_root setpriv --reuid retrofit-gw --regid retrofit-gw --init-groups "$@"' _ \
  "$GW" run /etc/retrofit-gateway/local.yaml)
echo "$RUN1"
say "retrofit-gw run: second start, ${STEADY}s of polling"
RUN2=$(measure_run second bash -c 'in_root setpriv --reuid retrofit-gw --regid retrofit-gw --init-groups "$@"' _ \
  "$GW" run /etc/retrofit-gateway/local.yaml)
echo "$RUN2"

BOOT_JSON='{}'
if ((BOOT)); then
  say "booting the rootfs with systemd-nspawn: the unit under systemd"
  BOOT_JSON=$(bash "$SELF_DIR/rootfs-boot.sh" "$DIR" $WITH_BROKER)
fi

"$HOST_PY" - "$DIR.json" <<EOF
import json, sys
out = {
    "bench": "rootfs-check", "arch": "$ARCH", "emulated": $EMULATED,
    "host": "$(uname -m), $(nproc) cores", "debootstrap_s": $DEBOOTSTRAP_S,
    "install_s": $INSTALL_S, "check_s": $CHECK_S, "once_s": $ONCE_S, "once_good_rows": $ONCE_GOOD,
    "broker": $( [ "$BROKER" = true ] && echo True || echo False ), "steady_s": $STEADY,
}
out.update(json.loads('''$RUN1'''))
out.update(json.loads('''$RUN2'''))
out.update(json.loads('''$BOOT_JSON'''))
line = json.dumps(out)
open(sys.argv[1], "w").write(line + "\n")
print(line)
EOF

#!/usr/bin/env bash
# Install, upgrade or roll back retrofit-gateway on a Debian / Raspberry Pi OS box, as root.
#
#   sudo deploy/install.sh                          # from this checkout (needs PyPI or a pip mirror)
#   sudo deploy/install.sh --wheelhouse /media/usb/retrofit-wheelhouse   # offline (make-wheelhouse.sh)
#   sudo deploy/install.sh --rollback               # back to the previous release
#   sudo deploy/install.sh --with-broker            # also mosquitto on 127.0.0.1:1883 with a password
#
# Idempotent: run it again to upgrade. Every install is a new venv in
# <prefix>/releases/<version>-<timestamp>; <prefix>/current points at the one in use and
# <prefix>/previous at the one before (older ones are removed). The config
# (/etc/retrofit-gateway/gateway.yaml) is written from the production example only when absent,
# never overwritten. Data: /var/lib/retrofit-gateway (service user, 0700). Logs: journald
# (journalctl -u retrofit-gateway), nothing to configure.
#
# Paths can be moved for tests (nothing outside them is touched with --no-create-user and no
# systemd): --prefix (/opt/retrofit-gateway), --etc (/etc/retrofit-gateway),
# --var (/var/lib/retrofit-gateway), --unit-dir (/etc/systemd/system).
set -euo pipefail

SELF_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PREFIX=/opt/retrofit-gateway
ETC=/etc/retrofit-gateway
VAR=/var/lib/retrofit-gateway
UNIT_DIR=/etc/systemd/system
MOSQUITTO_DIR=/etc/mosquitto
SVC_USER=retrofit-gw
CREATE_USER=1
FROM_CHECKOUT=""
WHEELHOUSE=""
ROLLBACK=0
WITH_BROKER=0
DRY_RUN=0
PY=${PYTHON:-python3}
UNIT=retrofit-gateway.service

usage() {
  cat <<'EOF'
usage: install.sh [--from-checkout DIR | --wheelhouse DIR | --rollback] [--with-broker]
                  [--prefix DIR] [--etc DIR] [--var DIR] [--unit-dir DIR]
                  [--user NAME] [--no-create-user] [--dry-run]
  --from-checkout DIR  install the gateway from this source tree (default: the checkout
                       this script is in); pip fetches the dependencies
  --wheelhouse DIR     install offline from a bundle made by deploy/make-wheelhouse.sh
                       (pip --no-index --find-links DIR)
  --rollback           point current back at the previous release and restart the service
  --with-broker        install mosquitto (apt) listening on 127.0.0.1:1883 only, with a
                       password for user "gateway" (written to <etc>/mqtt-password)
  --prefix DIR         releases and the current link (default /opt/retrofit-gateway)
  --etc DIR            config directory (default /etc/retrofit-gateway)
  --var DIR            data directory, the config's gateway.data_dir (default /var/lib/retrofit-gateway)
  --unit-dir DIR       where the systemd unit goes (default /etc/systemd/system)
  --user NAME          service user (default retrofit-gw)
  --no-create-user     the user must exist already (tests use root)
  --dry-run            print what would be done, change nothing
EOF
}

die() { echo "install.sh: $*" >&2; exit 1; }
say() { echo "== $*"; }

while (($#)); do
  case $1 in
    --from-checkout) FROM_CHECKOUT=${2:?}; shift 2 ;;
    --wheelhouse) WHEELHOUSE=${2:?}; shift 2 ;;
    --rollback) ROLLBACK=1; shift ;;
    --with-broker) WITH_BROKER=1; shift ;;
    --prefix) PREFIX=${2:?}; shift 2 ;;
    --etc) ETC=${2:?}; shift 2 ;;
    --var) VAR=${2:?}; shift 2 ;;
    --unit-dir) UNIT_DIR=${2:?}; shift 2 ;;
    --user) SVC_USER=${2:?}; shift 2 ;;
    --no-create-user) CREATE_USER=0; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; die "unknown argument: $1" ;;
  esac
done
[ -n "$FROM_CHECKOUT" ] && [ -n "$WHEELHOUSE" ] && die "--from-checkout and --wheelhouse exclude each other"
((ROLLBACK)) && { [ -n "$FROM_CHECKOUT" ] || [ -n "$WHEELHOUSE" ]; } && die "--rollback installs nothing"
if [ -z "$WHEELHOUSE" ] && [ -z "$FROM_CHECKOUT" ] && ! ((ROLLBACK)); then
  # In a bundle from make-wheelhouse.sh the wheels sit beside this script; in a checkout, the
  # project is one level up.
  if [ -d "$SELF_DIR/wheels" ]; then WHEELHOUSE=$SELF_DIR/wheels; else FROM_CHECKOUT=$(cd "$SELF_DIR/.." && pwd); fi
fi
for v in PREFIX ETC VAR UNIT_DIR; do
  case ${!v} in /*) ;; *) die "--${v,,} must be an absolute path: ${!v}" ;; esac
done

# Every change goes through run (or is guarded by DRY_RUN), so --dry-run prints it instead.
run() {
  if ((DRY_RUN)); then printf '+'; printf ' %q' "$@"; printf '\n'; else "$@"; fi
}
# write_file MODE DEST: stdin to DEST, atomically.
write_file() {
  local mode=$1 dest=$2
  if ((DRY_RUN)); then echo "+ write $dest (mode $mode)"; cat >/dev/null; return; fi
  local tmp
  tmp=$(mktemp "$dest.XXXXXX")
  cat >"$tmp"
  chmod "$mode" "$tmp"
  mv -f "$tmp" "$dest"
}
systemd_running() { [ -d /run/systemd/system ]; }
is_root() { [ "$(id -u)" = 0 ]; }

if ! is_root && ! ((DRY_RUN)); then
  die "run as root (sudo deploy/install.sh ...), or with --dry-run to see what it would do"
fi

# ---- the service user -------------------------------------------------------------------------
ensure_user() {
  if getent passwd "$SVC_USER" >/dev/null; then
    say "user $SVC_USER exists"
  elif ((CREATE_USER)); then
    say "creating system user $SVC_USER"
    run useradd --system --user-group --home-dir "$VAR" --no-create-home \
      --shell /usr/sbin/nologin --comment "retrofit-gateway service" "$SVC_USER"
  else
    die "user $SVC_USER does not exist (--no-create-user)"
  fi
  if ((CREATE_USER)) && getent group dialout >/dev/null; then
    # Serial ports (/dev/ttyUSB*, ttyACM*, ttyAMA*) are root:dialout 0660.
    run usermod -a -G dialout "$SVC_USER"
  fi
}
svc_group() {
  if getent passwd "$SVC_USER" >/dev/null; then id -gn "$SVC_USER"; else echo "$SVC_USER"; fi
}

# ---- releases ---------------------------------------------------------------------------------
link_target() { [ -L "$1" ] && readlink "$1"; }
# set_link NAME TARGET: <prefix>/NAME -> TARGET, atomically (rename over the old link).
set_link() {
  run ln -sfn "$2" "$PREFIX/.$1.new"
  run mv -T "$PREFIX/.$1.new" "$PREFIX/$1"
}

version_of_checkout() {
  sed -n 's/^__version__ = "\(.*\)"$/\1/p' "$1/gateway/__init__.py"
}
version_of_wheelhouse() {
  local whl
  whl=$(find "$1" -maxdepth 1 -name 'retrofit_gateway-*.whl' | sort -V | tail -n 1)
  [ -n "$whl" ] || die "no retrofit_gateway-*.whl in $1 (made by deploy/make-wheelhouse.sh?)"
  basename "$whl" | cut -d- -f2
}

check_python() {
  command -v "$PY" >/dev/null || die "$PY not found (apt-get install python3)"
  "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || die "$PY is $("$PY" -V 2>&1); the gateway needs Python 3.11 or newer"
  if ! "$PY" -c 'import ensurepip, venv' 2>/dev/null; then
    say "python3-venv is missing: installing it"
    run apt-get install -y -qq python3-venv \
      || die "python3-venv is missing and apt-get could not install it (offline? install python3-venv from the OS image's packages first)"
  fi
}

install_release() {
  local version stamp rel
  if [ -n "$WHEELHOUSE" ]; then
    [ -d "$WHEELHOUSE" ] || die "no such wheelhouse: $WHEELHOUSE"
    WHEELHOUSE=$(cd "$WHEELHOUSE" && pwd)
    version=$(version_of_wheelhouse "$WHEELHOUSE")
  else
    [ -f "$FROM_CHECKOUT/pyproject.toml" ] || die "not a checkout of retrofit-gateway: $FROM_CHECKOUT"
    FROM_CHECKOUT=$(cd "$FROM_CHECKOUT" && pwd)
    version=$(version_of_checkout "$FROM_CHECKOUT")
  fi
  [ -n "$version" ] || die "could not tell the version to install"
  stamp=$(date -u +%Y%m%dT%H%M%SZ)
  rel="$version-$stamp"
  local n=1
  while [ -e "$PREFIX/releases/$rel" ]; do rel="$version-$stamp-$n"; n=$((n + 1)); done
  NEW_RELEASE="$PREFIX/releases/$rel"

  say "installing $version into $NEW_RELEASE"
  run mkdir -p "$PREFIX/releases"
  run chmod 0755 "$PREFIX" "$PREFIX/releases"
  # A failed install leaves no half-made release behind.
  trap 'rm -rf "$NEW_RELEASE"' ERR
  run "$PY" -m venv "$NEW_RELEASE"
  if [ -n "$WHEELHOUSE" ]; then
    run "$NEW_RELEASE/bin/python" -m pip install -q --no-index --find-links "$WHEELHOUSE" \
      "retrofit-gateway==$version"
  else
    run "$NEW_RELEASE/bin/python" -m pip install -q "$FROM_CHECKOUT"
  fi
  trap - ERR
}

prune_releases() {
  # Keep current and previous; everything older only fills the SD card.
  local cur prev d
  cur=$(link_target "$PREFIX/current" || true)
  prev=$(link_target "$PREFIX/previous" || true)
  [ -d "$PREFIX/releases" ] || return 0
  for d in "$PREFIX"/releases/*; do
    [ -d "$d" ] || continue
    case $d in "$cur" | "$prev") continue ;; esac
    say "removing old release $d"
    run rm -rf "$d"
  done
}

# ---- config, data, unit -----------------------------------------------------------------------
install_config() {
  local group example
  group=$(svc_group)
  run mkdir -p "$ETC"
  run chown "root:$group" "$ETC"
  run chmod 0750 "$ETC"
  if [ -e "$ETC/gateway.yaml" ]; then
    say "$ETC/gateway.yaml exists: kept as it is"
    return
  fi
  example="$PREFIX/current/share/retrofit-gateway/config/production.example.yaml"
  ((DRY_RUN)) && [ ! -f "$example" ] && example="$SELF_DIR/../config/production.example.yaml"
  [ -f "$example" ] || die "the installed release has no $example"
  say "writing $ETC/gateway.yaml from the production example (data_dir: $VAR)"
  sed "s#^\([[:space:]]*data_dir:\).*#\1 $VAR#" "$example" | write_file 0640 "$ETC/gateway.yaml"
  run chown "root:$group" "$ETC/gateway.yaml"
  ((DRY_RUN)) || grep -q "^[[:space:]]*data_dir: $VAR\$" "$ETC/gateway.yaml" \
    || die "could not set data_dir in $ETC/gateway.yaml"
  FIRST_INSTALL=1
}

install_data_dir() {
  run mkdir -p "$VAR"
  run chown "$SVC_USER:$(svc_group)" "$VAR"
  run chmod 0700 "$VAR"
}

install_unit() {
  local src="$SELF_DIR/retrofit-gateway.service"
  [ -f "$src" ] || die "no $src next to this script"
  run mkdir -p "$UNIT_DIR"
  say "installing $UNIT_DIR/$UNIT"
  sed -e "s#/opt/retrofit-gateway#$PREFIX#g" \
    -e "s#/etc/retrofit-gateway#$ETC#g" \
    -e "s#/var/lib/retrofit-gateway#$VAR#g" \
    -e "s#^User=retrofit-gw\$#User=$SVC_USER#" \
    -e "s#^Group=retrofit-gw\$#Group=$(svc_group)#" \
    "$src" | write_file 0644 "$UNIT_DIR/$UNIT"
}

restart_service() {
  # $1: "install" or "rollback"
  if ! systemd_running; then
    say "systemd is not running here (a container or CI): skipped"
    echo "   would run: systemctl daemon-reload; systemctl enable $UNIT; systemctl restart $UNIT (if active)"
    return
  fi
  if [ "$UNIT_DIR" != /etc/systemd/system ]; then
    say "unit installed to $UNIT_DIR, not /etc/systemd/system: not enabling it"
    return
  fi
  run systemctl daemon-reload
  run systemctl enable "$UNIT"
  if systemctl is-active --quiet "$UNIT"; then
    say "restarting $UNIT"
    run systemctl restart "$UNIT"
  else
    say "$UNIT is enabled, not started (it was not running)."
    if [ "$1" = install ] && [ -n "${FIRST_INSTALL:-}" ]; then
      echo "   Edit $ETC/gateway.yaml first (your devices, the REPLACE placeholders)."
    fi
    echo "   Then: systemctl start $UNIT; journalctl -u $UNIT -f"
  fi
}

# ---- mosquitto --------------------------------------------------------------------------------
install_broker() {
  local group pw_file passwd conf
  group=$(svc_group)
  pw_file="$ETC/mqtt-password"
  passwd="$MOSQUITTO_DIR/retrofit-gateway.passwd"
  conf="$MOSQUITTO_DIR/conf.d/retrofit-gateway.conf"
  if ! command -v mosquitto_passwd >/dev/null; then
    say "installing mosquitto"
    run env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends mosquitto
  fi
  if [ ! -s "$pw_file" ]; then
    say "new MQTT password for user gateway in $pw_file"
    head -c 18 /dev/urandom | base64 | tr -d '/+=' | write_file 0640 "$pw_file"
    run chown "root:$group" "$pw_file"
  fi
  if ((DRY_RUN)); then
    echo "+ mosquitto_passwd -b $passwd gateway <the password in $pw_file>"
  else
    [ -e "$passwd" ] || install -m 0640 -o root -g mosquitto /dev/null "$passwd"
    mosquitto_passwd -b "$passwd" gateway "$(cat "$pw_file")"
    chown root:mosquitto "$passwd"
    chmod 0640 "$passwd"
  fi
  say "mosquitto: listener on 127.0.0.1:1883 only, no anonymous clients ($conf)"
  write_file 0644 "$conf" <<EOF
# Written by retrofit-gateway's deploy/install.sh --with-broker. Loopback only: the gateway
# publishes here; bridge to a plant broker with TLS if the MES needs the values elsewhere.
listener 1883 127.0.0.1
allow_anonymous false
password_file $passwd
# Without it mosquitto leaves Nagle on towards subscribers: a message written while an earlier
# one is unacknowledged waits for the subscriber's delayed ACK, up to 40 ms (bench/end_to_end.py).
set_tcp_nodelay true
EOF
  if systemd_running; then
    run systemctl enable mosquitto
    run systemctl restart mosquitto
  else
    say "systemd is not running: start mosquitto yourself (mosquitto -c /etc/mosquitto/mosquitto.conf)"
  fi
}

check_config() {
  local gw="$PREFIX/current/bin/retrofit-gw"
  say "retrofit-gw check $ETC/gateway.yaml"
  if ((DRY_RUN)); then echo "+ $gw check $ETC/gateway.yaml"; return 0; fi
  if [ "$SVC_USER" != "$(id -un)" ]; then
    # As the service user: also proves it can read the config.
    runuser -u "$SVC_USER" -- "$gw" check "$ETC/gateway.yaml"
  else
    "$gw" check "$ETC/gateway.yaml"
  fi
}

# ---- main -------------------------------------------------------------------------------------
if ((ROLLBACK)); then
  cur=$(link_target "$PREFIX/current" || true)
  prev=$(link_target "$PREFIX/previous" || true)
  if [ -z "$prev" ] || [ ! -d "$prev" ]; then die "no previous release to roll back to in $PREFIX"; fi
  say "rolling back: $cur -> $prev"
  set_link current "$prev"
  [ -n "$cur" ] && set_link previous "$cur"
  check_config || die "the previous release refuses $ETC/gateway.yaml (see above); current is now $prev"
  restart_service rollback
  say "done: $PREFIX/current -> $prev"
  exit 0
fi

ensure_user
check_python
install_release
old=$(link_target "$PREFIX/current" || true)
old_prev=$(link_target "$PREFIX/previous" || true)
set_link current "$NEW_RELEASE"
if [ -n "$old" ] && [ "$old" != "$NEW_RELEASE" ]; then set_link previous "$old"; fi
install_config
install_data_dir
install_unit
((WITH_BROKER)) && install_broker
if ! check_config; then
  if [ -n "$old" ]; then
    set_link current "$old"
    [ -n "$old_prev" ] && set_link previous "$old_prev"
    run rm -rf "$NEW_RELEASE"
    die "the new release refuses $ETC/gateway.yaml (see above): current is back at $old, the service was not restarted"
  fi
  die "$ETC/gateway.yaml does not pass the check (see above)"
fi
prune_releases
restart_service install
say "done: $PREFIX/current -> $NEW_RELEASE"

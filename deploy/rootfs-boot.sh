#!/usr/bin/env bash
# Boot a rootfs that deploy/rootfs-check.sh installed the gateway into, with systemd-nspawn,
# and check the installed unit under a real systemd as PID 1: Type=notify start (READY only
# once the sinks are up), the service user and its empty capability set, watchdog pings, a
# good SIGHUP reload, a bad one refused while the service keeps running, a hung event loop
# killed by the watchdog and restarted, and a clean stop. Called by rootfs-check.sh --boot:
#
#   deploy/rootfs-boot.sh ROOTFS [--with-broker]
#
# --with-broker: first run the bundle's install.sh --with-broker inside the booted container
# (mosquitto from Debian's packages, enabled by systemd, a loopback listener on 127.0.0.1:1883
# with a password), and point the gateway at it instead of rootfs-check.sh's test broker.
#
# It uses /etc/retrofit-gateway/local.yaml, which rootfs-check.sh wrote. The container shares this machine's network (no --private-network), so the simulator and
# broker that rootfs-check.sh started on 127.0.0.1 are reachable and every listener stays on
# 127.0.0.1. Prints one JSON object: what the self-test inside saw.
set -euo pipefail
ROOT=${1:?rootfs}
WITH_BROKER=0
[ "${2:-}" = --with-broker ] && WITH_BROKER=1
command -v systemd-nspawn >/dev/null || { echo "systemd-nspawn missing: apt-get install systemd-container" >&2; exit 1; }

# The self-test runs inside as a oneshot unit once the container reached multi-user, writes
# its findings to /root/selftest.json and powers the container off. The journal persists in the
# rootfs, so every query is about this boot only (-b).
cat >"$ROOT/root/selftest.sh" <<'EOS'
#!/bin/bash
set -u
U=retrofit-gateway.service
CFG=/etc/retrofit-gateway/gateway.yaml
declare -A R
prop() { systemctl show -p "$1" --value "$U"; }
wait_for() {  # wait_for SECONDS COMMAND...: poll until the command succeeds
  local end=$((SECONDS + $1)); shift
  until "$@"; do ((SECONDS < end)) || return 1; sleep 0.5; done
}
journal() { journalctl -b -u "$U" --no-pager -o cat; }

# The technician's edit: the installed example pointed at this machine's simulator and ports.
cp "$CFG" /root/gateway.yaml.installed
cp /etc/retrofit-gateway/local.yaml "$CFG"

if [ -e /root/selftest-with-broker ]; then
  # The broker on the box, as a technician installs it: the bundle's install.sh under a running
  # systemd (mosquitto from Debian, enabled, a password for user gateway).
  bash /root/bundle/install.sh --with-broker >/root/selftest-install.log 2>&1
  R[broker_install_rc]=$?
  R[broker_mosquitto]=$(systemctl is-active mosquitto)
  # Listening sockets (state 0A) on port 1883 (075B): the address must be 127.0.0.1 only.
  R[broker_listen]=$(awk '$4 == "0A" && $2 ~ /:075B$/ {print $2}' /proc/net/tcp /proc/net/tcp6 | sort -u | tr '\n' ' ')
  R[broker_anonymous]=$(grep -h '^allow_anonymous' /etc/mosquitto/conf.d/retrofit-gateway.conf)
  awk '/^mqtt:/ {m = 1} m && /^  port: / {sub(/[0-9]+$/, "1883"); m = 0} {print}' "$CFG" >"$CFG.new"
  cat "$CFG.new" >"$CFG"; rm -f "$CFG.new"
fi

t0=$(date +%s.%N)
systemctl start "$U"; R[start_rc]=$?
t1=$(date +%s.%N)
R[start_s]=$(python3 -c "print(round($t1 - $t0, 1))")
R[active_after_start]=$(systemctl is-active "$U")
R[status_text]=$(prop StatusText)
PID=$(prop MainPID)
R[user]=$(ps -o user= -p "$PID" | tr -d ' ')
R[cap_eff]=$(awk '/^CapEff/ {print $2}' "/proc/$PID/status")
R[no_new_privs]=$(awk '/^NoNewPrivs/ {print $2}' "/proc/$PID/status")
R[rss_mb]=$(awk '/^VmRSS/ {printf "%.1f", $2 / 1024}' "/proc/$PID/status")
if [ -e /root/selftest-with-broker ]; then
  wait_for 60 bash -c "journalctl -b -u $U --no-pager -o cat | grep -q 'MQTT: connected to 127.0.0.1:1883'"
  R[broker_connected]=$(journal | grep -m1 'MQTT: connected to 127.0.0.1:1883' || true)
fi

# WatchdogSec=30: the gateway pings every 15 s; the timestamp must move.
w0=$(prop WatchdogTimestampMonotonic)
sleep 17
w1=$(prop WatchdogTimestampMonotonic)
R[watchdog_pinged]=$([ "$w1" != "$w0" ] && [ "$w1" != 0 ] && echo true || echo false)

# A good reload: same process, new config.
sed -i 's/^  area: machining$/  area: machining-reloaded/' "$CFG"
systemctl reload "$U"; R[reload_rc]=$?
wait_for 120 bash -c "systemctl show -p StatusText --value $U | grep -q '^reloaded'"
R[reload_status]=$(prop StatusText)
R[reload_same_pid]=$([ "$(prop MainPID)" = "$PID" ] && echo true || echo false)

# A bad reload: refused, the running gateway keeps going.
cp "$CFG" /root/gateway.yaml.good
printf 'gateway:\n  name: shop-gw\n  bogus_key: 1\ndevices: []\n' >"$CFG"
systemctl reload "$U"
wait_for 60 bash -c "journalctl -b -u $U --no-pager -o cat | grep -q 'reload refused'"
R[bad_reload_logged]=$(journal | grep -m1 'reload refused' || true)
sleep 2
R[bad_reload_active]=$(systemctl is-active "$U")
R[bad_reload_same_pid]=$([ "$(prop MainPID)" = "$PID" ] && echo true || echo false)
cp /root/gateway.yaml.good "$CFG"

# A hung event loop: SIGSTOP stops the pings; the watchdog must kill and restart it.
restarts0=$(prop NRestarts)
kill -STOP "$PID"
wait_for 90 bash -c "[ \"\$(systemctl show -p NRestarts --value $U)\" != $restarts0 ]"
wait_for 120 bash -c "[ \"\$(systemctl is-active $U)\" = active ]"
R[watchdog_restarts]=$(( $(prop NRestarts) - restarts0 ))
R[watchdog_logged]=$(journalctl -b -u "$U" --no-pager -o cat | grep -m1 -i 'watchdog timeout' || true)
R[active_after_watchdog]=$(systemctl is-active "$U")
R[new_pid]=$([ "$(prop MainPID)" != "$PID" ] && echo true || echo false)

systemctl stop "$U"
R[stopped]=$(systemctl is-active "$U")
R[stop_result]=$(prop Result)
cp /root/gateway.yaml.installed "$CFG"

python3 - "${!R[@]}" -- "${R[@]}" >/root/selftest.json <<'EOF'
import json, sys
sep = sys.argv.index("--")
keys, values = sys.argv[1:sep], sys.argv[sep + 1:]
print(json.dumps({f"boot_{k}": v for k, v in zip(keys, values)}, sort_keys=True))
EOF
journal >/root/selftest-journal.txt
systemctl poweroff
EOS
chmod 0755 "$ROOT/root/selftest.sh"
cat >"$ROOT/etc/systemd/system/retrofit-selftest.service" <<'EOS'
[Unit]
Description=retrofit-gateway self-test under systemd (deploy/rootfs-boot.sh)
After=multi-user.target
[Service]
Type=oneshot
ExecStart=/root/selftest.sh
StandardOutput=journal+console
[Install]
WantedBy=multi-user.target
EOS
ln -sf /etc/systemd/system/retrofit-selftest.service \
  "$ROOT/etc/systemd/system/multi-user.target.wants/retrofit-selftest.service"
rm -f "$ROOT/root/selftest.json" "$ROOT/root/selftest-with-broker"
if ((WITH_BROKER)); then
  # The container shares this machine's network: mosquitto's 127.0.0.1:1883 must be free.
  python3 -c 'import socket, sys; s = socket.socket(); sys.exit(s.connect_ex(("127.0.0.1", 1883)) == 0)' \
    || { echo "rootfs-boot.sh: 127.0.0.1:1883 is in use here; --with-broker needs it" >&2; exit 1; }
  touch "$ROOT/root/selftest-with-broker"
fi

timeout 900 systemd-nspawn --quiet --boot --register=no --keep-unit --directory="$ROOT" \
  --console=pipe >"$ROOT.boot.log" 2>&1 </dev/null || true
rm -f "$ROOT/etc/systemd/system/multi-user.target.wants/retrofit-selftest.service"
if [ ! -s "$ROOT/root/selftest.json" ]; then
  echo "rootfs-boot.sh: the self-test left no result; the boot log is $ROOT.boot.log" >&2
  tail -n 40 "$ROOT.boot.log" >&2
  exit 1
fi
cat "$ROOT/root/selftest.json"

#!/usr/bin/env bash
# Build offline install bundles: the gateway's wheel and a wheel of every dependency for one
# CPU architecture, with install.sh, the systemd unit and a README, so a box with no internet
# installs from a USB stick:
#
#   deploy/make-wheelhouse.sh                       # aarch64 and armv7l, into ./wheelhouse/
#   deploy/make-wheelhouse.sh --arch x86_64 --out /tmp/wh
#   # on the box:  sudo /media/usb/retrofit-gateway-0.1.0-aarch64/install.sh
#
# Run it on any Linux machine with Python 3.11 and access to PyPI (or a mirror pip is set up
# for). The versions are resolved once (pip's --report, as for this machine), then each is
# fetched as a binary wheel for Linux on the target: manylinux (glibc up to 2.36, Debian 12) or
# plain linux_<arch>, CPython 3.11. Nothing is compiled on the box.
#
# A dependency without such a wheel on the index is listed in MISSING.txt and in the README of
# the bundle, and the script exits 3 (0 with --allow-incomplete). For armv7l (32-bit Raspberry
# Pi OS) PyPI lacks some (PyYAML, cffi). Two ways to fill the gap, both on this machine:
#   --build-missing   build them here, as root: a Debian bookworm rootfs of the target arch
#                     (debootstrap, run through qemu-user-static) with python3-dev, gcc and the
#                     C libraries, cached in /var/tmp/retrofit-wheel-builder-<debian arch> and
#                     reused; inside it `pip wheel --no-deps --no-binary <name> <name>==<version>`
#                     (the versions resolved here) in a venv. Bookworm armhf is what Raspberry Pi
#                     OS bookworm 32-bit is built from (Debian's python3.11, glibc 2.36): the
#                     wheels are tagged cp311-cp311-linux_armv7l.
#                     sudo deploy/make-wheelhouse.sh --arch armv7l --build-missing
#   --extra-index-url https://www.piwheels.org/simple   (passed on to pip, if this machine
#                     reaches it; piwheels has most armv7l wheels)
set -euo pipefail

SELF_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CHECKOUT=$(cd "$SELF_DIR/.." && pwd)
OUT=$PWD/wheelhouse
ARCHES=()
PYVER=3.11
ALLOW_INCOMPLETE=0
PIP_EXTRA=()
PY=${PYTHON:-python3}
BUILD_MISSING=0
BUILDER_DIR=""   # default /var/tmp/retrofit-wheel-builder-<debian arch>
MIRROR=http://deb.debian.org/debian

usage() {
  echo "usage: make-wheelhouse.sh [--out DIR] [--arch aarch64|armv7l|x86_64]... [--allow-incomplete]"
  echo "                          [--extra-index-url URL] [--build-missing [--builder-dir DIR] [--mirror URL]]"
}
while (($#)); do
  case $1 in
    --out) OUT=${2:?}; shift 2 ;;
    --arch) ARCHES+=("${2:?}"); shift 2 ;;
    --allow-incomplete) ALLOW_INCOMPLETE=1; shift ;;
    --extra-index-url) PIP_EXTRA+=(--extra-index-url "${2:?}"); shift 2 ;;
    --build-missing) BUILD_MISSING=1; shift ;;
    --builder-dir) BUILDER_DIR=${2:?}; shift 2 ;;
    --mirror) MIRROR=${2:?}; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; exit 2 ;;
  esac
done
((${#ARCHES[@]})) || ARCHES=(aarch64 armv7l)
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

echo "== building the project's wheel"
"$PY" -m venv "$work/venv"
"$work/venv/bin/python" -m pip wheel -q --no-deps -w "$work/project" "$CHECKOUT"
project_whl=$(find "$work/project" -name 'retrofit_gateway-*.whl' | head -n 1)
version=$(basename "$project_whl" | cut -d- -f2)

echo "== resolving the dependencies of retrofit-gateway $version"
"$work/venv/bin/python" -m pip install -q --dry-run --ignore-installed --only-binary=:all: \
  "${PIP_EXTRA[@]}" --report "$work/report.json" "$project_whl"
"$work/venv/bin/python" - "$work/report.json" >"$work/pins.txt" <<'EOF'
import json, sys
for item in json.load(open(sys.argv[1]))["install"]:
    meta = item["metadata"]
    if meta["name"].lower().replace("_", "-") != "retrofit-gateway":
        print(f"{meta['name']}=={meta['version']}")
EOF

platform_args() {
  # Every tag a wheel for Debian 12 (glibc 2.36) on this CPU may carry; pip matches exactly.
  local arch=$1 g
  echo "--platform linux_$arch --platform manylinux2014_$arch"
  for g in $(seq 17 36); do echo "--platform manylinux_2_${g}_$arch"; done
}

# ---- --build-missing: wheels built on this machine in a rootfs of the target arch ------------
secs() { date +%s.%N; }
elapsed() { "$PY" -c "import sys; print(round(float(sys.argv[2]) - float(sys.argv[1]), 1))" "$1" "$2"; }
# in_builder SECONDS ROOT CMD...: CMD chrooted in ROOT, killed after SECONDS. Each chroot runs
# in its own mount namespace: its mounts vanish with it, even on failure.
in_builder() {
  local secs=$1 root=$2; shift 2
  timeout -k 30 "$secs" unshare --mount --propagation private -- bash -c '
    set -e
    root=$1; shift
    mount -t proc proc "$root/proc"
    mount --rbind /sys "$root/sys"
    mount --rbind /dev "$root/dev"
    mount -t tmpfs tmpfs "$root/tmp"
    exec chroot "$root" /usr/bin/env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
      HOME=/root LANG=C.UTF-8 PIP_DISABLE_PIP_VERSION_CHECK=1 "$@"
  ' in_builder "$root" "$@"
}
# Whatever a timed-out build left running in the builder (found by its root directory).
kill_builder_procs() {
  local p pids=""
  for p in /proc/[0-9]*; do
    [ "$(readlink "$p/root" 2>/dev/null)" = "$1" ] && pids+=" ${p#/proc/}"
  done
  # shellcheck disable=SC2086
  [ -z "$pids" ] || kill -9 $pids 2>/dev/null || true
}
# build_missing ARCH BUNDLE PIN...: builds each pin's wheel into BUNDLE/wheels; prints the pins
# it could not build; timings go to stderr.
build_missing() {
  local arch=$1 bundle=$2; shift 2
  local deb qemu root t0 pin name out ca v
  local benv=()   # NAME=VALUE for pip in the builder
  case $arch in
    armv7l) deb=armhf; qemu=arm ;;
    aarch64) deb=arm64; qemu=aarch64 ;;
    x86_64) deb=amd64; qemu=x86_64 ;;
  esac
  root=$(realpath -m "${BUILDER_DIR:-/var/tmp/retrofit-wheel-builder-$deb}")
  if [ "$deb" != "$(dpkg --print-architecture)" ] && [ ! -e "/proc/sys/fs/binfmt_misc/qemu-$qemu" ]; then
    [ -e /proc/sys/fs/binfmt_misc/register ] || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
    [ -f "/usr/lib/binfmt.d/qemu-$qemu.conf" ] || { echo "   no qemu-$qemu: apt-get install qemu-user-static" >&2; printf '%s\n' "$@"; return; }
    echo "   registering qemu-$qemu with binfmt_misc" >&2
    cat "/usr/lib/binfmt.d/qemu-$qemu.conf" >/proc/sys/fs/binfmt_misc/register
  fi
  if [ ! -f "$root/.retrofit-builder-ok" ]; then
    echo "   debootstrap bookworm $deb (builder) into $root, from $MIRROR" >&2
    rm -rf "$root"
    mkdir -p "$(dirname "$root")"
    t0=$(secs)
    if ! timeout 2400 debootstrap --arch="$deb" --variant=minbase \
      --include=python3,python3-venv,python3-dev,gcc,libc6-dev,libffi-dev,libyaml-dev,ca-certificates \
      bookworm "$root" "$MIRROR" >"$root.debootstrap.log" 2>&1; then
      echo "   debootstrap failed: $root.debootstrap.log" >&2; printf '%s\n' "$@"; return
    fi
    if ! in_builder 900 "$root" python3 -m venv /opt/wheel-builder >&2; then
      echo "   venv in the builder failed" >&2; printf '%s\n' "$@"; return
    fi
    touch "$root/.retrofit-builder-ok"
    echo "   builder ready: $(elapsed "$t0" "$(secs)") s (debootstrap + venv)" >&2
  else
    echo "   reusing the builder rootfs $root" >&2
  fi
  cp -L /etc/resolv.conf "$root/etc/resolv.conf"
  # pip in the builder trusts what pip here trusts (a proxy's CA, say) and uses its proxy.
  ca=${PIP_CERT:-${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}}
  if [ -f "$ca" ]; then
    cp -L "$ca" "$root/etc/ssl/certs/build-host-ca.crt"
    benv+=(PIP_CERT=/etc/ssl/certs/build-host-ca.crt)
  fi
  for v in http_proxy https_proxy no_proxy HTTP_PROXY HTTPS_PROXY NO_PROXY; do
    [ -z "${!v:-}" ] || benv+=("$v=${!v}")
  done
  for pin in "$@"; do
    name=${pin%%==*}
    out=/root/wheels-$$
    rm -rf "${root:?}$out"
    echo "   building $pin for $arch in the builder (emulated)" >&2
    t0=$(secs)
    # --no-binary only for the package itself: its build requirements (setuptools, Cython…)
    # may come as pure-Python wheels, so only the package's own C code is compiled.
    if in_builder 1800 "$root" "${benv[@]}" /opt/wheel-builder/bin/python -m pip wheel -q --no-deps \
      --no-binary "$name" "${PIP_EXTRA[@]}" -w "$out" "$pin" >"$root.build-$name.log" 2>&1 \
      && ls "$root$out"/*.whl >/dev/null 2>&1; then
      echo "   built in $(elapsed "$t0" "$(secs)") s: $(cd "$root$out" && ls -- *.whl)" >&2
      cp "$root$out"/*.whl "$bundle/wheels/"
    else
      echo "   build of $pin failed after $(elapsed "$t0" "$(secs)") s:" >&2
      tail -n 20 "$root.build-$name.log" >&2
      echo "$pin"
      kill_builder_procs "$root"
    fi
    rm -rf "${root:?}$out"
  done
}

if ((BUILD_MISSING)); then
  [ "$(id -u)" = 0 ] || { echo "--build-missing needs root (debootstrap, chroot, mounts)" >&2; exit 2; }
  command -v debootstrap >/dev/null || { echo "--build-missing needs debootstrap (and qemu-user-static)" >&2; exit 2; }
fi

status=0
for arch in "${ARCHES[@]}"; do
  case $arch in aarch64 | armv7l | x86_64) ;; *) echo "unknown arch: $arch" >&2; exit 2 ;; esac
  bundle="$OUT/retrofit-gateway-$version-$arch"
  echo "== $bundle"
  rm -rf "$bundle"
  mkdir -p "$bundle/wheels"
  cp "$project_whl" "$bundle/wheels/"
  missing=()
  # shellcheck disable=SC2046  # platform_args is meant to split into words
  while read -r pin; do
    if ! "$work/venv/bin/python" -m pip download -q --no-deps --only-binary=:all: \
      $(platform_args "$arch") --python-version "$PYVER" --implementation cp \
      --abi "cp${PYVER/./}" --abi abi3 --abi none "${PIP_EXTRA[@]}" \
      -d "$bundle/wheels" "$pin" >"$work/dl.log" 2>&1; then
      missing+=("$pin")
      echo "   no $arch wheel: $pin"
    fi
  done <"$work/pins.txt"
  built=()
  if ((${#missing[@]})) && ((BUILD_MISSING)); then
    echo "== building ${missing[*]} for $arch on this machine (--build-missing)"
    before=("${missing[@]}")
    mapfile -t missing < <(build_missing "$arch" "$bundle" "${missing[@]}")
    for pin in "${before[@]}"; do
      printf '%s\n' "${missing[@]}" | grep -qxF -- "$pin" || built+=("$pin")
    done
  fi
  cp "$SELF_DIR/install.sh" "$SELF_DIR/retrofit-gateway.service" "$bundle/"
  if ((${#missing[@]})); then printf '%s\n' "${missing[@]}" >"$bundle/MISSING.txt"; fi
  {
    echo "retrofit-gateway $version for Linux $arch, CPython $PYVER (Debian 12 / Raspberry Pi OS bookworm)"
    echo
    echo "Install offline, as root, from this folder:"
    echo "    sudo ./install.sh                 # finds ./wheels by itself"
    echo "    sudo ./install.sh --with-broker   # also mosquitto (from the OS's apt sources)"
    echo "Upgrade: the same with a newer bundle. Back to the release before: sudo ./install.sh --rollback"
    echo "The box needs python3 (3.11) and python3-venv from the OS; nothing is downloaded."
    if [ "$arch" = armv7l ]; then
      echo "CPU: ARMv7 or newer (Raspberry Pi 2, 3, 4, 5, Zero 2 W, 32-bit OS); the compiled wheels"
      echo "do not run on ARMv6 (Pi 1, Zero, Zero W)."
    fi
    echo
    if ((${#built[@]})); then
      echo "Built from the sdist on the build machine (no $arch wheel on the index), in a Debian"
      echo "bookworm rootfs for $arch (make-wheelhouse.sh --build-missing): ${built[*]}"
      echo
    fi
    if ((${#missing[@]})); then
      echo "INCOMPLETE: no binary wheel for $arch was found for:"
      printf '    %s\n' "${missing[@]}"
      echo "Add them to wheels/ before going offline (sudo make-wheelhouse.sh --build-missing builds"
      echo "them on the build machine; piwheels.org has most armv7l wheels:"
      echo "make-wheelhouse.sh --extra-index-url https://www.piwheels.org/simple), or let the box"
      echo "build them (needs the internet, gcc, python3-dev, and for cryptography a Rust toolchain)."
      echo
    fi
    echo "Wheels:"
    find "$bundle/wheels" -name '*.whl' -printf '    %f\n' | sort
  } >"$bundle/README.txt"
  if ((${#missing[@]})); then
    echo "   INCOMPLETE for $arch: ${missing[*]}"
    status=3
  else
    echo "   complete: $(find "$bundle/wheels" -name '*.whl' | wc -l) wheels"
  fi
done

if ((status)) && ((ALLOW_INCOMPLETE)); then status=0; fi
exit "$status"

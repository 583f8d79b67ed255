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
# Pi OS) PyPI lacks some; piwheels.org has them: `--extra-index-url https://www.piwheels.org/simple`
# (passed on to pip, if this machine reaches it).
set -euo pipefail

SELF_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CHECKOUT=$(cd "$SELF_DIR/.." && pwd)
OUT=$PWD/wheelhouse
ARCHES=()
PYVER=3.11
ALLOW_INCOMPLETE=0
PIP_EXTRA=()
PY=${PYTHON:-python3}

usage() {
  echo "usage: make-wheelhouse.sh [--out DIR] [--arch aarch64|armv7l|x86_64]... [--allow-incomplete]"
  echo "                          [--extra-index-url URL]"
}
while (($#)); do
  case $1 in
    --out) OUT=${2:?}; shift 2 ;;
    --arch) ARCHES+=("${2:?}"); shift 2 ;;
    --allow-incomplete) ALLOW_INCOMPLETE=1; shift ;;
    --extra-index-url) PIP_EXTRA+=(--extra-index-url "${2:?}"); shift 2 ;;
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
    echo
    if ((${#missing[@]})); then
      echo "INCOMPLETE: no binary wheel for $arch was found for:"
      printf '    %s\n' "${missing[@]}"
      echo "Add them to wheels/ before going offline (piwheels.org has most armv7l wheels:"
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

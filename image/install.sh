#!/bin/sh
# Install the metaleg agent into a virtual environment, with the Debian
# packages it needs at run time. The container image runs this in its final
# stage; tests/test_image.py runs it on the CI machine into a temporary prefix.
#
#   image/install.sh --prefix DIR --wheel-dir DIR [--offline] [--slim] [--no-apt] [--python PY]
#
#   --prefix DIR     the virtual environment to create or update (its final location:
#                    scripts in DIR/bin name DIR/bin/python)
#   --wheel-dir DIR  holds exactly one metaleg-*.whl and, optionally, wheels of its
#                    dependencies (pip wheel . --wheel-dir DIR builds them all)
#   --offline        install from DIR only (pip --no-index); otherwise missing
#                    dependencies come from the package index
#   --slim           remove pip and setuptools from the environment afterwards
#   --no-apt         do not install Debian packages; fail if one is missing
#   --python PY      the interpreter the environment is based on (default /usr/bin/python3,
#                    Debian's: the wheels are built for it)
#
# Debian packages: iptables (python-iptables loads libxtables/libip4tc/libip6tc
# from it; the firewall backend detection runs iptables-*-save), ipset,
# nftables and libnftables1 (the nftables backend loads libnftables), iproute2,
# conntrack, kmod (python-iptables runs modprobe when imported) and python3 with
# python3-venv.
set -eu

RUNTIME_PACKAGES="iptables ipset nftables libnftables1 iproute2 conntrack kmod python3 python3-venv"

prefix=""
wheel_dir=""
offline=0
slim=0
apt=1
python=/usr/bin/python3

usage() {
    sed -n '6,20p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

while [ $# -gt 0 ]; do
    case "$1" in
        --prefix) [ $# -ge 2 ] || usage; prefix=$2; shift 2 ;;
        --wheel-dir) [ $# -ge 2 ] || usage; wheel_dir=$2; shift 2 ;;
        --python) [ $# -ge 2 ] || usage; python=$2; shift 2 ;;
        --offline) offline=1; shift ;;
        --slim) slim=1; shift ;;
        --no-apt) apt=0; shift ;;
        -h|--help) usage ;;
        *) echo "install.sh: unknown argument: $1" >&2; usage ;;
    esac
done
if [ -z "$prefix" ] || [ -z "$wheel_dir" ]; then usage; fi

say() { echo "install.sh: $*" >&2; }

# --- checks before changing anything ----------------------------------------------------------
set -- "$wheel_dir"/metaleg-*.whl
if [ $# -ne 1 ] || [ ! -f "$1" ]; then
    say "expected exactly one metaleg-*.whl in $wheel_dir, found: $*"
    exit 1
fi
wheel=$1

if [ -e "$prefix" ] && [ ! -f "$prefix/pyvenv.cfg" ] && [ -n "$(ls -A "$prefix")" ]; then
    say "$prefix exists and is not a virtual environment; refusing to install into it"
    exit 1
fi

# --- Debian packages ---------------------------------------------------------------------------
missing=""
for package in $RUNTIME_PACKAGES; do
    status=$(dpkg-query -W -f='${Status}' "$package" 2>/dev/null || true)
    case "$status" in
        *" installed") ;;
        *) missing="$missing $package" ;;
    esac
done
if [ -n "$missing" ]; then
    if [ "$apt" -eq 0 ]; then
        say "missing Debian packages:$missing (run without --no-apt to install them)"
        exit 1
    fi
    say "installing Debian packages:$missing"
    apt-get update -qq
    # shellcheck disable=SC2086  # one word per package
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi

# --- the virtual environment -------------------------------------------------------------------
"$python" -m venv "$prefix"

index_option=""
if [ "$offline" -eq 1 ]; then index_option="--no-index"; fi
say "installing $(basename "$wheel") into $prefix"
# shellcheck disable=SC2086  # empty or one option
"$prefix/bin/python" -m pip install --quiet --disable-pip-version-check --no-input --use-pep517 \
    $index_option --find-links "$wheel_dir" "$wheel"

if [ "$slim" -eq 1 ]; then
    "$prefix/bin/python" -m pip uninstall --quiet --yes pip setuptools >/dev/null 2>&1 || true
    rm -f "$prefix"/bin/pip "$prefix"/bin/pip3*
fi

# --- smoke test: the command and the native libraries it loads --------------------------------
"$prefix/bin/metaleg-supervisor" --help >/dev/null
"$prefix/bin/python" -c '
import ctypes
import iptc, kubernetes, msgspec, prometheus_client, pyroute2, zmq
ctypes.CDLL("libnftables.so.1")
'
say "done: $prefix/bin/metaleg-supervisor"

#!/usr/bin/env bash
# Installs Volatility 3 from PyPI into a private venv (default .cache/volatility), idempotently.
# The real-guest test crates/linux/tests/volatility_guest.rs uses it as an independent oracle:
# Volatility must load the ISF kvmaccess exports and list the same tasks kvmaccess does.
set -euo pipefail

# Pinned so the oracle does not change under the tests; bump deliberately.
VOLATILITY_VERSION=2.28.2
VENV=${1:-$(cd "$(dirname "$0")/.." && pwd)/.cache/volatility}
PYTHON=${PYTHON:-python3}

installed_version() {
    # jsonschema is imported too: a venv without it is incomplete (see below).
    "$VENV/bin/python" -c 'import importlib.metadata as m, jsonschema; print(m.version("volatility3"))' \
        2>/dev/null || true
}

if [ -x "$VENV/bin/vol" ] && [ "$(installed_version)" = "$VOLATILITY_VERSION" ]; then
    echo "$VENV/bin/vol"
    exit 0
fi

if ! "$PYTHON" -c 'import venv, ensurepip' 2>/dev/null; then
    echo "installing python3-venv"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-venv
fi

echo "installing volatility3==$VOLATILITY_VERSION into $VENV" >&2
"$PYTHON" -m venv "$VENV"
# The required dependency (pefile) plus jsonschema, with which Volatility validates every ISF
# against its schema on load (without it a malformed ISF passes silently). The optional extras
# (yara, capstone, pycryptodome...) are not needed for linux.pslist.
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
    "volatility3==$VOLATILITY_VERSION" "jsonschema>=4.23,<5"
"$VENV/bin/vol" --help >/dev/null
echo "$VENV/bin/vol"

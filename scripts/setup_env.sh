#!/usr/bin/env bash
# Set up (or reuse) the project's virtual environment at .venv/ in the repository root, with the
# exact CPU versions this project is tested with (scripts/constraints-cpu.txt).
# Idempotent: a second run only checks that everything is in place (a few seconds).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3}"

# System libraries: open3d (used by ns-export pointcloud/poisson) needs libusb; the viewer's
# browser test drives Debian's chromium. Installed only when missing, and only as root.
need=()
dpkg -s libusb-1.0-0 >/dev/null 2>&1 || need+=(libusb-1.0-0)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "[setup] apt-get install ${need[*]}"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  else
    echo "[setup] warning: missing system packages ${need[*]} (install them with your package manager)" >&2
  fi
fi

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
stamp=.venv/.certsdf-installed
want="$(cat pyproject.toml setup.py scripts/constraints-cpu.txt | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[setup] installing certsdf-ns (editable) and the tested CPU versions of its dependencies into .venv (a few minutes the first time)"
  .venv/bin/python -m pip install -q --disable-pip-version-check -c scripts/constraints-cpu.txt -e '.[dev]' 2> >(grep -v "^WARNING: Location 'file:" >&2)
  echo "$want" > "$stamp"
fi
.venv/bin/python -W ignore -c "import certsdf_ns.method_config" >/dev/null  # fails loudly on a broken install
echo "[setup] ready: $ROOT/.venv"

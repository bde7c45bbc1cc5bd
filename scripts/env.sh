# Shared by scripts/run and scripts/test: find Python 3.13 and keep .venv made with it.
# shellcheck shell=bash

find_python313() {
  local candidate
  for candidate in "${FLEETGATE_PYTHON:-}" python3.13 \
      "$HOME"/.pyenv/versions/3.13*/bin/python3.13 \
      /usr/local/bin/python3.13 /usr/bin/python3.13; do
    [ -n "$candidate" ] || continue
    if "$candidate" -c 'import sys; assert sys.version_info[:2] == (3, 13)' >/dev/null 2>&1; then
      command -v "$candidate" 2>/dev/null || echo "$candidate"
      return 0
    fi
  done
  echo "fleetgate needs Python 3.13 (stdlib TLS-PSK); none found. Install it, or point" \
       "FLEETGATE_PYTHON at a python3.13 binary." >&2
  return 1
}

ensure_venv() {
  local venv="$1" python
  if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c 'import sys; assert sys.version_info[:2] == (3, 13)' 2>/dev/null; then
    return 0
  fi
  python=$(find_python313) || return 1
  rm -rf "$venv"
  "$python" -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --upgrade pip
}

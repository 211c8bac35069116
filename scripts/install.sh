#!/usr/bin/env bash
# Create .venv and install Sluice with its dev tools. Idempotent: a stamp holding the hash of
# pyproject.toml skips the pip work when nothing changed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

VENV=.venv
STAMP="$VENV/.sluice-install-stamp"
TORCH_VERSION=2.13.0

find_python() {
  local candidate
  # 3.13 last: RapidOCR (the second OCR engine, a dev dependency) has no wheel for it yet.
  for candidate in "${PYTHON:-}" python3.12 python3.11 python3.13 python3; do
    [[ -n "$candidate" ]] || continue
    command -v "$candidate" >/dev/null 2>&1 || continue
    if "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
      echo "$candidate"
      return 0
    fi
  done
  return 1
}

if [[ ! -x "$VENV/bin/python" ]]; then
  if ! PY=$(find_python); then
    echo "install.sh: Sluice needs Python 3.11 or newer; none found on PATH" >&2
    echo "install.sh: install python3.11 (or set PYTHON=/path/to/python3.11) and re-run" >&2
    exit 1
  fi
  echo "install.sh: creating $VENV with $("$PY" -V 2>&1)"
  "$PY" -m venv "$VENV"
elif ! "$VENV/bin/python" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "install.sh: $VENV uses $("$VENV/bin/python" -V 2>&1); Sluice needs 3.11+." >&2
  echo "install.sh: remove $VENV and re-run" >&2
  exit 1
fi

# OCR (scans and images) runs Tesseract in process (the tesserocr wheel bundles the library)
# with Debian's English model, a system package: checked on every run, since it lives outside
# the venv. Not needed with SLUICE_OCR=false or SLUICE_OCR_ENGINE=rapidocr (a wheel).
ocr=${SLUICE_OCR:-true}
if [[ "${ocr,,}" != false && "${ocr}" != 0 && "${SLUICE_OCR_ENGINE:-tesseract}" == tesseract ]] &&
  [[ -z "$(find /usr/share/tesseract-ocr -name eng.traineddata 2>/dev/null)" ]]; then
  sudo=()
  if [[ $(id -u) -ne 0 ]]; then
    command -v sudo >/dev/null || {
      echo "install.sh: OCR needs tesseract-ocr-eng (apt); run as root, install it," >&2
      echo "install.sh: or set SLUICE_OCR=false" >&2
      exit 1
    }
    sudo=(sudo)
  fi
  echo "install.sh: installing tesseract-ocr-eng (apt)"
  "${sudo[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends \
    tesseract-ocr-eng >/dev/null
fi

want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]]; then
  exit 0
fi

PIP=("$VENV/bin/python" -m pip --quiet --disable-pip-version-check)

# torch first and pinned: resolving it through the project would let pip pick a CUDA build
# (gigabytes). SLUICE_TORCH_INDEX_URL lets users point this one install at a CPU wheel index.
torch_args=("torch==$TORCH_VERSION")
if [[ -n "${SLUICE_TORCH_INDEX_URL:-}" ]]; then
  torch_args+=(--index-url "$SLUICE_TORCH_INDEX_URL")
fi
echo "install.sh: installing torch==$TORCH_VERSION"
"${PIP[@]}" install "${torch_args[@]}"

echo "install.sh: installing sluice[dev] (editable)"
"${PIP[@]}" install -e '.[dev]'

echo "$want" >"$STAMP"
echo "install.sh: done"

# Sourced by scripts/demo and scripts/test: create .venv if missing and install kseg into it.
# KSEG_EXTRAS picks the TensorFlow wheel: "cpu" (default) or "gpu".
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
extras="${KSEG_EXTRAS:-cpu}${1:+,$1}"
python="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$python" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
    || { echo "kseg needs Python >= 3.10; set PYTHON=/path/to/python3.1x" >&2; exit 1; }
  echo "creating .venv with $("$python" --version)" >&2
  "$python" -m venv .venv
fi
# Reinstall only when pyproject.toml or the extras change.
stamp=".venv/.kseg-installed"
want="$(sha256sum pyproject.toml | cut -d' ' -f1) $extras"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "installing kseg[$extras] into .venv" >&2
  .venv/bin/python -m pip install --quiet -e ".[$extras]" >&2
  # gRPC serving protos; the wheel depends on full `tensorflow`, which would replace tensorflow-cpu.
  case ",$extras," in *,test,*) .venv/bin/python -m pip install --quiet --no-deps "tensorflow-serving-api~=2.21.0" >&2;; esac
  echo "$want" > "$stamp"
fi
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"

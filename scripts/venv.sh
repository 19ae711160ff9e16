# Sourced by the scripts in this folder (run from the checkout's root): make ./.venv with
# Silo installed editable, on first use and again whenever pyproject.toml is newer than
# the last install. The interpreter is $PYTHON, else python3.
#   ensure_venv        Silo and its runtime dependencies (marker .venv/.installed)
#   ensure_venv dev    also the test and bench extras, '.[dev]' (marker .venv/.installed-dev)
ensure_venv() {
  local bin=silo marker=.installed spec=.
  if [ "${1:-}" = dev ]; then bin=pytest marker=.installed-dev spec='.[dev]'; fi
  if [ ! -x ".venv/bin/$bin" ] || [ pyproject.toml -nt ".venv/$marker" ]; then
    "${PYTHON:-python3}" -m venv .venv
    .venv/bin/python -m pip install --quiet --disable-pip-version-check -e "$spec"
    touch ".venv/$marker"
  fi
}

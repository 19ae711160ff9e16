# Sourced by the scripts in this folder (run from the checkout's root): make ./.venv with
# Silo installed editable, on first use and again whenever pyproject.toml is newer than
# the last install (or a C accelerator's source, silo/storage/_*.c, is: pip builds them in
# place). The interpreter is $PYTHON, else python3.
#   ensure_venv        Silo and its runtime dependencies (marker .venv/.installed)
#   ensure_venv dev    also the test and bench extras, '.[dev]' (marker .venv/.installed-dev)
ensure_venv() {
  local bin=silo marker=.installed spec=.
  if [ "${1:-}" = dev ]; then bin=pytest marker=.installed-dev spec='.[dev]'; fi
  local stale=""
  for f in pyproject.toml setup.py silo/storage/_*.c; do
    if [ -e "$f" ] && [ "$f" -nt ".venv/$marker" ]; then stale=1; fi
  done
  if [ ! -x ".venv/bin/$bin" ] || [ -n "$stale" ]; then
    "${PYTHON:-python3}" -m venv .venv
    .venv/bin/python -m pip install --quiet --disable-pip-version-check -e "$spec"
    touch ".venv/$marker"
  fi
}

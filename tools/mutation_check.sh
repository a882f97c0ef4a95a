#!/usr/bin/env bash
# Mutation check (issue 17, item 6): plants small bugs one at a time in a copy of the tree and
# checks that the relevant tests fail. Run by hand, not in CI (about 10-30 minutes on 2 cores).
#
#   bash tools/mutation_check.sh                      # every mutant; writes benchmarks/results/mutation.{md,json}
#   bash tools/mutation_check.sh --only rope_sign     # one mutant (repeat or comma-separate for more)
#   bash tools/mutation_check.sh --list               # the mutant table: site, change, tests
#   bash tools/mutation_check.sh --out /tmp/m.md --no-baseline --keep
#
# PYTHON picks the interpreter (it needs the test extras: bash tools/test.sh installs them); default:
# the active virtual environment, else the checkout's CI venv (.venv-ci), else python3. The mutant table lives in tools/mutation_check.py.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -n "${VIRTUAL_ENV:-}" && -x "$VIRTUAL_ENV/bin/python" ]]; then PYTHON="$VIRTUAL_ENV/bin/python"
  elif [[ -x "$here/../.venv-ci/bin/python" ]]; then PYTHON="$here/../.venv-ci/bin/python"
  else PYTHON=python3; fi
fi
export PYTHON
# the copy's package and library are put first by the helper; a stray EDGEKV_LIB would override them
unset EDGEKV_LIB
exec "$PYTHON" "$here/mutation_check.py" "$@"

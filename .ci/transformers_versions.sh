#!/usr/bin/env bash
# The focused subset (prompts and labels, scoring equalities incl. the shared-prefix TTA, the feature
# cache, the version entries, one end-to-end demo) on other transformers releases than the newest:
# the floor requirements.txt admits, and one of 5.18-5.23 (there a renamed cache argument was once
# ignored silently and gave wrong answers). Each release gets its own virtualenv; it borrows the main
# .venv's packages (torch is 5 GB) through a .pth file and installs only transformers and what that
# release pins differently (huggingface-hub, tokenizers) into itself, which comes first on sys.path.
set -euo pipefail
cd "$(dirname "$0")/.."
main_site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
for version in "$@"; do
  env=".venv-transformers-$version"
  python3 -m venv "$env"
  own_site=$("$env/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  echo "$main_site" > "$own_site/main_venv.pth"
  "$env/bin/python" -m pip install -q --disable-pip-version-check "transformers==$version" 2>&1 | grep -v "^WARNING" || true
  # The main venv's `kernels` (a dependency of the newest transformers) breaks older releases' import (5.0.0 builds
  # its hub-kernel table with an API kernels 0.19 dropped): give this venv the kernels its release pins.
  kernels=$("$env/bin/python" -c "from transformers.dependency_versions_table import deps; print(deps.get('kernels', ''))" 2>/dev/null || true)
  if [ -n "$kernels" ]; then
    "$env/bin/python" -m pip install -q --disable-pip-version-check "$kernels" 2>&1 | grep -v "^WARNING" || true
  fi
  "$env/bin/python" -c "import transformers, sys; v = transformers.__version__; print('transformers', v); sys.exit(v != '$version')"
  "$env/bin/python" -m pytest -q -p no:cacheprovider tests/test_compat.py tests/test_prompts_labels.py tests/test_scoring.py \
    tests/test_feature_cache.py "tests/test_end_to_end.py::test_cli_demo_runs_with_the_other_families_warm_up_included" \
    "tests/test_demo_learning.py::test_demo_learns_from_the_image"
done

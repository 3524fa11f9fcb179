#!/usr/bin/env bash
# Checks the wheel as someone who installs it meets it. It builds the wheel from the committed
# tree and installs it with the test extra in a fresh virtual environment. Then it checks that
# site-packages gains `keras_fip` and nothing else at its top level, and that `import keras_fip`
# works. Last, it runs the quick start and the default test suite, the package's docstring
# examples included, from a copy of the checkout without the `keras_fip` sources, so every
# import of keras_fip resolves to the installed package.
#
#   bash scripts/check_wheel.sh            # everything (the test suite takes the longest)
#   bash scripts/check_wheel.sh --no-tests # the wheel, the import and the quick start
#
# The installed package does not sit beside `shared/data`, so the data are found through
# env KERAS_FIP_DATA, which this sets to `../shared/data` when that exists and it is unset.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
run_tests=1
if [[ "${1:-}" == "--no-tests" ]]; then
  run_tests=0
fi

export PIP_DISABLE_PIP_VERSION_CHECK=1
export TF_CPP_MIN_LOG_LEVEL=2
if [[ -z "${KERAS_FIP_DATA:-}" && -d "$repo/../shared/data" ]]; then
  KERAS_FIP_DATA="$(cd "$repo/../shared/data" && pwd)"
  export KERAS_FIP_DATA
fi

work="$(mktemp -d)"
echo "::: working in $work"
mkdir "$work/checkout"
git -C "$repo" archive HEAD | tar -x -C "$work/checkout"

echo "::: build the wheel"
python3 -m venv "$work/venv"
# shellcheck disable=SC1091
source "$work/venv/bin/activate"
pip install --quiet --upgrade pip
pip wheel --quiet --no-deps --wheel-dir "$work/dist" "$work/checkout"
wheel="$(ls "$work"/dist/keras_fip-*.whl)"
echo "::: install $(basename "$wheel") with the test extra"
pip install --quiet "$wheel[test]"

echo "::: top level of site-packages"
# Away from any checkout, whose `keras_fip.egg-info` would answer for the installed package.
cd "$work"
python - <<'EOF'
import importlib.metadata

distribution = importlib.metadata.distribution("keras_fip")
print("keras_fip's metadata:", distribution.locate_file(""))
top = sorted({f.parts[0] for f in distribution.files if not f.parts[0].endswith(".dist-info")})
print("keras_fip's wheel installs:", top)
if top != ["keras_fip"]:
    raise SystemExit(f"expected only keras_fip at the top level of site-packages, found {top}")
EOF

# From here on the checkout copy has no `keras_fip` of its own.
rm -rf "$work/checkout/keras_fip"
cd "$work/checkout"
site="$(python -c 'import keras_fip, os; print(os.path.dirname(keras_fip.__file__))')"
echo "::: import keras_fip: $site"
if [[ "$site" != "$work/venv/"* ]]; then
  echo "keras_fip was imported from $site, not from the installed wheel" >&2
  exit 1
fi

echo "::: quick start"
start=$(date +%s)
python -m apps.quickstart
echo "::: took $(($(date +%s) - start)) s: python -m apps.quickstart"

if [[ $run_tests -eq 1 ]]; then
  echo "::: tests"
  start=$(date +%s)
  # `-c pyproject.toml`: the checkout's configuration although the package lies outside it;
  # `-p conftest`: the checkout's doctest names (`keras`, `np`, ...) for examples outside it;
  # `--collect-in-virtualenv`: the package's docstring examples lie inside the venv.
  python -m pytest -c pyproject.toml -p conftest --collect-in-virtualenv tests "$site" \
    --ignore="$site/baselines/tfmot_bridge.py"
  echo "::: took $(($(date +%s) - start)) s: pytest"
fi
echo "::: the wheel passed"

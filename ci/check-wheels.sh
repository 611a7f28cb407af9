#!/usr/bin/env bash
# What can be proven here about the wheels that .github/workflows/wheels.yml
# builds (Linux only; macOS and Windows wheels are built by cibuildwheel on
# their own runners):
#
#   1. cibuildwheel, with pyproject.toml's [tool.cibuildwheel], plans exactly
#      the intended builds for linux, macos and windows;
#   2. both workflows validate against the GitHub workflow schema;
#   3. (full run only) a release wheel for each CPython in $CHECK_PYTHONS,
#      linked by zig against glibc 2.17 (this machine's glibc is newer),
#      tagged manylinux2014 and confirmed by `auditwheel show`, passes the
#      whole pytest suite installed in a fresh venv outside the source tree;
#   4. (full run only) `pip install` of the sdist (`maturin sdist`) builds and
#      passes the echo tests.
#
# bash ci/check-wheels.sh          everything (about 10 minutes on 2 cores)
# bash ci/check-wheels.sh --quick  1 and 2 only (seconds; run by .ci/run)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

step() { printf '\n== wheels: %s\n' "$*"; }

quick=false
[ "${1:-}" = "--quick" ] && quick=true
python=${PYTHON:-python3}
work=$root/target/check-wheels
mkdir -p "$work"

step "tools (cibuildwheel, check-jsonschema, auditwheel, maturin, zig) in target/wheel-tools"
tools=$root/target/wheel-tools
[ -x "$tools/bin/python" ] || "$python" -m venv "$tools"
"$tools/bin/python" -m pip install --quiet --disable-pip-version-check \
    cibuildwheel==4.3.5 check-jsonschema==0.39.0 auditwheel==6.8.2 'maturin>=1.9.4,<2' \
    ziglang==0.17.1
export PATH=$tools/bin:$PATH # maturin --zig runs this venv's `python -m ziglang`

step "cibuildwheel plans exactly the intended builds"
versions="cp39 cp310 cp311 cp312 cp313 cp314 cp315"
expect() { for v in $versions; do for tag in "$@"; do echo "$v-$tag"; done; done | sort; }
check_plan() {
    local platform=$1
    shift
    local planned
    planned=$("$tools/bin/cibuildwheel" --print-build-identifiers --platform "$platform" | sort)
    if [ "$planned" != "$(expect "$@")" ]; then
        echo "cibuildwheel plans for $platform:" >&2
        diff <(expect "$@") <(echo "$planned") >&2 || true
        exit 1
    fi
    echo "$platform: $(echo "$planned" | wc -l) builds ($*)"
}
check_plan linux manylinux_x86_64 manylinux_aarch64 musllinux_x86_64
check_plan macos macosx_x86_64 macosx_arm64
check_plan windows win_amd64

step "workflows validate against the GitHub workflow schema"
"$tools/bin/check-jsonschema" --builtin-schema vendor.github-workflows .github/workflows/*.yml

$quick && exit 0

# Each CPython listed must be installed (pyenv's are used when present).
pythons=${CHECK_PYTHONS:-"3.9 3.11 3.13"}
find_python() {
    local v=$1 candidate
    for candidate in "$HOME"/.pyenv/versions/"$v".*/bin/python "$(command -v "python$v" || true)"; do
        [ -x "$candidate" ] && { echo "$candidate"; return; }
    done
    echo "no python$v found; set CHECK_PYTHONS" >&2
    return 1
}

# Runs the pytest suite from a copy of tests/ outside the source tree, so that
# only the installed package can be imported.
run_suite() {
    local venv=$1
    shift
    local copy
    copy=$(mktemp -d)
    cp -r tests "$copy/tests"
    cp pyproject.toml "$copy/" # pytest's settings: timeouts, warnings as errors
    (cd "$copy" && "$venv/bin/python" -c 'import rsepoll, sys; assert "site-packages" in rsepoll.__file__, rsepoll.__file__' &&
        "$venv/bin/python" -m pytest -p no:cacheprovider -q "$@" tests)
    rm -rf "$copy"
}

for v in $pythons; do
    py=$(find_python "$v")
    step "release wheel for CPython $v (manylinux2014), installed outside the tree"
    rm -rf "$work/wheels-$v"
    CARGO_TARGET_DIR=$root/target/release-wheels "$tools/bin/maturin" build --quiet --release \
        --zig --compatibility manylinux2014 -i "$py" --out "$work/wheels-$v"
    wheel=$(ls "$work/wheels-$v"/*.whl)
    echo "$(basename "$wheel")"
    case "$wheel" in *manylinux2014_x86_64*|*manylinux_2_17_x86_64*) ;; *)
        echo "not a manylinux2014 wheel: $wheel" >&2; exit 1 ;;
    esac
    "$tools/bin/auditwheel" show "$wheel" | tee "$work/auditwheel-$v.txt"
    grep -Eq 'is consistent with the following platform tag:\s*"?(manylinux_2_17_x86_64|manylinux2014_x86_64)' \
        <(tr '\n' ' ' <"$work/auditwheel-$v.txt" | tr -s ' ') || {
        echo "auditwheel does not confirm manylinux2014 for $wheel" >&2
        exit 1
    }
    venv=$work/venv-$v
    rm -rf "$venv"
    "$py" -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "$wheel" \
        'pytest>=8' 'pytest-timeout>=2.3' 'hypothesis>=6.100'
    RSEPOLL_BACKEND=epoll run_suite "$venv"
    RSEPOLL_BACKEND=portable run_suite "$venv"
done

step "the sdist builds with pip and passes the echo tests"
rm -rf "$work/sdist"
"$tools/bin/maturin" sdist --out "$work/sdist"
sdist=$(ls "$work"/sdist/*.tar.gz)
echo "$(basename "$sdist")"
py=$(find_python "$(echo "$pythons" | awk '{print $NF}')")
venv=$work/venv-sdist
rm -rf "$venv"
"$py" -m venv "$venv"
CARGO_TARGET_DIR=$root/target/sdist-build "$venv/bin/python" -m pip install --quiet \
    --disable-pip-version-check "$sdist" 'pytest>=8' 'pytest-timeout>=2.3' 'hypothesis>=6.100'
run_suite "$venv" -k "test_echo or test_platform"

step "all wheel checks passed"

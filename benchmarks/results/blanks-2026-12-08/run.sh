#!/bin/bash
# The runs of this folder (from the repository's root), 2026-12-08, server on CPU 0 and
# benchmarks/loadgen on CPU 1 (paired.py), CPython 3.11.7, uvloop 0.23.0.
#
# HEAD_WHEEL: an unzipped release wheel of 3b73eff (before blanks); NEW_WHEEL: one of d351465,
# which lands blanks for inline servers (src/blank.rs, src/python/blanks.rs); EXP_WHEEL: one of
# 3f96bc4 whose Running::inline_blanks also gave the first engine's stock to a threaded server
# when RSEPOLL_EXP_THREADED_BLANKS was set; FINAL_WHEEL: one of the commit that gives every
# engine a stock (threaded servers too); PATCH_WHEEL: 127fd3b with
# ../direct-2026-12-07/direct-into-bytes.patch applied, for comparison with its half-copy variant.
# Build each with `maturin build --release -i python3.11` and unzip the wheel.
set -euo pipefail
R=benchmarks/results/blanks-2026-12-08
P=benchmarks/results/inline-2026-12-07/experiments/paired.py
H=rsepoll-inline@$HEAD_WHEEL
N=rsepoll-inline@$NEW_WHEEL
K=RSEPOLL_EXP_DIRECT=1,RSEPOLL_EXP_HIDDEN=1,RSEPOLL_EXP_SPILL=131072,RSEPOLL_EXP_SHRINK_HALF=1,RSEPOLL_EXP_SHRINK_COPY=1
X=rsepoll-inline@$PATCH_WHEEL@$K,RSEPOLL_EXP_RECYCLE=1
run() { out=$1; shift; { date -u; uptime; python "$P" "$@"; date -u; uptime; } > "$R/$out" 2>&1; }
V="head=$H blanks=$N patch-half-copy=$X uvloop=uvloop"
run stream.txt stream 65536 10 10 $V
run rr-64k.txt rr 65536 10 8 $V
run rr-24k.txt rr 24576 10 8 $V
run rr-1k.txt rr 1024 10 6 head=$H blanks=$N uvloop=uvloop
# Earlier the same night, whether the objects must be reused at all: the patch's half-copy
# without RSEPOLL_EXP_RECYCLE makes a new 128 KiB object for every read (fresh-half-copy).
# head here was an unzipped release wheel of e0be8ea. In that configuration the patch also
# stocks every object a half-empty read was copied out of and never takes one back: a leak,
# small where most reads are large (these two files), all of it at rr 24 KiB (not kept).
Y=rsepoll-inline@$PATCH_WHEEL@$K
V="head=$H half-copy=$X fresh-half-copy=$Y uvloop=uvloop"
run no-reuse-stream.txt stream 65536 10 8 $V
run no-reuse-rr-64k.txt rr 65536 10 6 $V

# Then with an I/O thread: the experiment (threaded-experiment-*), and the final build against
# head, threaded and inline (final-*); rr 1 KiB x 100 is the threaded no-regression cell, run
# twice.
T=rsepoll-threaded
V="head-threaded=$T@$HEAD_WHEEL new-threaded=$T@$EXP_WHEEL blanks-threaded=$T@$EXP_WHEEL@RSEPOLL_EXP_THREADED_BLANKS=1 uvloop=uvloop"
run threaded-experiment-stream.txt stream 65536 10 8 $V
run threaded-experiment-rr-64k.txt rr 65536 10 6 $V
V="head=$T@$HEAD_WHEEL blanks=$T@$FINAL_WHEEL uvloop=uvloop"
run final-threaded-stream.txt stream 65536 10 8 $V
run final-threaded-rr-64k.txt rr 65536 10 6 $V
run final-threaded-rr-1k.txt rr 1024 100 6 $V
V="head=rsepoll-inline@$HEAD_WHEEL blanks=rsepoll-inline@$FINAL_WHEEL uvloop=uvloop"
run final-inline-stream.txt stream 65536 10 6 $V
run final-threaded-rr-1k-again.txt rr 1024 100 10 head=$T@$HEAD_WHEEL blanks=$T@$FINAL_WHEEL
run final-threaded-rr-1k-third.txt rr 1024 100 12 head=$T@$HEAD_WHEEL inline-only=$T@$EXP_WHEEL blanks=$T@$FINAL_WHEEL
# Last, LAST_WHEEL: a build of c1840e2 (the cap on blanks out, and the boxes reused), 02:36 UTC.
run last-threaded-stream.txt stream 65536 10 6 head=$T@$HEAD_WHEEL blanks=$T@$LAST_WHEEL uvloop=uvloop
run last-inline-rr-64k.txt rr 65536 10 6 head=rsepoll-inline@$HEAD_WHEEL blanks=rsepoll-inline@$LAST_WHEEL uvloop=uvloop

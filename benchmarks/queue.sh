#!/usr/bin/env bash
# The queued H200 calls of benchmarks/mosaic_notes.md, one short call each (a machine that stops
# answering returns nothing, so no call runs past ~330 s). Output: $OUT/<call>.log (+ JSON).
#
#   bash benchmarks/queue.sh c1     # small compiled (H100 s11 ran 15 of 21), m1 and the register split on the H200, FLA
#   bash benchmarks/queue.sh k1     # ptxas of the overlap variants, NaN bits, the wide loop at 4x8192
#   bash benchmarks/queue.sh k2     # the persistent options at 128x256, whole prefills with FLA
#   bash benchmarks/queue.sh j1     # the split at tensor-parallel head counts, the dispatch probe
#   bash benchmarks/queue.sh t1     # the triton split and its scan kernel
#   bash benchmarks/queue.sh j2     # s13: the split at HV = 16 and 32 on one long prompt (FlashInfer 0.438 / 0.755 ms)
#   bash benchmarks/queue.sh b1     # gdn bench --qk-l2norm (the serving configuration) with the peers
#   bash benchmarks/queue.sh n1     # s12: use_qk_l2norm's norms from the intra kernel (opt-in), compiled + timed
#   bash benchmarks/queue.sh fi1    # FlashInfer's bundle, part 1 (carry .fib/part1): copied to /tmp
#   bash benchmarks/queue.sh p1     # FlashInfer unpacked (carry .fib/part2, < 30 s after fi1), then gdn bench
#                                   # 16/32, every layout, with FLA, FlashInfer, jax-linear-attention
#   bash benchmarks/queue.sh p2     # the same peers at H/HV 16/48, 16/16, 16/64 (4x8192, 1x32768)
#   bash benchmarks/queue.sh p3     # after fi1 (FlashInfer unpacked like p1): the jitted rows with the device plan
#                                   # (the bucket policy of s13) and the host plan (jax:mosaic_gpu:host), the peers
#   bash benchmarks/queue.sh h1     # s13, UNTIMED: the wide loop's runtime mode (loop_halves) under jit vs the
#                                   # narrow loop the floor bucket runs now, and the wide one, with FLA
#   bash benchmarks/queue.sh l1     # s14: mosaic_gpu's 300k-token one call vs three chained, no host sync
#   bash benchmarks/queue.sh s1     # s14, UNTIMED: the split under jit (traced plan) at TP heads vs the host plan's, FLA
#   bash benchmarks/queue.sh s2     # s17: the split under jit at 1x8192 (2/4, 4/8) after the bucket lost pieces of 8
#   bash benchmarks/queue.sh hp     # s14: where an eager prefill's host time goes (0.45-0.56 ms in s13's bench)
#   bash benchmarks/queue.sh z2     # s15, ~160 s for a scarce machine: the split under jit at 2/4 (its first GPU
#                                   # run), then the jitted 4x8192 row (s14's loop pick), with FLA
#   bash benchmarks/queue.sh w1     # s15/s16 (ran on an H100 in s16; owed on the H200): the intra kernel's diagonal
#                                   # blocks in registers (solve="warp"): float64 stages, NaN isolation compiled,
#                                   # alone; whole prefills with it, 3 warpgroups per intra CTA and fused_wide, FLA
#   bash benchmarks/queue.sh m1     # s17: the wide loop alone: P's mask by one compare (default) vs three, and
#                                   # loop_overlap="store", at 4x8192 and 128x256 (persistent); ran on an H100 in s17
#   bash benchmarks/queue.sh q1     # s18: the split's scan kernel over its launch options (num_stages), and
#                                   # split_trace after the tables became one-fusion sums (2/4 1x32768, 4/8 1x8192)
#   bash benchmarks/queue.sh q7     # s18 (ran in s19): the scan kernel on S^T (mma.sync, not wgmma) against the walk on S
#   bash benchmarks/queue.sh q8     # s19: the scan on S^T (default) and on S, then s1 with FLA
#   bash benchmarks/queue.sh q11    # s19: the wide loop's in-kernel profile on the persistent grid (8x256: where
#                                   # an item's ~10 us beyond its tiles go), P's zero arm (opaque vs constant)
#                                   # on the loop alone at 4x8192, then s1 (the scan on S^T) with FLA
#   bash benchmarks/queue.sh q12    # s19: the persistent wide loop with each item's h0 staged in SMEM an item ahead
#                                   # (2 stages) vs the L2 prefetch (3 stages, and 2 as a control), loop alone
#                                   # at 128x256 and mix; its NaN isolation compiled
#   bash benchmarks/queue.sh q13    # s19: h0 staged vs L2 prefetch at 256x128, 64x512, 32x1024 (loop alone), then
#                                   # gdn bench 16/32 (128x256, mix, 4x8192) with FLA under the new policy
#   (q14, s19: the final state out through the h0 staging, timed and dropped: mosaic_notes session 19)
#   bash benchmarks/queue.sh r1     # s20: fused_wide_mma (the intra work in the wide loop's prep warpgroup on 16-column
#                                   # slabs by mma.sync) against float64 compiled, then timed beside the default, FLA
#   bash benchmarks/queue.sh r2     # s20 (NOT yet run): the slab intra work's step prefixes alone (slab_micro --upto),
#                                   # free registers and at the wide loop's budget
#   bash benchmarks/queue.sh u1     # s21 (ran on an H100): the wide loop with loop_overlap="update" (the output stored
#                                   # in the state update's shadow) alone and whole, on the H200, FLA
#   bash benchmarks/queue.sh d1     # s21, UNTIMED: direct_out (whole output tiles from registers to global memory, no
#                                   # SMEM / fence / barrier / TMA on the state chain): bits vs the plain loop and the
#                                   # loop alone at 4x8192, 8x4096, 128x256, mix; whole prefills with it, FLA
#   bash benchmarks/queue.sh e1     # s22 (ran on an H100: slower): out_store="warp" (each warp's output slab through its own SMEM, only
#                                   # bar.warp.sync, 16-byte stores): NaN isolation compiled, bits and the loop alone,
#                                   # whole prefills with FLA
#   (k5, s23: the intra kernel's v heads in pairs, head_loop="pair", slower on the H200; removed in s24,
#    commit 84517f4 has it)
#   (g1 / g2, s24: the wide loop's state warpgroups issuing their products in turns, loop_order "pingpong" /
#    "pingpong12", ran on an H100 and measured within noise; removed, commit 297743c has them: mosaic_notes s24)
#   (nw1, s25: the narrow loop with -W formed a tile ahead, loop_w_ahead, ran on an H100: 1.95x slower at
#    1x32768; removed, commit 247619f has it and its check section: mosaic_notes session 25)
#   bash benchmarks/queue.sh ab1    # s25, UNTIMED: the narrow loop's ablations at 1x32768 (which piece of its chain, or
#                                   # the output warpgroup, sets ~1.55 us a tile), then the stream probe's control edge
#   (rg1-rg6, s26, ran on an H100: the narrow loop's whole output tiles from registers and o's products in
#    one group, both slower at 1x32768, removed, commit 8bf6841 has them; P on half the tiles: mosaic_notes s26)
#   (op1, s26, ran on an H100: the narrow loop with two output warpgroups taking turns, loop_out_pair, the
#    same bits and slower; removed, commit e477fd9 has it: mosaic_notes session 26)
#   bash benchmarks/queue.sh ab2    # s26, the profile UNTIMED: the narrow loop's ablations at 1x32768 (store_tma,
#                                   # store_wait, p, o_mm, p_half among them), then the loop alone under the
#                                   # in-kernel profiler at 1x2048 plain and without P / o's products / the output
#                                   # warpgroup (benchmarks/loop_profile.py; the state chain's products in scopes)
#   bash benchmarks/queue.sh cr1    # s27, UNTIMED: the co-resident kernel (variant="coresident": intra workers on the
#                                   # SMs the narrow loop leaves idle, one launch): the same bits as two kernels on
#                                   # alternating inputs (and a no-wait control that must differ), NaN isolation,
#                                   # then whole prefills at 1x32768 and 1x8192 against the default, with FLA
#   bash benchmarks/queue.sh cr4    # s27: gdn bench rows on one prompt (16/32, 16/16; jitted and host plan, the
#                                   # latter now the co-resident kernel by default), with FLA and jla; then two
#                                   # prompts under jit beside workers sized for one (coresident_seqs=1)
#   bash benchmarks/queue.sh cr5    # s27, cr4 cut for a short budget: gdn bench at 16/32, 1x32768 and 1x8192, FLA
#   bash benchmarks/queue.sh s28a   # s28: P from the co-resident workers (coresident_p): the flags compiled, NaN
#                                   # isolation, timed beside the co-resident default and its 2 workers a CTA, with FLA
#   bash benchmarks/queue.sh s29    # s29: s29a below plus the FlashInfer bundle's first half to /tmp (carry .fib/part1)
#   bash benchmarks/queue.sh s29c   # s29 (for an H200): loop_pm at 1x32768, the co-resident kernel with and without
#                                   # P whole at 1x32768 and 1x8192 with FLA; FlashInfer's first half to /tmp
#   bash benchmarks/queue.sh s30a   # s30 (NOT RUN: no machine lent): flag_lag=1 and p_together in loop_pm and whole prefills, s29e (use_qk_l2norm without / with P),
#                                   # the co-resident bits with the lag; FlashInfer part 1 to /tmp (carry .fib/part1)
#   bash benchmarks/queue.sh s31    # s31, s30a/s30b cut to one ~8 min call (1,109 s of device time left after failed starts):
#                                   # whole prefills with the lag / together options and use_qk_l2norm +- P, FLA; the lag's
#                                   # compiled bits; the workers' profile without / with P
#   bash benchmarks/queue.sh s30b   # s30 (NOT RUN): gdn bench 16/32, issue 6's layouts, every peer (carry .fib/part2; after s30a,
#                                   # same machine); the workers' code profiled without / with P; the eager call's host time (hp)
#   bash benchmarks/queue.sh s29e   # s29, NOT RUN (device time spent): use_qk_l2norm on one prompt, co-resident without / with P
#   bash benchmarks/queue.sh s29b   # s29: gdn bench 16/32 with every peer (carry .fib/part2; after s29 on the same machine)
#   bash benchmarks/queue.sh s29a   # s28 (run as s29 in session 29): coresident_p taken apart (the narrow loop alone with / without
#                                   # P in the ring, at 2 stages; the intra kernel with / without P), then the
#                                   # long-first default (host plan) at 28672+4096 and 4096+28672, with FLA
#   bash benchmarks/queue.sh s28    # s28: the no-sync checks (transfer_guard, sync detector) on one prompt (the
#                                   # co-resident kernel) and five sequences; gdn bench 16/32 and 16/16 at 1x32768,
#                                   # 28672+4096, 1x8192 (FLA, jla, FlashInfer if unpacked by fi1); the split vs the
#                                   # co-resident kernel at 16/16; two prompts beside workers sized for one
#   bash benchmarks/queue.sh v1     # s13: gdn bench rows (jitted, device plan) after the traced-plan grid
#                                   # policy and the intra norms by default, with FLA
#
# FLA comes from wheels in .whl/ (see GPU.md), installed into /tmp/peers.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/queue}
mkdir -p "$OUT"
export PYTHONPATH=$PWD XLA_PYTHON_CLIENT_PREALLOCATE=false FLA_FLASH_QLA=0
unset TRITON_INTERPRET JAX_PLATFORMS
if compgen -G ".whl/*.whl" > /dev/null && [ ! -d /tmp/peers/fla ]; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/peers .whl/*.whl
fi
export PYTHONPATH=$PYTHONPATH:/tmp/peers
M="python3 tests/gpu/mosaic_gpu_check.py --out $OUT"
call=${1:?usage: queue.sh CALL}
case $call in
  c1) timeout -s INT 330 $M --only env,small,time --tag c1 \
        --shapes 4x8192,4x8184,1x32760 --variants default,wide_r104,l2norm,l2norm_xla --fla-shapes 4x8192 ;;
  k1) timeout -s INT 290 $M --only ptxas,nan,loops --tag k1 \
        --variants wide,wide_overlap,narrow,narrow_overlap --ptxas-lens 256,256,256,256 \
        --nan-names persistent_prefetch_wide,overlap_wide,persistent_overlap_wide,overlap_narrow \
        --loop-shapes 4x8192 --loop-variants one_per_item,overlap,overlap_no_prep,overlap_store_only ;;
  k2) timeout -s INT 290 $M --only loops,time --tag k2 --loop-shapes 128x256 \
        --loop-variants order,table,table_pf,order_overlap,table_pf_overlap \
        --variants default,overlap --shapes 4x8192,1x32768,4x8192_HV48 --fla-shapes 4x8192 ;;
  j1) timeout -s INT 250 $M --only split --split-no-f64 --tag j1 \
        --split-shapes 1x32768_tp8,1x32768_tp4,1x8192_tp8
      timeout -s INT 60 python3 tests/gpu/dispatch_probe.py ;;
  j2) timeout -s INT 280 $M --only split --split-no-f64 --tag j2 --split-shapes 1x32768_HV16,1x8192_tp8,1x32768 ;;
  n1) timeout -s INT 200 $M --only small,time --tag n1 --small-names l2norm \
        --shapes 4x8192,4x8192_HV16,128x256 --variants default,l2norm,l2norm_intra_norms --fla-shapes 4x8192 ;;
  n0) timeout -s INT 140 $M --only small,time --tag n0 --small-names xla_norms \
        --shapes 4x8192 --variants l2norm,l2norm_xla_norms --fla-shapes none ;;  # n1 cut to ~140 s
  b1) GDN_BUDGET_S=280 GDN_BENCH_IMPLS="fla flashinfer jla jax:mosaic_gpu" OUT=$OUT/b1 \
        GDN_BENCH_ARGS="--qk-l2norm --no-profile --layouts 4x8192,128x256,1x32768,mix" \
        bash benchmarks/h200.sh bench 16/32 ;;  # the serving configuration against the peers
  fi1) cp .fib/part1/fisite.part.aa /tmp/ && ls -la /tmp/fisite.part.aa ;;
  p1) if [ ! -d /tmp/fisite/flashinfer ]; then
        cat /tmp/fisite.part.aa .fib/part2/fisite.part.ab | xz -d | (mkdir -p /tmp/fisite && tar -x -C /tmp/fisite)
      fi
      GDN_BUDGET_S=300 GDN_BENCH_IMPLS="fla flashinfer jla jax:mosaic_gpu" OUT=$OUT/p1 \
        GDN_BENCH_ARGS="--no-profile" bash benchmarks/h200.sh bench 16/32 ;;
  p3) if [ ! -d /tmp/fisite/flashinfer ]; then
        cat /tmp/fisite.part.aa .fib/part2/fisite.part.ab | xz -d | (mkdir -p /tmp/fisite && tar -x -C /tmp/fisite)
      fi
      GDN_BUDGET_S=300 GDN_BENCH_IMPLS="fla flashinfer jla jax:mosaic_gpu jax:mosaic_gpu:host" OUT=$OUT/p3 \
        GDN_BENCH_ARGS="--no-profile --layouts 4x8192,8x4096,2048x4,128x256,mix,1x32768,1x8192" bash benchmarks/h200.sh bench 16/32 ;;
  p2) GDN_BUDGET_S=300 GDN_BENCH_IMPLS="fla flashinfer jla jax:mosaic_gpu" OUT=$OUT/p2 \
        GDN_BENCH_ARGS="--no-profile --layouts 4x8192,1x32768" bash benchmarks/h200.sh bench 16/48 16/16 16/64 ;;
  h1) timeout -s INT 300 $M --only time --tag h1 --shapes 1x32768,4x8192,1x8192,8x4096 \
        --variants jit,jit_halves,jit_wide,default --fla-shapes 4x8192 ;;
  v1) GDN_BUDGET_S=150 GDN_BENCH_IMPLS="fla jax:mosaic_gpu" OUT=$OUT/v1 \
        GDN_BENCH_ARGS="--no-profile --layouts 128x256,mix,4x8192,1x32768" bash benchmarks/h200.sh bench 16/32
      GDN_BUDGET_S=70 GDN_BENCH_IMPLS="fla jax:mosaic_gpu" OUT=$OUT/v1l \
        GDN_BENCH_ARGS="--qk-l2norm --no-profile --layouts 4x8192" bash benchmarks/h200.sh bench 16/32
      GDN_BUDGET_S=70 GDN_BENCH_IMPLS="jax:mosaic_gpu jax:mosaic_gpu:split" OUT=$OUT/v1s \
        GDN_BENCH_ARGS="--no-profile --layouts 1x32768" bash benchmarks/h200.sh bench 16/16 ;;
  ab1) timeout -s INT 200 $M --only ablate --tag ab1 --ablate-loop narrow --ablate-lens 32768
      timeout -s INT 120 python3 benchmarks/stream_probe.py --out $OUT/ab1s \
        --only "loop,intra_all,loop+intra_all,ctrl:loop_o_stream1+intra_all" ;;
  ab2) timeout -s INT 200 $M --only ablate --tag ab2a --ablate-loop narrow --ablate-lens 32768
      timeout -s INT 240 python3 benchmarks/loop_profile.py --out $OUT/ab2p --lens 2048 --ablate none,p,o_mm,out ;;
  t1) timeout -s INT 280 python3 tests/gpu/triton_gpu_check.py exact_split ;;
  l1) timeout -s INT 240 python3 tests/gpu/jax_gpu_check.py --impls mosaic_gpu --skip edges,timings,stages \
        --json "$OUT/l1.json" ;;
  s1) GDN_BUDGET_S=250 GDN_BENCH_IMPLS="fla jax:mosaic_gpu jax:mosaic_gpu:host" OUT=$OUT/s1 \
        GDN_BENCH_ARGS="--no-profile --layouts 1x32768,1x8192" bash benchmarks/h200.sh bench 2/4 4/8 ;;
  s2) GDN_BUDGET_S=150 GDN_BENCH_IMPLS="fla jax:mosaic_gpu jax:mosaic_gpu:host" OUT=$OUT/s2 \
        GDN_BENCH_ARGS="--no-profile --layouts 1x8192" bash benchmarks/h200.sh bench 2/4 4/8 ;;
  z2) GDN_BUDGET_S=95 GDN_BENCH_IMPLS="fla jax:mosaic_gpu jax:mosaic_gpu:host" OUT=$OUT/z2s \
        GDN_BENCH_ARGS="--no-profile --layouts 1x32768" bash benchmarks/h200.sh bench 2/4
      GDN_BUDGET_S=60 GDN_BENCH_IMPLS="fla jax:mosaic_gpu" OUT=$OUT/z2 \
        GDN_BENCH_ARGS="--no-profile --layouts 4x8192" bash benchmarks/h200.sh bench 16/32 ;;
  w1) timeout -s INT 290 $M --only intra_cmp,time --tag w1 --intra-cmp default,warp \
        --shapes 4x8192,128x256 --variants default,intra_warp,intra_wg3,fused_wide --fla-shapes 4x8192 ;;
  m1) timeout -s INT 150 $M --only loops --tag m1a --loop-shapes 4x8192 --loop-variants one_per_item,mask3,store
      timeout -s INT 150 $M --only loops --tag m1b --loop-shapes 128x256 \
        --loop-variants table_pf,table_pf_mask3,table_pf_store ;;
  q1) timeout -s INT 170 python3 benchmarks/scan_sweep.py --cases 2/4:32768,4/8:32768,4/8:8192
      timeout -s INT 120 python3 benchmarks/split_trace.py --heads 2/4 --lens 32768
      timeout -s INT 100 python3 benchmarks/split_trace.py --heads 4/8 --lens 8192 ;;
  q7) timeout -s INT 150 python3 benchmarks/scan_sweep.py --cases 2/4:32768,4/8:8192 \
        --variants s,default,w4_stages1,bv32_stages1,tf32,bf16x3 ;;  # (s18's names: stages1,t,t_w4,t_bv32,t_tf32,bf16x3 on S)
  q8) timeout -s INT 120 python3 benchmarks/scan_sweep.py --cases 2/4:32768,4/8:32768,4/8:8192 \
        --variants default,s
      GDN_BUDGET_S=250 GDN_BENCH_IMPLS="fla jax:mosaic_gpu jax:mosaic_gpu:host" OUT=$OUT/s1 \
        GDN_BENCH_ARGS="--no-profile --layouts 1x32768,1x8192" bash benchmarks/h200.sh bench 2/4 4/8 ;;
  q11) timeout -s INT 150 $M --only profile --tag q11p --profile-lens 256,256,256,256,256,256,256,256
      timeout -s INT 130 $M --only loops --tag q11l --loop-shapes 4x8192 --loop-variants one_per_item,zero_const
      GDN_BUDGET_S=230 GDN_BENCH_IMPLS="fla jax:mosaic_gpu jax:mosaic_gpu:host" OUT=$OUT/s1 \
        GDN_BENCH_ARGS="--no-profile --layouts 1x32768,1x8192" bash benchmarks/h200.sh bench 2/4 4/8 ;;
  q12) timeout -s INT 100 $M --only nan --tag q12n --nan-names persistent_h0smem_wide
      timeout -s INT 200 $M --only loops --tag q12l --loop-shapes 128x256,mix \
        --loop-variants table_pf,table_pf_s2,table_h0smem ;;
  q13) timeout -s INT 150 $M --only loops --tag q13l --loop-shapes 256x128,64x512,32x1024 \
        --loop-variants table_pf,table_h0smem
      GDN_BUDGET_S=170 GDN_BENCH_IMPLS="fla jax:mosaic_gpu jax:mosaic_gpu:host" OUT=$OUT/b16 \
        GDN_BENCH_ARGS="--no-profile --layouts 128x256,mix,4x8192" bash benchmarks/h200.sh bench 16/32 ;;
  r1) timeout -s INT 150 $M --only env,small,ptxas --tag r1s --small-names fused_wide_mma,varlen_G2 \
        --variants fused_wide_mma
      timeout -s INT 200 $M --only time --tag r1t --shapes 4x8192,128x256 \
        --variants default,fused_wide_mma --fla-shapes 4x8192 ;;
  r2) timeout -s INT 150 python3 benchmarks/slab_micro.py --iters 256 --ctas-per-sm 1 --upto a,solve,merge,store
      timeout -s INT 150 python3 benchmarks/slab_micro.py --iters 256 --ctas-per-sm 1 --regs 88,208 \
        --upto a,solve,merge,store ;;
  u1) timeout -s INT 150 $M --only loops --tag u1a --loop-shapes 4x8192,8x4096 --loop-variants one_per_item,update
      timeout -s INT 120 $M --only loops --tag u1b --loop-shapes 128x256 --loop-variants table_h0smem,table_h0smem_update
      timeout -s INT 150 $M --only time --tag u1t --shapes 4x8192,128x256 --variants default,update --fla-shapes 4x8192 ;;
  d1) timeout -s INT 120 $M --only nan --tag d1n --nan-names direct_out_wide,persistent_direct_out_wide,update_wide
      timeout -s INT 150 $M --only loops --tag d1a --loop-shapes 4x8192,8x4096 --loop-variants one_per_item,update,direct_out
      timeout -s INT 150 $M --only loops --tag d1b --loop-shapes 128x256,mix --loop-variants table_h0smem,table_h0smem_direct_out
      timeout -s INT 200 $M --only time --tag d1t --shapes 4x8192,128x256,8x4096 --variants default,direct_out \
        --fla-shapes 4x8192 ;;
  e1) timeout -s INT 120 $M --only nan --tag e1n --nan-names warp_out_wide,persistent_warp_out_wide
      timeout -s INT 150 $M --only loops --tag e1a --loop-shapes 4x8192,8x4096 --loop-variants one_per_item,update,warp_out
      timeout -s INT 150 $M --only loops --tag e1b --loop-shapes 128x256,mix --loop-variants table_h0smem,table_h0smem_warp_out
      timeout -s INT 170 $M --only time --tag e1t --shapes 4x8192,128x256,8x4096 --variants default,warp_out \
        --fla-shapes 4x8192 ;;
  cr1) timeout -s INT 200 $M --only coresident --tag cr1c
      timeout -s INT 100 $M --only nan --tag cr1n --nan-names coresident,coresident_w2
      timeout -s INT 200 $M --only time --tag cr1t --shapes 1x32768,1x8192 --variants default,coresident,coresident_w2 \
        --fla-shapes 1x32768,1x8192 ;;
  cr5) GDN_BUDGET_S=130 GDN_BENCH_IMPLS="fla jax:mosaic_gpu jax:mosaic_gpu:host" OUT=$OUT/cr5 \
        GDN_BENCH_ARGS="--no-profile --layouts 1x32768,1x8192" bash benchmarks/h200.sh bench 16/32 ;;
  cr4) GDN_BUDGET_S=170 GDN_BENCH_IMPLS="fla jla jax:mosaic_gpu jax:mosaic_gpu:host" OUT=$OUT/cr4 \
        GDN_BENCH_ARGS="--no-profile --layouts 1x32768,1x8192" bash benchmarks/h200.sh bench 16/32 16/16
      timeout -s INT 120 $M --only time --tag cr4t --shapes 28672+4096,2x16384 --variants traced,coresident_traced1 \
        --fla-shapes none ;;
  s28a) cp .fib/part1/fisite.part.aa /tmp/ 2>/dev/null
      timeout -s INT 180 $M --only coresident --tag s28c --coresident-layouts 1x32768,1x8192
      timeout -s INT 90 $M --only nan --tag s28n --nan-names coresident_p,coresident_w2
      timeout -s INT 220 $M --only time --tag s28t --shapes 1x32768,1x8192 \
        --variants coresident,coresident_w2,coresident_p --fla-shapes 1x32768,1x8192 ;;
  s29) cp .fib/part1/fisite.part.aa /tmp/ 2>/dev/null; nvidia-smi --query-gpu=name --format=csv,noheader
      timeout -s INT 170 $M --only loop_pm --tag s29l --ablate-lens 32768
      timeout -s INT 120 $M --only loop_pm --tag s29m --ablate-lens 8192
      timeout -s INT 200 $M --only time --tag s29t --shapes 28672+4096,4096+28672 --variants default,two_kernels \
        --fla-shapes 28672+4096 ;;
  s29c) cp .fib/part1/fisite.part.aa /tmp/ 2>/dev/null; nvidia-smi --query-gpu=name --format=csv,noheader
      timeout -s INT 170 $M --only loop_pm --tag s29l --ablate-lens 32768
      timeout -s INT 170 $M --only time --tag s29u --shapes 1x32768,1x8192 --variants coresident,coresident_p \
        --fla-shapes 1x32768 ;;
  s30a) cp .fib/part1/fisite.part.aa /tmp/ 2>/dev/null; nvidia-smi --query-gpu=name --format=csv,noheader
      timeout -s INT 170 $M --only loop_pm --tag s30l --ablate-lens 32768
      timeout -s INT 220 $M --only time --tag s30t --shapes 1x32768,1x8192 --fla-shapes 1x32768 \
        --variants coresident_p,coresident_p_lag,coresident_p_tog,coresident_p_tog_lag,l2norm_coresident,l2norm_coresident_p,l2norm_coresident_p_lag
      timeout -s INT 150 $M --only coresident --tag s30c --coresident-layouts 1x32768 ;;
  s31) nvidia-smi --query-gpu=name --format=csv,noheader
      timeout -s INT 200 $M --only time --tag s31t --shapes 1x32768,1x8192 --fla-shapes 1x32768 \
        --variants coresident_p,coresident_p_lag,coresident_p_tog,coresident_p_tog_lag,l2norm_coresident,l2norm_coresident_p
      timeout -s INT 130 $M --only coresident --tag s31c --coresident-layouts 1x32768
      timeout -s INT 130 $M --only profile_intra --tag s31p ;;
  s30b) if [ ! -d /tmp/fisite/flashinfer ] && [ -f /tmp/fisite.part.aa ]; then
        cat /tmp/fisite.part.aa .fib/part2/fisite.part.ab | xz -d | (mkdir -p /tmp/fisite && tar -x -C /tmp/fisite)
      fi
      GDN_BUDGET_S=300 GDN_BENCH_IMPLS="fla flashinfer jla jax:mosaic_gpu jax:mosaic_gpu:host" OUT=$OUT/s30b \
        GDN_BENCH_ARGS="--no-profile --layouts 1x32768,28672+4096,1x8192,2048x4" \
        bash benchmarks/h200.sh bench 16/32
      # where the workers' P costs them (the intra kernel alone, 2 warpgroups a CTA, profiled at 1x2048)
      timeout -s INT 150 $M --only profile_intra --tag s30p
      # the eager call's host time (s29's bench: 0.70-0.89 ms a call, session 14's hp 0.31-0.32)
      timeout -s INT 100 python3 tests/gpu/host_profile.py --layouts 2048x4,1x8192 --calls 50 ;;
  s29e) timeout -s INT 190 $M --only time --tag s29e --shapes 1x32768,1x8192 \
        --variants l2norm_coresident,l2norm_coresident_p --fla-shapes none ;;
  s29b) if [ ! -d /tmp/fisite/flashinfer ] && [ -f /tmp/fisite.part.aa ]; then
        cat /tmp/fisite.part.aa .fib/part2/fisite.part.ab | xz -d | (mkdir -p /tmp/fisite && tar -x -C /tmp/fisite)
      fi
      GDN_BUDGET_S=330 GDN_BENCH_IMPLS="fla flashinfer jla jax:mosaic_gpu jax:mosaic_gpu:host" OUT=$OUT/s29b \
        GDN_BENCH_ARGS="--no-profile --layouts 4x8192,1x32768,28672+4096,1x8192,2048x4,128x256,mix,8x4096" \
        bash benchmarks/h200.sh bench 16/32 ;;
  s29a) timeout -s INT 200 $M --only loop_pm --tag s29l --ablate-lens 32768
      timeout -s INT 150 $M --only loop_pm --tag s29m --ablate-lens 8192
      timeout -s INT 200 $M --only time --tag s29t --shapes 28672+4096,4096+28672 --variants default,two_kernels \
        --fla-shapes 28672+4096 ;;
  s28) timeout -s INT 150 python3 tests/gpu/jax_gpu_check.py --impls mosaic_gpu --skip edges,timings,stages,long \
        --json "$OUT/s28sync.json"
      if [ -f /tmp/fisite.part.aa ] && [ -d .fib/part2 ] && [ ! -d /tmp/fisite/flashinfer ]; then
        cat /tmp/fisite.part.aa .fib/part2/fisite.part.ab | xz -d | (mkdir -p /tmp/fisite && tar -x -C /tmp/fisite)
      fi
      IMPLS="fla jla jax:mosaic_gpu jax:mosaic_gpu:host"
      [ -d /tmp/fisite/flashinfer ] && IMPLS="fla flashinfer jla jax:mosaic_gpu jax:mosaic_gpu:host"
      GDN_BUDGET_S=180 GDN_BENCH_IMPLS="$IMPLS" OUT=$OUT/s28b \
        GDN_BENCH_ARGS="--no-profile --layouts 1x32768,28672+4096,1x8192" bash benchmarks/h200.sh bench 16/32 16/16
      timeout -s INT 120 $M --only split --split-no-f64 --tag s28s --split-shapes 1x32768_HV16
      timeout -s INT 90 $M --only time --tag s28p --shapes 28672+4096,2x16384 --variants traced,coresident_traced1 \
        --fla-shapes none ;;
  hp) timeout -s INT 200 python3 tests/gpu/host_profile.py --layouts 4x8192,2048x4 --calls 100 ;;
  *) echo "unknown call $call" >&2; exit 2 ;;
esac 2>&1 | tee "$OUT/$call.log" | tail -n 60

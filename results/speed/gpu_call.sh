#!/usr/bin/env bash
# One device call for the speed table (results/speed/README.md), each part time-boxed so a slow
# part cannot take the others' time: the compiled step profile at the paper's size (32K tokens as
# one micro-batch of 128; the eager one is profile_paper_b128_h100.txt) and the grouped matmuls'
# weight layouts, bench's models section per block, and the CUDA tests of the graphed train step
# (graphed and compiled+graphed against eager across reclusters).
# usage: cp results/speed/gpu_call.sh .carry/speed.sh; bash .carry/speed.sh <profile_s> <block256_s> <block1024_s> <tests_s> <batch> <modes>
#   e.g. bash .carry/speed.sh 100 150 150 120 128 graphed,compiled+graphed   (carry: [".carry"])
# A part given 0 seconds is skipped (timeout 0 would mean no limit at all).
set -u
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee $OUT/gpu.txt
python -c "import torch; print(torch.__version__)" | tee -a $OUT/gpu.txt
part() { [ "$1" != 0 ]; }
if part $1; then
  timeout $1 python -m results.speed.step_profile paper dense,topk,clustered --batch_size=128 --compile > $OUT/profile_b128_compiled.txt 2>&1; echo "rc=$?" >> $OUT/profile_b128_compiled.txt
  timeout $1 python -m results.speed.grouped_layout paper 32768 20 > $OUT/grouped_layout.txt 2>&1; echo "rc=$?" >> $OUT/grouped_layout.txt
fi
for b in 256 1024; do
  [ $b = 256 ] && T=$2 || T=$3
  part $T || continue
  timeout $T python bench.py --sections=models --preset=paper --batch_size=$5 --model_blocks=$b --model_modes=$6 \
    --repeats=8 --warmup=3 --out_dir=/tmp/bm$b > $OUT/models$b.txt 2>&1; echo "rc=$?" >> $OUT/models$b.txt
done
if part $4; then
  timeout $4 python -m pytest -q -rs tests/test_train_graph.py > $OUT/graph_tests.txt 2>&1; echo "rc=$?" >> $OUT/graph_tests.txt
fi

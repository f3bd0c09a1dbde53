#!/usr/bin/env bash
# issue 30 call: the step profile, then the models section per block; each part time-boxed
# usage: bash .carry/speed.sh <profile_s> <block256_s> <block1024_s> <batch> <modes>
set -u
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee $OUT/gpu.txt
python -c "import torch; print(torch.__version__)" | tee -a $OUT/gpu.txt
timeout $1 python -m results.speed.step_profile paper dense,topk > $OUT/profile.txt 2>&1; echo "rc=$?" >> $OUT/profile.txt
for b in 256 1024; do
  [ $b = 256 ] && T=$2 || T=$3
  timeout $T python bench.py --sections=models --preset=paper --batch_size=$4 --model_blocks=$b --model_modes=$5 --repeats=8 --warmup=3 --out_dir=/tmp/bm$b > $OUT/models$b.txt 2>&1; echo "rc=$?" >> $OUT/models$b.txt
done

#!/usr/bin/env bash
# One device call of the paper section (results/paper/README.md): unpacks the prepared
# enwiki-00+01 tokens carried in .carry/enwiki to /tmp, runs bench.py --sections=paper with a
# time limit, and leaves in $OUT the kept runs (kept.tgz: extract it into the repository before
# the next call, which reads them to skip what is done), the printed table and the GPU's name.
# Set up: mkdir -p .carry/enwiki .carry/glue && cp ../shared/data/enwiki-00+01-tokens/* .carry/enwiki/
#         && cp -r ../shared/data/glue/{CoLA,SST-2,STS-B} .carry/glue/   (carry: [".carry"])
# usage: bash results/paper/gpu_call.sh <timeout_s> <runs at once on 80 GB> <on 141 GB> [bench flags...]
#    or: bash results/paper/gpu_call.sh modes <timeout_s> <runs at once on 80 GB> <on 141 GB> [step_modes flags...]
#        (why graphed runs train worse: results/paper/step_modes.py within timeout_s, then
#        results/speed/graph_drift.py at the paper size, 40 top-k steps, within 150 s)
# At timeout_s the section gets SIGTERM: it stops its runs (each checkpoints the step under way,
# which a next call on the same warm machine resumes) and has 90 s to do so before it is killed.
# logs.tgz holds every run's small files, kept or not (no checkpoints): a machine that goes cold
# loses the checkpoints, never the logs.
set -u
# nothing left running from an earlier call (SIGTERM: each run checkpoints its step and stops;
# a run still holding its out_dir would refuse the next call's resume of it)
pkill -f "bench.py --sections=paper"; pkill -f "/train.py --"
for i in $(seq 120); do pgrep -f "bench.py --sections=paper|/train.py --" > /dev/null || break; sleep 1; done
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee $OUT/gpu.txt
python -c "import torch; print(torch.__version__)" | tee -a $OUT/gpu.txt
if [ ! -f /tmp/enwiki/val.bin ]; then
  mkdir -p /tmp/enwiki; cp .carry/enwiki/meta.json /tmp/enwiki/
  xz -dc .carry/enwiki/train.bin.xz > /tmp/enwiki/train.bin & xz -dc .carry/enwiki/val.bin.xz > /tmp/enwiki/val.bin; wait
fi
# a warm machine keeps /tmp: runs kept by an earlier call whose kept.tgz was not yet extracted
[ -d /tmp/kept ] && cp -r --update=none /tmp/kept/. results/paper/runs/
MODE=bench; [ "$1" = modes ] && { MODE=modes; shift; }
T=$1; P=$2; MEM=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)
[ "$MEM" -gt 100000 ] && P=$3
shift 3
echo "parallel=$P" | tee -a $OUT/gpu.txt
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
if [ $MODE = modes ]; then
  timeout $T python -u -m results.paper.step_modes --dataset=/tmp/enwiki --data_dir=/tmp/data --parallel=$P "$@" \
    > $OUT/step_modes.txt 2>&1; echo "rc=$?" >> $OUT/step_modes.txt
  for f in /tmp/step_modes/*/train.out; do echo "== $f"; grep -v "it/s\]$" $f | tail -c 1500; done > $OUT/train_tails.txt 2>&1
  timeout 150 python -u -m results.speed.graph_drift /tmp/drift --preset=paper --moe=topk --balance=bias \
    --aux_loss_coef=0 --lr=1e-3 --min_lr=1e-4 --grad_accum=4 --max_iters=40 --lr_decay_iters=2000 --eval_interval=40 \
    --eval_iters=2 --dataset=/tmp/enwiki --data_dir=/tmp/data --sample_tokens=0 --final_ckpt=weights \
    > $OUT/drift_paper_topk.txt 2> /tmp/drift.err; echo "rc=$?" >> $OUT/drift_paper_topk.txt
  tail -c 3000 /tmp/drift.err > $OUT/drift_stderr_tail.txt
  nvidia-smi >> $OUT/gpu.txt
  exit
fi
timeout --kill-after=90 $T python -u bench.py --sections=paper --dataset=/tmp/enwiki --data_dir=/tmp/data --out_dir=/tmp/pb \
  --glue_dir=.carry/glue --parallel=$P --max_runs=$P "$@" > $OUT/bench.txt 2>&1
echo "rc=$?" >> $OUT/bench.txt
tar czf $OUT/kept.tgz results/paper/runs
rm -rf /tmp/kept && cp -r results/paper/runs /tmp/kept
tar czf $OUT/logs.tgz --exclude=ckpt.pt --exclude=ckpt.tmp -C /tmp/pb paper 2>/dev/null
for f in /tmp/pb/paper/*/*/*/train.out; do echo "== $f"; grep -v "it/s\]$" $f | tail -c 2500; done > $OUT/train_tails.txt 2>&1
nvidia-smi >> $OUT/gpu.txt

#!/usr/bin/env bash
# The device call of 2026-12-07 behind results/speed/graph_*_after_fix, graph_tests_h100.txt and
# models_paper_256_h100.txt, and results/paper's call 9; run as `bash .carry/call8.sh 400` with
# carry [".carry"] (.carry/paper.sh is results/paper/gpu_call.sh). The second models run was skipped: no time left.
# the sweep's last two runs (quality: they share the GPU), the graph checks beside them; then speed alone
END=${1:-500}
cp .carry/paper.sh /tmp/p.sh
( timeout 100 python -m results.speed.graph_drift /tmp/drift > $OUT/drift.txt 2>&1; timeout 240 python -m pytest -q -x tests/test_train_graph.py > $OUT/graph_tests.txt 2>&1 ) &
BG=$!
bash /tmp/p.sh 360 2 2 --models=topk,clustered
wait $BG
echo "speed starts at ${SECONDS}s" >> $OUT/gpu.txt
timeout $((END - SECONDS)) python bench.py --sections=models --preset=paper --batch_size=32 --model_blocks=256 --model_modes=eager,graphed --repeats=8 --warmup=3 --out_dir=/tmp/bm1 > $OUT/models_a.txt 2>&1
echo "rc=$? at ${SECONDS}s" >> $OUT/models_a.txt
[ $SECONDS -lt $((END - 150)) ] && timeout $((END - SECONDS)) python bench.py --sections=models --preset=paper --batch_size=32 --model_blocks=256 --model_modes=compiled,compiled+graphed --repeats=8 --warmup=3 --out_dir=/tmp/bm2 > $OUT/models_b.txt 2>&1
echo "rc=$? at ${SECONDS}s" >> $OUT/models_b.txt
true

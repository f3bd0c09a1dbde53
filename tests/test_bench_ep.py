"""benchmarks/expert_parallel.py under torchrun on CPU (gloo): one-rank baseline, then two ranks with scaling."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(nproc, *args):
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               "--master_addr=127.0.0.1", f"--master_port={_port()}", "-m", "benchmarks.expert_parallel", "--tiny",
               "--block_size=16", "--batch_size=2", "--steps=1", "--warmup=1", *args]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_one_rank_then_two(tmp_path):
    one, two = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    _run(1, f"--out={one}")
    out = _run(2, f"--out={two}", f"--baseline={one}")
    assert "| clustered | default | 2 |" in out
    rows = {r["model"]: r for r in map(json.loads, two.read_text().splitlines())}
    assert set(rows) == {"topk", "clustered"}
    for row in rows.values():
        assert row["world"] == 2 and row["a2a_mib"] > 0 and row["scaling"] > 0
    assert rows["topk"]["bytes_vs_topk"] == 1.0
    singles = [json.loads(line) for line in one.read_text().splitlines()]
    assert all(r["world"] == 1 and r["a2a_mib"] == 0 for r in singles)   # one rank sends nothing

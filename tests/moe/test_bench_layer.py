import json

import pytest

from moelab.bench.layer import bench_layer, main, useful_flops
from moelab.errors import MoelabError


def test_useful_flops_counts_expert_matmuls_only():
    assert useful_flops(d=4, h=8, k=2, tokens=10) == 3 * 2 * 10 * 2 * (4 * 8 + 8 * 4)


def test_bench_layer_tiny_config_rows():
    rows = bench_layer([(16, 32, 4, 2, 64)], dtypes=("fp32", "bf16"), repeats=1, warmup=1, verbose=False)
    assert [r["dtype"] for r in rows] == ["fp32", "bf16"]
    for r in rows:
        for impl in ("ours", "ours_pytorch", "naive", "dense"):
            assert r[f"{impl}_ms"] > 0 and r[f"{impl}_gflops"] > 0
            assert r[f"{impl}_tok_s"] == pytest.approx(64 / (r[f"{impl}_ms"] / 1e3))
        assert r["ours_vs_dense"] == pytest.approx(r["dense_ms"] / r["ours_ms"])
        assert r["kernel_speedup"] == pytest.approx(r["ours_pytorch_ms"] / r["ours_ms"])
        assert r["kernels"]


def test_main_json(capsys):
    assert main(["--json", "--configs", "16,32,4,2,32", "--dtypes", "fp32", "--repeats", "1", "--warmup", "1"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["E"] == 4 and "ours_vs_naive" in rows[0]


def test_bad_args():
    with pytest.raises(MoelabError, match="--configs"):
        main(["--configs", "16,32,4"])
    with pytest.raises(MoelabError, match="unknown dtype"):
        bench_layer([(16, 32, 4, 2, 32)], dtypes=("fp16",), repeats=1, warmup=1, verbose=False)

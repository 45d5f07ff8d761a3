"""The command line: exit codes, user-error messages without tracebacks, `list`."""

import shutil
import subprocess
import sys

import pytest

from moelab.cli import main


def test_list_shows_builtins(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in ("digits-jacobs", "mnist-jacobs", "mnist-jacobs-faithful"):
        assert name in out


def test_unknown_experiment_is_a_clean_error(capsys):
    assert main(["run", "no-such-experiment"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("moelab: error: unknown experiment 'no-such-experiment'. Built-in experiments: ")
    assert "digits-jacobs" in err and "Traceback" not in err


def test_bad_override_lists_valid_keys(capsys):
    assert main(["run", "digits-jacobs", "--set", "no_such_key=1"]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'no_such_key'. Valid keys:" in err


def test_python_dash_m_entry_point_exit_status():
    p = subprocess.run([sys.executable, "-m", "moelab", "run", "nope"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    assert "moelab: error: unknown experiment 'nope'" in p.stderr
    assert "Traceback" not in p.stderr


def test_bench_help_lists_the_benchmarks(capsys):
    assert main(["bench", "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: moelab bench {layer,conv,cnn,steps}")
    for name in ("layer", "conv", "cnn", "steps"):
        assert f"\n  {name} " in out
    assert main(["bench", "-h"]) == 0 and capsys.readouterr().out == out


def test_bench_layer_help_still_works(capsys):
    with pytest.raises(SystemExit) as e:  # argparse's own --help of the benchmark
        main(["bench", "layer", "--help"])
    assert e.value.code == 0
    assert capsys.readouterr().out.startswith("usage: moelab bench layer")


def test_bench_without_a_known_benchmark_is_one_line(capsys):
    for argv, got in ((["bench"], "got nothing"), (["bench", "nope"], "got 'nope'")):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and got in err and "moelab bench --help" in err


def _fake_data_dir(root, *, fashion=True):
    """mnist and fashion-mnist as small IDX sets, cifar10 as a small image folder with its ten classes."""
    import gzip

    import numpy as np
    from PIL import Image

    from moelab.data.cifar import CLASSES

    rng = np.random.default_rng(0)
    for name in ("mnist", "fashion-mnist") if fashion else ("mnist",):
        for stem, arr in (("train-images-idx3-ubyte", rng.integers(0, 256, (20, 28, 28))),
                          ("train-labels-idx1-ubyte", np.arange(20) % 10),
                          ("t10k-images-idx3-ubyte", rng.integers(0, 256, (10, 28, 28))),
                          ("t10k-labels-idx1-ubyte", np.arange(10) % 10)):
            arr = np.ascontiguousarray(arr, dtype=np.uint8)
            head = bytes([0, 0, 8, arr.ndim]) + np.asarray(arr.shape, dtype=">u4").tobytes()
            (root / name).mkdir(parents=True, exist_ok=True)
            (root / name / f"{stem}.gz").write_bytes(gzip.compress(head + arr.tobytes()))
    for split in ("train", "test"):
        for cls in CLASSES:
            (root / "cifar10" / split / cls).mkdir(parents=True)
            img = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
            img.save(root / "cifar10" / split / cls / "0.png")
    return root


def test_data_check_exit_status(tmp_path, capsys):
    """0 when every data set is there and valid; 1, with a last line saying which and what to do, otherwise."""
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["data", "check", "--data-dir", str(empty)]) == 1
    captured = capsys.readouterr()
    assert captured.err == (f"moelab data check: 3 data sets missing: mnist, fashion-mnist, cifar10 (put each one's "
                            f"files into {empty}/NAME/; which files is said above and in the README).\n")
    assert "digits         OK" in captured.out

    full = _fake_data_dir(tmp_path / "full")
    assert main(["data", "check", "--data-dir", str(full)]) == 0
    captured = capsys.readouterr()
    assert captured.out.rstrip().endswith("all 4 data sets OK") and captured.err == ""

    (full / "cifar10" / "train" / "zebra").mkdir()  # an extra class: invalid, not just missing
    shutil.copy(full / "cifar10" / "train" / "cat" / "0.png", full / "cifar10" / "train" / "zebra" / "0.png")
    shutil.rmtree(full / "fashion-mnist")
    assert main(["data", "check", "--data-dir", str(full)]) == 1
    captured = capsys.readouterr()
    out = " ".join(captured.out.split())  # the details are wrapped
    assert "cifar10: ERROR: Image folder" in out and "unexpected class folder train/zebra/" in out
    assert captured.err == (f"moelab data check: 1 data set missing: fashion-mnist (put its files into "
                            f"{full / 'fashion-mnist'}/; which files is said above and in the README); 1 data set "
                            f"invalid: cifar10 (fix or replace the files named above).\n")

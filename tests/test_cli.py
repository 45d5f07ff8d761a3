"""The command line: exit codes, user-error messages without tracebacks, `list`."""

import subprocess
import sys

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

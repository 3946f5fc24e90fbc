"""The graphopt command line: compile -> run (vs eager), inspect, passes, targets, errors."""

import os
import subprocess
import sys

import numpy as np
import pytest

from graphopt.cli import main


def test_compile_then_run_matches_eager(tmp_path, capsys):
    out, x = str(tmp_path / "art"), str(tmp_path / "x.npy")
    assert main(["compile", "cnn", "--target", "x86", "-o", out, "--save-input", x]) == 0
    assert "compiled cnn for x86 with pipeline 'fold,fuse'" in capsys.readouterr().out
    assert main(["run", out, "--input", x, "--reference", "cnn", "--output", str(tmp_path / "y.npy")]) == 0
    printed = capsys.readouterr().out
    assert "output0: float32[1, 10]" in printed and "-> MATCH" in printed
    assert np.load(tmp_path / "y.npy").shape == (1, 10)
    assert main(["bench", out, "--runs", "3", "--warmup", "1"]) == 0
    assert "median" in capsys.readouterr().out


def test_compile_from_a_python_file(tmp_path, capsys):
    model_file = tmp_path / "net.py"
    model_file.write_text(
        "import torch\n"
        "def build():\n"
        "    return torch.nn.Sequential(torch.nn.Linear(5, 3), torch.nn.Tanh()), (torch.randn(2, 5),)\n")
    assert main(["compile", f"{model_file}:build", "-o", str(tmp_path / "o"), "--pipeline", "noop,dce"]) == 0
    assert "input  input: float32[2, 5]" in capsys.readouterr().out


def test_inspect_prints_summary_and_writes_a_picture(tmp_path, capsys):
    picture = str(tmp_path / "mlp.png")
    assert main(["inspect", "mlp", "--picture", picture, "--ir"]) == 0
    printed = capsys.readouterr().out
    assert "| linear | 2 |" in printed and "(102K MACs)" in printed and "graph mlp(x: f32[1, 784])" in printed
    assert os.path.getsize(picture) > 1000


def test_passes_and_targets_listings(capsys):
    assert main(["passes"]) == 0
    printed = capsys.readouterr().out
    assert "fold-const  [exact]" in printed and "max_bytes: int" in printed
    assert main(["targets"]) == 0
    printed = capsys.readouterr().out
    for name in ("x86", "x86-avx2", "x86-avx512", "arm64", "arm64-dotprod", "rpi4", "jetson-orin", "cuda"):
        assert f"\n{name} " in "\n" + printed


@pytest.mark.parametrize("argv, message", [
    (["compile", "mlp", "--target", "x87", "-o", "unused"], "TargetError: unknown target 'x87'"),
    (["compile", "mlp", "--pipeline", "fold,fsue", "-o", "unused"], "PipelineError: unknown pass 'fsue'"),
    (["compile", "nosuchmodel", "-o", "unused"], "CaptureError: unknown model 'nosuchmodel'"),
    (["run", "/nonexistent/art", "--input", "x.npy"], "ArtifactError: artifact /nonexistent/art: no such folder"),
    (["compile", "mlp", "--input-shape", "1,x", "-o", "unused"], "CaptureError: bad input shape"),
])
def test_bad_input_prints_one_error_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_console_script_runs_in_a_subprocess(tmp_path):
    # The installed entry point, as a user runs it; a typed error exits 2 without a traceback.
    proc = subprocess.run([sys.executable, "-m", "graphopt.cli", "compile", "mlp", "--target", "nope", "-o",
                           str(tmp_path / "o")], capture_output=True, text=True)
    assert proc.returncode == 2 and "error: TargetError" in proc.stderr and "Traceback" not in proc.stderr
    assert not os.path.exists(tmp_path / "o")

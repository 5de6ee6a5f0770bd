"""The ``ifp-compile`` command: help, argument errors, the ``blocks`` subcommand."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from ifp_compile.cli import main
from tests.helpers import export_lm
from tests.zoo import hf_model


def run(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, IFP_QUIET="1")
    return subprocess.run([sys.executable, "-m", "ifp_compile", *args], capture_output=True, text=True, env=env, timeout=600)


def test_help_lists_every_subcommand():
    r = run("--help")
    assert r.returncode == 0
    assert "demo" in r.stdout and "blocks" in r.stdout


@pytest.mark.parametrize("sub, words", [("demo", ["--keep", "--max-new-tokens", "--prompt"]), ("blocks", ["program"])])
def test_subcommand_help(sub, words):
    r = run(sub, "--help")
    assert r.returncode == 0
    assert all(w in r.stdout for w in words)


@pytest.mark.parametrize(
    "args, message",
    [
        (["demo", "--keep", "2"], "keep must be in (0, 1], got 2.0"),
        (["demo", "--keep", "0"], "keep must be in (0, 1], got 0.0"),
        (["demo", "--keep", "half"], "not a number: 'half'"),
        (["demo", "--max-new-tokens", "0"], "must be at least 1, got 0"),
        (["demo", "--prompt", "no equals sign"], "expected TASK=PROMPT, got 'no equals sign'"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
    ],
)
def test_bad_arguments_exit_2_with_a_message(args, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_blocks_of_a_missing_file(tmp_path, capsys):
    missing = tmp_path / "nope.pt2"
    assert main(["blocks", str(missing)]) == 2
    assert capsys.readouterr().err.strip() == f"error: no such file: {missing}"


def test_blocks_of_a_file_that_is_not_a_program(tmp_path, capsys):
    bad = tmp_path / "bad.pt2"
    bad.write_bytes(b"not a zip archive")
    assert main(["blocks", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {bad} is not a torch.export program (.pt2)")
    assert "Traceback" not in err


def test_blocks_lists_the_blocks_of_a_saved_program(tmp_path, capsys):
    ep, _ = export_lm(hf_model("phi3"))
    path = tmp_path / "phi3.pt2"
    torch.export.save(ep, str(path))
    assert main(["blocks", str(path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"{path}: 2 FFN blocks"
    assert out[1].startswith("[0] lm.model.layers.0.mlp: width ")
    assert "gated, fused gate_up" in out[1]


def test_blocks_of_a_program_without_ffn(tmp_path, capsys):
    ep = torch.export.export(torch.nn.Linear(4, 4), (torch.randn(2, 4),))
    path = tmp_path / "linear.pt2"
    torch.export.save(ep, str(path))
    assert main(["blocks", str(path)]) == 2
    assert capsys.readouterr().err.startswith("error: no FFN block found")

"""Arguments that can be checked from their text (ids, the side grammar, a model path, numbers) are refused
before torch is imported: a mistyped command answers in a fraction of a second (bench/bench_refusal.py)."""

import subprocess
import sys

import pytest

PROBE = (
    "import sys\n"
    "from qwen3dbg.cli import main\n"
    "sys.argv = ['qwen3dbg', *sys.argv[1:]]\n"
    "try:\n"
    "    main()\n"
    "except SystemExit as e:\n"
    "    print('exit', e.code, 'torch' in sys.modules)\n"
)

BAD = [
    ["diff", "--cand", "rope-theta-1e5"],
    ["diff", "--cand", "hf:attn"],
    ["diff", "--cand", ""],
    ["diff", "--cand", "store:/nonexistent/taps"],
    ["diff", "--cand", "hf", "--model", "/nonexistent/model"],
    ["diff", "--cand", "hf", "--token-ids", "1,x,3"],
    ["diff", "--cand", "hf", "--decode-steps", "-1"],
    ["diff", "--cand", "hf", "--decode-ids", "5", "--decode-steps", "3"],
    ["capture", "--impl", "scrach", "--out", "/nonexistent/out"],
    ["capture", "--impl", "store:/nonexistent", "--out", "/nonexistent/out"],
    ["capture", "--impl", "scratch", "--attn", "sdpa", "--out", "/nonexistent/out"],
    ["capture", "--impl", "hf", "--model", "/nonexistent/model", "--out", "/nonexistent/out"],
]


@pytest.mark.parametrize("argv", BAD, ids=[" ".join(a) for a in BAD])
def test_a_bad_argument_is_refused_before_torch_is_imported(argv, tmp_path):
    run = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, cwd=tmp_path)
    assert run.stdout.strip().splitlines()[-1] == "exit 2 False", run.stdout + run.stderr
    assert "error:" in run.stderr and "Traceback" not in run.stderr

"""Perplexity: sliding-window scoring against direct per-token computations, and `qserve eval` (~10 s)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from calib_util import all_logits, write_text
from qserve.calib import encode_texts
from qserve.cli import main
from qserve.evaluate import sliding_nll
from qserve.model import load_model


def _ids(n: int, vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(n))


def test_one_window_equals_the_mean_next_token_loss(tiny_dir: Path) -> None:
    model = load_model(tiny_dir, torch.float32, 64)
    ids = _ids(50, model.cfg.vocab_size)
    logp = torch.log_softmax(all_logits(model, ids).double(), -1)
    direct = -logp[torch.arange(49), ids[1:]].sum()
    nll = sliding_nll(model, ids, 64, 64)
    assert nll.tokens == 49
    assert nll.total == pytest.approx(float(direct), rel=1e-5)


@pytest.mark.parametrize("context,stride", [(64, 24), (64, 64), (32, 1)])
def test_sliding_window_scores_each_token_once_with_its_window_history(tiny_dir: Path, context: int, stride: int) -> None:
    model = load_model(tiny_dir, torch.float32, context)
    n = 100
    ids = _ids(n, model.cfg.vocab_size)
    total, count = 0.0, 0
    for j in range(1, n):
        # token j is scored by the first window reaching past it: the one starting at b
        b = max(0, math.ceil((j - context + 1) / stride) * stride)
        if b == j:
            continue  # a window's first token has no history inside the window
        logits = all_logits(model, ids[b:j])[-1]
        total -= float(torch.log_softmax(logits.double(), -1)[ids[j]])
        count += 1
    nll = sliding_nll(model, ids, context, stride)
    assert nll.tokens == count
    assert nll.total == pytest.approx(total, rel=1e-5)


def test_eval_cli_prints_one_row_per_model(tiny_dir: Path, tiny_rtn4_dir: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture) -> None:
    text = write_text(tmp_path / "eval.txt", seed=3)
    code = main(["eval", str(tiny_dir), str(tiny_rtn4_dir), "--text", str(text), "--context", "64",
                 "--stride", "32", "--max-tokens", "300", "--dtype", "float32"])
    assert code == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert "context 64, stride 32" in lines[0] and "first 300 tokens" in lines[0]
    rows = [line.strip("|").split("|") for line in lines[3:]]
    assert [r[0].strip() for r in rows] == [tiny_dir.name, tiny_rtn4_dir.name]
    assert [r[1].strip() for r in rows] == ["fp", "qserve-rtn"]
    model = load_model(tiny_dir, torch.float32, 64)
    want = sliding_nll(model, encode_texts(tiny_dir, [text.read_text()])[:300], 64, 32)
    assert int(rows[0][5]) == want.tokens
    assert float(rows[0][6]) == pytest.approx(want.perplexity, rel=1e-3)
    assert float(rows[0][4]) == pytest.approx(model.weight_bytes() / 2**20, abs=0.05)
    assert float(rows[1][4]) < float(rows[0][4])  # the int4 model is smaller


def test_eval_rejects_a_stride_longer_than_the_context(tiny_dir: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture) -> None:
    text = write_text(tmp_path / "eval.txt")
    code = main(["eval", str(tiny_dir), "--text", str(text), "--context", "16", "--stride", "32"])
    err = capsys.readouterr().err
    assert code == 2 and "stride" in err and len(err.strip().splitlines()) == 1

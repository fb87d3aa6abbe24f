"""A small random Llama-architecture checkpoint in Hugging Face format, made offline.

For fast tests and for users without a model at hand: a real byte-level BPE tokenizer trained
here with `tokenizers` on a fixed text, a ChatML chat template, and weights drawn from a seed,
so two builds with the same seed are byte-identical. It proves plumbing, not quality.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from qserve.checkpoint import save_checkpoint

CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] "
    "+ '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_TEXT = """qserve serves large language models within a memory budget. Quantization stores weights
in fewer bits: four-bit integers with a scale and a zero point per group of one hundred and
twenty-eight weights. The server answers chat completions, completions and model listings, and it
streams tokens as server-sent events. A budget too small for any variant is an error, not a crash.
The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs. How vexingly
quick daft zebras jump! Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000. Punctuation: , . ; : ! ? ( ) [ ]
{ } " ' - _ / \\ @ # $ % ^ & * + = < > | ~ `. Hello, world. What is the capital of France? Paris.
"""


def build_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([_TEXT] * 4, trainer=trainer)
    return tok


def make_tiny_model(
    out_dir: Path, seed: int = 0, hidden: int = 128, layers: int = 2, heads: int = 4, kv_heads: int = 2,
    intermediate: int = 256, vocab: int = 512, max_pos: int = 2048, tie: bool = False,
) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(vocab)
    tok.save(str(out / "tokenizer.json"))
    vocab = tok.get_vocab_size()
    eos = tok.token_to_id("<|im_end|>")
    bos = tok.token_to_id("<|endoftext|>")
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|endoftext|>",
        "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "unk_token": None,
        "model_max_length": max_pos, "clean_up_tokenization_spaces": False,
        "add_bos_token": False, "chat_template": CHAT_TEMPLATE,
    }, indent=2))
    g = torch.Generator().manual_seed(seed)
    hd = hidden // heads

    def w(*shape: int, std: float = 0.08) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * std

    t: dict[str, torch.Tensor] = {"model.embed_tokens.weight": w(vocab, hidden, std=0.5)}
    for i in range(layers):
        p = f"model.layers.{i}."
        t |= {
            p + "input_layernorm.weight": 1 + w(hidden, std=0.1),
            p + "post_attention_layernorm.weight": 1 + w(hidden, std=0.1),
            p + "self_attn.q_proj.weight": w(heads * hd, hidden),
            p + "self_attn.k_proj.weight": w(kv_heads * hd, hidden),
            p + "self_attn.v_proj.weight": w(kv_heads * hd, hidden),
            p + "self_attn.o_proj.weight": w(hidden, heads * hd),
            p + "mlp.gate_proj.weight": w(intermediate, hidden),
            p + "mlp.up_proj.weight": w(intermediate, hidden),
            p + "mlp.down_proj.weight": w(hidden, intermediate),
        }
    t["model.norm.weight"] = 1 + w(hidden, std=0.1)
    if not tie:
        t["lm_head.weight"] = w(vocab, hidden, std=0.2)
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab,
        "hidden_size": hidden, "intermediate_size": intermediate, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": hd,
        "max_position_embeddings": max_pos, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "hidden_act": "silu", "tie_word_embeddings": tie, "attention_bias": False,
        "mlp_bias": False, "bos_token_id": bos, "eos_token_id": eos, "torch_dtype": "float32",
    }
    save_checkpoint(out, t, config)
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": bos, "eos_token_id": eos}))
    return out

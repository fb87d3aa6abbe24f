"""The vLLM quantization plugin without an engine: vLLM's own parallel linears, built with our
config and loaded through their weight loaders from our stored tensors, against our engine's layer.

Runs in the vLLM virtualenv (tests/vllm_env.sh); skipped where vllm is not installed.
"""

from __future__ import annotations

import importlib.metadata

import pytest
import torch

pytestmark = pytest.mark.vllm
pytest.importorskip("vllm")

from qserve.errors import ConfigError  # noqa: E402
from qserve.linear import get_quant_method, registered_methods  # noqa: E402
from qserve.quant_methods.rtn import woq_config  # noqa: E402
from qserve.woq import ReferenceWeightOnlyLinear, quantize_weight  # noqa: E402

WOQ_METHODS = [m for m in ("qserve-rtn", "qserve-awq", "qserve-smoothquant-plus") if m in registered_methods()]
# bits, group_size, in_features: ragged last group (576 = 4*128 + 64), 3-bit codes, 8-bit channels
FORMATS = [(4, 128, 576), (4, 32, 128), (3, 64, 192), (8, -1, 192)]
# our kernels take bf16 activations and bf16 scale/offset pairs (~2^-8 relative error per
# product): the output stays within 2% of its largest magnitude, as in test_quant_core
# (measured over 5 seeds: <= 0.6% at 4 and 8 bits, <= 1.2% at 3 bits, whose offsets are larger)
BF16_BOUND = 0.02


@pytest.fixture(scope="module")
def vllm_dist():
    """vLLM's config context and a one-rank gloo process group, as a worker has them."""
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.distributed import init_distributed_environment, initialize_model_parallel
    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

    from server_util import free_port

    with set_current_vllm_config(VllmConfig()):
        init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo",
                                     distributed_init_method=f"tcp://127.0.0.1:{free_port()}")
        initialize_model_parallel(1, 1)
        yield
    cleanup_dist_env_and_memory()


def _config(method: str, bits: int, gs: int):
    from qserve.vllm_plugin import VLLM_CONFIGS

    return VLLM_CONFIGS[method].from_config(woq_config(method, bits, gs))


def _stored(rows: int, k: int, bits: int, gs: int, seed: int) -> dict[str, torch.Tensor]:
    w = torch.randn(rows, k, generator=torch.Generator().manual_seed(seed)) * 0.05
    return quantize_weight(w, bits, gs)


def _build(kind: str, method: str, bits: int, gs: int, k: int, dtype: torch.dtype):
    """A vLLM linear of `kind` with our tensors loaded shard by shard; returns it and the parts."""
    from vllm.model_executor.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear

    qc = _config(method, bits, gs)
    if kind == "qkv":  # 4 query heads and 2 kv heads of 32: fused [q; k; v] = 128 + 64 + 64 rows
        layer = QKVParallelLinear(k, 32, 4, 2, bias=False, quant_config=qc, params_dtype=dtype,
                                  prefix="model.layers.0.self_attn.qkv_proj")
        shards = [("q", 128), ("k", 64), ("v", 64)]
    elif kind == "gate_up":
        layer = MergedColumnParallelLinear(k, [96, 96], bias=False, quant_config=qc, params_dtype=dtype,
                                           prefix="model.layers.0.mlp.gate_up_proj")
        shards = [(0, 96), (1, 96)]
    else:
        layer = RowParallelLinear(k, 64, bias=False, quant_config=qc, params_dtype=dtype,
                                  prefix="model.layers.0.mlp.down_proj")
        shards = [(None, 64)]
    parts = [_stored(n, k, bits, gs, seed=i) for i, (_, n) in enumerate(shards)]
    for (sid, _), st in zip(shards, parts):
        for name, t in st.items():
            param = getattr(layer, name)
            if sid is None:
                param.weight_loader(param, t)
            else:
                param.weight_loader(param, t, sid)
    layer.quant_method.process_weights_after_loading(layer)
    return layer, parts


def _ours(method: str, parts: list[dict[str, torch.Tensor]], bits: int, gs: int, k: int, dtype: torch.dtype):
    cls = get_quant_method(method)
    qcfg = woq_config(method, bits, gs)
    stored = cls.concat_stored(parts, qcfg) if len(parts) > 1 else parts[0]
    return cls.from_stored(stored, k, stored["qweight"].shape[0], qcfg, dtype), stored


def test_entry_point_and_idempotent_register() -> None:
    from vllm.model_executor.layers.quantization import get_quantization_config

    from qserve.vllm_plugin import VLLM_CONFIGS, register

    eps = importlib.metadata.entry_points(group="vllm.general_plugins")
    assert any(ep.value == "qserve.vllm_plugin:register" for ep in eps)
    first, second = register(), register()
    assert first == second and "qserve-rtn" in first
    assert set(WOQ_METHODS) <= set(first)
    for name in first:
        assert get_quantization_config(name) is VLLM_CONFIGS[name]


def test_config_rejects_what_our_engine_rejects() -> None:
    from qserve.vllm_plugin import QServeRTNConfig

    with pytest.raises(ConfigError, match="group_size"):
        QServeRTNConfig.from_config(woq_config("qserve-rtn", 4, 100))
    with pytest.raises(ConfigError, match="format"):
        QServeRTNConfig.from_config({**woq_config("qserve-rtn", 4, 128), "format": "gptq"})


@pytest.mark.parametrize("method", WOQ_METHODS)
@pytest.mark.parametrize("bits,gs,k", FORMATS)
@pytest.mark.parametrize("kind", ["qkv", "gate_up", "row"])
def test_vllm_linear_equals_our_layer(vllm_dist, method: str, bits: int, gs: int, k: int, kind: str) -> None:
    """Same stored tensors, same ops: vLLM's apply is bit-identical to our engine's layer, and both
    are within the bf16 bound of the fp32 dequantize-then-matmul reference."""
    for dtype in (torch.bfloat16, torch.float32):
        layer, parts = _build(kind, method, bits, gs, k, dtype)
        ours, stored = _ours(method, parts, bits, gs, k, dtype)
        x = torch.randn(7, k, generator=torch.Generator().manual_seed(9)).to(dtype)
        y, _ = layer(x)
        assert y.dtype == dtype and y.shape == (7, stored["qweight"].shape[0])
        assert torch.equal(y, ours(x))
        ref = ReferenceWeightOnlyLinear(stored, k, gs)(x.float())
        assert float((y.float() - ref).abs().max()) <= BF16_BOUND * float(ref.abs().max())


@pytest.mark.parametrize("bits,gs,k", [(4, 128, 576), (4, 32, 128)])
def test_gpu_path_layout_on_vllm_cpu_kernel(vllm_dist, monkeypatch: pytest.MonkeyPatch, bits: int, gs: int,
                                            k: int) -> None:
    """The conversion the GPU path does (GPTQ-style uint4 + packed zero points, ragged K padded to
    whole groups) fed to vLLM's own CPU int4 kernel matches the fp32 reference."""
    from qserve.vllm_plugin import KERNEL_ENV

    monkeypatch.setenv(KERNEL_ENV, "vllm")
    layer, parts = _build("qkv", "qserve-rtn", bits, gs, k, torch.bfloat16)
    assert layer.quant_method.kernel is not None
    _, stored = _ours("qserve-rtn", parts, bits, gs, k, torch.bfloat16)
    x = torch.randn(5, k, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    y, _ = layer(x)
    ref = ReferenceWeightOnlyLinear(stored, k, gs)(x.float())
    assert float((y.float() - ref).abs().max()) <= BF16_BOUND * float(ref.abs().max())

"""qserve checkpoints in stock vLLM: one vLLM `QuantizationConfig` per qserve method.

vLLM calls `register()` (entry point `vllm.general_plugins`) in every process it starts, so it
is idempotent. A checkpoint's config.json `quantization_config.quant_method` (e.g. "qserve-rtn")
then selects the config registered here, and vLLM's own model code builds its fused QKV /
gate-up / row-parallel linears with our linear method. Only vLLM imports this module.

The numerics live once, in qserve.woq: on CPU, `apply` runs exactly the ops of our engine's
WeightOnlyLinear (prepare_int4 / prepare_int8 at load, woq_matmul per call). On a GPU the same
stored codes are handed to vLLM's mixed-precision kernel chooser (Marlin, Machete, ...) as
GPTQ-style uint4 with zero points; a ragged last group (K=576, g=128) is padded to whole groups
there, since those kernels refuse a group that runs off the end. 8-bit on a GPU is dequantized
once at load (correct, no memory saving). `QSERVE_VLLM_WOQ_KERNEL=torch|vllm` overrides the
choice; the tests use `vllm` on CPU to check the GPU path's layout against vLLM's CPU int4 kernel.

Extension point: a later method (BitStack at a fixed number of blocks, W4A4) adds its own
QuantizationConfig subclass and linear method here and an entry in `VLLM_CONFIGS`; register()
registers an entry only when the method's runtime module is installed.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F
from vllm.model_executor.kernels.linear import MPLinearLayerConfig, choose_mp_linear_kernel
from vllm.model_executor.layers.linear import (
    LinearBase, LinearMethodBase, UnquantizedLinearMethod, register_weight_loader_v2_supported_method,
)
from vllm.model_executor.layers.quantization import register_quantization_config
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig
from vllm.model_executor.parameter import (
    ChannelQuantScaleParameter, GroupQuantScaleParameter, ModelWeightParameter, PackedvLLMParameter,
)
from vllm.platforms import current_platform
from vllm.scalar_type import scalar_types

from qserve.errors import ConfigError
from qserve.groupquant import num_groups
from qserve.woq import check_woq_config, prepare_int4, prepare_int8, woq_matmul

KERNEL_ENV = "QSERVE_VLLM_WOQ_KERNEL"
WOQ_FORMAT = "qserve-woq-v1"


def kernel_choice() -> str:
    """'torch' (qserve.woq, our engine's kernels) or 'vllm' (vLLM's mixed-precision kernels)."""
    want = os.environ.get(KERNEL_ENV, "auto")
    if want not in ("auto", "torch", "vllm"):
        raise ConfigError(f"{KERNEL_ENV} must be auto, torch or vllm, got {want!r}")
    if want == "auto":
        return "torch" if current_platform.is_cpu() else "vllm"
    return want


class QServeWOQConfig(QuantizationConfig):
    """W4A16 / W3A16 (group-wise with zero points) and W8A16 (per channel) of qserve.woq."""

    method = ""  # the quant_method string; set by each registered subclass

    def __init__(self, bits: int, group_size: int):
        super().__init__()
        check_woq_config(bits, group_size)
        self.bits, self.group_size = bits, group_size

    def __repr__(self) -> str:
        return f"{type(self).__name__}(bits={self.bits}, group_size={self.group_size})"

    @classmethod
    def get_name(cls) -> str:
        return cls.method

    @classmethod
    def get_supported_act_dtypes(cls) -> list[torch.dtype]:
        return [torch.bfloat16, torch.float16, torch.float32]

    @classmethod
    def get_min_capability(cls) -> int:
        return 75  # Marlin's floor; CPUs report no capability

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []  # config.json's quantization_config is all we need

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "QServeWOQConfig":
        fmt = config.get("format", WOQ_FORMAT)
        if fmt != WOQ_FORMAT:
            raise ConfigError(f"{cls.method}: checkpoint format {fmt!r} is not {WOQ_FORMAT!r}")
        return cls(int(config.get("bits", 4)), int(config.get("group_size", 128)))

    def get_quant_method(self, layer: torch.nn.Module, prefix: str):
        if not isinstance(layer, LinearBase):
            return None  # embeddings and the head stay in the model dtype, as in our engine
        if ".layers." not in f".{prefix}":
            return UnquantizedLinearMethod()  # our quantizers only touch decoder-layer linears
        return WOQLinearMethod(self)


class QServeRTNConfig(QServeWOQConfig):
    method = "qserve-rtn"


class QServeAWQConfig(QServeWOQConfig):
    method = "qserve-awq"


class QServeSmoothQuantPlusConfig(QServeWOQConfig):
    method = "qserve-smoothquant-plus"


VLLM_CONFIGS: dict[str, type[QuantizationConfig]] = {
    c.method: c for c in (QServeRTNConfig, QServeAWQConfig, QServeSmoothQuantPlusConfig)
}


def register() -> list[str]:
    """Register every qserve method that is installed and has a vLLM config; returns their names.
    Safe to call any number of times (vLLM calls it in each of its processes)."""
    from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS, get_quantization_config

    from qserve.linear import registered_methods

    names = [m for m in registered_methods() if m in VLLM_CONFIGS]
    for name in names:
        if name not in QUANTIZATION_METHODS or get_quantization_config(name) is not VLLM_CONFIGS[name]:
            register_quantization_config(name)(VLLM_CONFIGS[name])
    return names


@register_weight_loader_v2_supported_method
class WOQLinearMethod(LinearMethodBase):
    """Lays out our stored tensors as vLLM parameters, then calls qserve.woq (or vLLM's kernels)."""

    def __init__(self, quant_config: QServeWOQConfig):
        self.quant_config = quant_config
        self.kernel = None  # a vLLM MPLinearKernel when the vllm kernel path is taken

    def create_weights(self, layer: torch.nn.Module, input_size_per_partition: int,
                       output_partition_sizes: list[int], input_size: int, output_size: int,
                       params_dtype: torch.dtype, **extra_weight_attrs: Any) -> None:
        loader = extra_weight_attrs["weight_loader"]
        bits, g = self.quant_config.bits, self.quant_config.group_size
        k, n = input_size_per_partition, sum(output_partition_sizes)
        layer.qserve_shape = (k, n, input_size, output_size, params_dtype)
        if bits == 8:
            layer.register_parameter("qweight", ModelWeightParameter(
                data=torch.empty(n, k, dtype=torch.int8), input_dim=1, output_dim=0, weight_loader=loader))
            layer.register_parameter("scales", ChannelQuantScaleParameter(
                data=torch.empty(n, 1, dtype=torch.float16), output_dim=0, weight_loader=loader))
            return
        if k != input_size and k % g != 0:
            raise ConfigError(f"in_features per tensor-parallel rank ({k}) must be a multiple of "
                              f"group_size {g}; choose a tensor-parallel size that divides the groups")
        if k % 8 != 0:
            raise ConfigError(f"in_features ({k}) must be a multiple of 8 for packed int4 codes")
        groups = num_groups(k, g)
        layer.register_parameter("qweight", PackedvLLMParameter(
            data=torch.empty(n, k // 8, dtype=torch.int32), input_dim=1, output_dim=0,
            packed_dim=1, packed_factor=8, weight_loader=loader))
        # scales keep their stored fp16, so the kernel layout is computed exactly as our engine does
        layer.register_parameter("scales", GroupQuantScaleParameter(
            data=torch.empty(n, groups, dtype=torch.float16), output_dim=0, input_dim=1, weight_loader=loader))
        layer.register_parameter("qzeros", GroupQuantScaleParameter(
            data=torch.empty(n, groups, dtype=torch.uint8), output_dim=0, input_dim=1, weight_loader=loader))

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        k = layer.qserve_shape[0]
        g = self.quant_config.group_size
        on_cpu = layer.qweight.device.type == "cpu"
        if self.quant_config.bits == 8:
            w, s = prepare_int8(layer.qweight.data, layer.scales.data) if on_cpu else _dense_int8(layer)
            _swap(layer, ("qweight", "scales"), weight_packed=w, weight_scale=s)
        elif kernel_choice() == "torch":
            if not on_cpu:
                raise ConfigError(f"{KERNEL_ENV}=torch runs torch's CPU int4 kernel; this layer is on "
                                  f"{layer.qweight.device}")
            w, s = prepare_int4(layer.qweight.data, layer.scales.data, layer.qzeros.data, k, g)
            _swap(layer, ("qweight", "scales", "qzeros"), weight_packed=w, weight_scale=s)
        else:
            self.kernel = _vllm_int4_kernel(layer, g)

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if self.kernel is not None:
            pad = layer.qserve_padded_k - x.shape[-1]
            return self.kernel.apply_weights(layer, F.pad(x, (0, pad)) if pad else x, bias)
        w = layer.weight_packed
        if w.dtype.is_floating_point:  # 8-bit, dequantized on an accelerator
            return F.linear(x, w, bias)
        return woq_matmul(x, w, layer.weight_scale, self.quant_config.group_size, layer.qserve_shape[1], bias)


def _swap(layer: torch.nn.Module, old: tuple[str, ...], **new: torch.Tensor) -> None:
    """Replace the loaded parameters with the kernel-layout tensors computed from them."""
    for name in old:
        delattr(layer, name)
    for name, t in new.items():
        layer.register_parameter(name, torch.nn.Parameter(t, requires_grad=False))


def _dense_int8(layer: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    dtype = layer.qserve_shape[4]
    w = (layer.qweight.data.float() * layer.scales.data.float()).to(dtype)
    return w, torch.empty(0, device=w.device)


def _noop_loader(*args: Any, **kwargs: Any) -> None:
    """Weights are already loaded when the kernel parameters are made."""


def _vllm_int4_kernel(layer: torch.nn.Module, g: int):
    """Hand our codes to vLLM's mixed-precision kernel chooser as GPTQ-style uint4 + zero points.

    Our qweight [N, K/8] (nibble j of word i = column 8i+j) already is that layout with the input
    dim packed; zero points are packed 8 per int32 along N; a ragged K is padded to whole groups
    with zero codes (apply zero-pads x, so they add nothing).
    """
    k, n, full_k, full_n, dtype = layer.qserve_shape
    if n % 8 != 0:
        raise ConfigError(f"out_features per rank ({n}) must be a multiple of 8 for vLLM's int4 kernels")
    padded_k = num_groups(k, g) * g
    q = layer.qweight.data
    if padded_k != k:
        q = F.pad(q, (0, (padded_k - k) // 8))
    z = layer.qzeros.data.to(torch.int32).view(n // 8, 8, -1)
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=z.device).view(1, 8, 1)
    zp = (z << shifts).sum(1, dtype=torch.int64).bitwise_and(0xFFFFFFFF).to(torch.uint32).view(torch.int32)
    if dtype not in (torch.bfloat16, torch.float16):
        raise ConfigError(f"vLLM's int4 kernels need bfloat16 or float16 activations, not {dtype}")
    scales = layer.scales.data.to(dtype)
    for name in ("qweight", "scales", "qzeros"):
        delattr(layer, name)
    layer.register_parameter("qweight", PackedvLLMParameter(
        data=q.contiguous(), input_dim=1, output_dim=0, packed_dim=1, packed_factor=8, weight_loader=_noop_loader))
    layer.register_parameter("scales", GroupQuantScaleParameter(
        data=scales.contiguous(), output_dim=0, input_dim=1, weight_loader=_noop_loader))
    layer.register_parameter("qzeros", PackedvLLMParameter(
        data=zp.contiguous(), output_dim=0, input_dim=1, packed_dim=0, packed_factor=8, weight_loader=_noop_loader))
    cfg = MPLinearLayerConfig(
        full_weight_shape=(full_k + padded_k - k, full_n), partition_weight_shape=(padded_k, n),
        weight_type=scalar_types.uint4, act_type=dtype, group_size=g, zero_points=True)
    kernel = choose_mp_linear_kernel(cfg)(cfg, w_q_param_name="qweight", w_s_param_name="scales",
                                          w_zp_param_name="qzeros")
    kernel.process_weights_after_loading(layer)
    layer.qserve_padded_k = padded_k
    return kernel

"""int8 on top of pruning, by ONNX Runtime's own quantization tools, in settings that are right on every CPU.

Two schemes, chosen by task (`int8_scheme` of `export_onnx`; the card says which ran and why):

- **dynamic** (encoders): int8 weights per output channel, activations quantized to uint8 at run time
  (`quantize_dynamic` -> `MatMulInteger`), with `reduce_range=True`: 7-bit weights. ONNX Runtime multiplies u8 x s8
  on x86 CPUs without VNNI (AVX2, AVX-512 without VNNI) with VPMADDUBSW, which adds two u8 x s8 products into a
  *saturating* int16: 2 x 255 x 127 = 64,770 does not fit, and the logits go wrong (the tiny test LLaMA: argmax
  agreement 0.19 on an AVX2 EPYC; 0.95 on a VNNI CPU). ONNX Runtime's quantization documentation names two cures,
  `reduce_range` or U8U8; 7-bit weights bound every pair by 2 x 255 x 63 = 32,130 < 32,767, keep the fast u8 x s8
  kernels, and change nothing on VNNI / ARM CPUs but one bit of weight resolution.
- **blockwise** (decoders): 8-bit weights with one scale per block of 32 inputs (`MatMulNBitsQuantizer` ->
  `MatMulNBits`, symmetric), activations quantized per block of 32 at run time (compute type int8). Decoders have
  activation outliers (LLM.int8(), Dettmers et al. 2022) that one scale per tensor cannot hold: SmolLM2-135M under
  the dynamic scheme agrees with PyTorch's argmax on 59 % of held-out positions even on a VNNI CPU (no saturation
  involved), against 96 % blockwise, natively and under an emulated AVX2-only CPU alike.
"""

from __future__ import annotations

import logging
from pathlib import Path

INT8_SCHEMES = ("auto", "dynamic", "blockwise")
BLOCK_SIZE = 32
# MatMulNBits' compute type 4 = int8: activations quantized per block of 32 at run time, int32 accumulation. Measured
# on SmolLM2-135M (one thread, batch-1 greedy decoding): 15.6 tok/s vs 10.7 fp32, and 1.5 tok/s with the default
# fp32 compute type (its 8-bit path dequantizes every weight per call); agreement 0.961 vs 0.974, and 0.973 under an
# emulated AVX2-only CPU (benchmarks/int8_portability.py): per-block scales keep one outlier's damage in its block.
ACCURACY_LEVEL = 4

DESCRIPTIONS = {
    "dynamic": ("dynamic int8 (`onnxruntime.quantization.quantize_dynamic`: int8 weights per output channel with "
                "`reduce_range=True`, i.e. 7-bit, activations quantized to uint8 at run time). The 7-bit weights keep "
                "ONNX Runtime's u8 x s8 kernels exact on x86 CPUs without VNNI, whose 16-bit intermediate saturates "
                "with 8-bit weights (ONNX Runtime's quantization documentation)"),
    "blockwise": (f"blockwise int8 (`MatMulNBitsQuantizer`: symmetric 8-bit weights with a scale per block of "
                  f"{BLOCK_SIZE} inputs, activations quantized per block at run time, `accuracy_level={ACCURACY_LEVEL}`). "
                  "Decoder activations have outliers that one scale per tensor cannot hold; per-block scales keep "
                  "them local"),
}


def resolve_scheme(scheme: str, decoder: bool) -> str:
    """`"auto"` -> `"blockwise"` for decoders, `"dynamic"` for encoders; anything else is checked and returned."""
    if scheme not in INT8_SCHEMES:
        raise ValueError(f"int8_scheme must be one of {', '.join(INT8_SCHEMES)}; got {scheme!r}")
    if scheme == "auto":
        return "blockwise" if decoder else "dynamic"
    return scheme


def quantize_int8(source: Path, target: Path, scheme: str = "dynamic") -> None:
    """Writes `target`: `source` with every MatMul / Gemm weight quantized by `scheme` (see the module docstring)."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.ERROR))  # the quantizers log to the root logger (skipped nodes, hints)
    try:
        if scheme == "dynamic":
            from onnxruntime.quantization import QuantType, quantize_dynamic

            quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8, per_channel=True,
                             reduce_range=True, op_types_to_quantize=["MatMul", "Gemm"])
        elif scheme == "blockwise":
            import onnx
            from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

            quantizer = MatMulNBitsQuantizer(onnx.load(str(source)), bits=8, block_size=BLOCK_SIZE, is_symmetric=True,
                                             accuracy_level=ACCURACY_LEVEL)
            quantizer.process()
            quantizer.model.save_model_to_file(str(target), use_external_data_format=False)
        else:
            raise ValueError(f"unknown int8 scheme {scheme!r}")
    finally:
        root.setLevel(level)

"""lessserve.kernels.triton: fused Triton kernels, same signatures as kernels/reference.

Import only when Triton can run: on CUDA, or on CPU with TRITON_INTERPRET=1 set before import.
"""

from lessserve.kernels.triton.attention import chunk_attention, chunk_attention_quant, decode_attention
from lessserve.kernels.triton.evict import evict_absorb
from lessserve.kernels.triton.pack import pack_slots, unpack_slot
from lessserve.kernels.triton.quant import dequantize_int8, quantize_int8

__all__ = [
    "chunk_attention",
    "chunk_attention_quant",
    "decode_attention",
    "dequantize_int8",
    "evict_absorb",
    "pack_slots",
    "quantize_int8",
    "unpack_slot",
]

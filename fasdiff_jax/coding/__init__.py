"""Bitstream layer: the container format and host-side entropy coding (``constriction``)."""

from fasdiff_jax.coding.errors import BitstreamError
from fasdiff_jax.coding.container import Container, SamplerSpec, header_bytes, pack, unpack
from fasdiff_jax.coding.symbols import decode_symbols, encode_symbols, min_bits

__all__ = [
    "BitstreamError", "Container", "SamplerSpec", "header_bytes", "pack", "unpack",
    "encode_symbols", "decode_symbols", "min_bits",
]

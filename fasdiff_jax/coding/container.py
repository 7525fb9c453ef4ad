"""The ``.fsd`` container: a fixed little-endian header, the coded streams, a CRC32.

Byte layout (version 1; all integers little-endian, no pickle, no variable-length header
fields other than the stream-length list)::

    offset size field
    0      4    magic            b"FSDC"
    4      2    version          u16, = 1
    6      2    flags            u16, reserved, must be 0
    8      4    height           u32, original image height  (1 .. 65535)
    12     4    width            u32, original image width   (1 .. 65535)
    16     2    pad_bottom       u16, rows added before coding (< 4096)
    18     2    pad_right        u16, columns added before coding (< 4096)
    20     1    channels         u8, channels of the original image (1, 3 or 4)
    21     1    codec_id         u8, 1 = mean-scale hyperprior, 2 = FaSDiff
    22     2    reserved         u16, must be 0
    24     16   fingerprint      blake2b-128 of the decoding-relevant params, config and tables
    40     2    sampler_steps    u16  \
    42     2    sampler_t_start  u16   | reserved sampler spec for FaSDiff's diffusion decoder
    44     4    sampler_eta      f32   | (all zero for the hyperprior codec)
    48     8    sampler_seed     u64  /
    56     2    n_streams        u16, 1 .. 16
    58     4*n  stream lengths   u32 each, <= 2**28
    ...         streams          concatenated
    end-4  4    crc32            zlib.crc32 of every byte before it

Header size is ``62 + 4 * n_streams`` bytes including the CRC: 66 bytes for the hyperprior
codec, which writes one stream (``z`` then ``y`` in one ``constriction`` range-coder stream of
little-endian u32 words with trailing zero bytes stripped, so a stream never ends in a zero
byte; see :mod:`fasdiff_jax.coding.symbols`). The parser checks size, magic, version and CRC
before it trusts any field, then checks every field against the limits above and the stream
lengths against the bytes actually present, so no field can trigger a large allocation; the
codec then bounds the decoded image (``max_pixels``) and the symbol count against the stream
length. Every failure is a :class:`BitstreamError` naming the field.
"""

from __future__ import annotations

import math
import numbers
import struct
import zlib
from dataclasses import dataclass, field

from fasdiff_jax.coding.errors import BitstreamError

MAGIC = b"FSDC"
VERSION = 1
MAX_SIDE = 65535
MAX_PAD = 4095
SEED_LIMIT = 2**64  # the sampler seed is stored as u64
MAX_STREAMS = 16
MAX_STREAM_BYTES = 1 << 28
_FIXED = struct.Struct("<4sHHIIHHBBH16sHHfQH")
FIXED_SIZE = _FIXED.size  # 58
CRC_SIZE = 4
_F32_MAX = 3.4028234663852886e38  # struct's 'f' overflows above (the header's eta)


def header_bytes(n_streams: int) -> int:
    """Bytes of a file that are not stream payload."""
    return FIXED_SIZE + 4 * n_streams + CRC_SIZE


@dataclass(frozen=True)
class SamplerSpec:
    """Reserved for FaSDiff's diffusion decoder: steps, start timestep, eta, seed."""

    steps: int = 0
    t_start: int = 0
    eta: float = 0.0
    seed: int = 0


@dataclass(frozen=True)
class Container:
    height: int
    width: int
    pad_bottom: int
    pad_right: int
    channels: int
    codec_id: int
    fingerprint: bytes
    streams: tuple[bytes, ...]
    sampler: SamplerSpec = field(default_factory=SamplerSpec)


CODEC_NAMES = {1: "mbt2018-mean", 2: "fasdiff"}


def describe(data: bytes) -> dict:
    """What a file's header says (validated, fingerprint not checked against any model): for
    ``python -m fasdiff_jax.codec info`` and anyone asking "which model wrote this file?"."""
    c = unpack(data)
    info = {"bytes": len(data), "codec": CODEC_NAMES.get(c.codec_id, f"unknown ({c.codec_id})"),
            "format_version": VERSION, "height": c.height, "width": c.width,
            "channels": c.channels, "pad_bottom": c.pad_bottom, "pad_right": c.pad_right,
            "fingerprint": c.fingerprint.hex(), "stream_bytes": [len(x) for x in c.streams],
            "header_bytes": header_bytes(len(c.streams)),
            "bpp": 8.0 * len(data) / (c.height * c.width)}
    if c.sampler != SamplerSpec():
        info["sampler"] = {"steps": c.sampler.steps, "t_start": c.sampler.t_start,
                           "eta": c.sampler.eta, "seed": c.sampler.seed}
    return info


def _is_int(v: object) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def pack(c: Container) -> bytes:
    """Serialise. Raises TypeError for a field of the wrong type (a float size, a sampler
    that is not a :class:`SamplerSpec`) and ValueError for a value the format cannot hold:
    both before any packing, where they were struct.error, OverflowError or AttributeError."""
    ints = {"height": c.height, "width": c.width, "pad_bottom": c.pad_bottom,
            "pad_right": c.pad_right, "channels": c.channels, "codec_id": c.codec_id}
    if not isinstance(c.sampler, SamplerSpec):
        raise TypeError(f"sampler must be a SamplerSpec, got {type(c.sampler).__name__}")
    s = c.sampler
    ints.update({"sampler steps": s.steps, "sampler t_start": s.t_start, "sampler seed": s.seed})
    wrong = [f"{k} {v!r} ({type(v).__name__})" for k, v in ints.items() if not _is_int(v)]
    if wrong:
        raise TypeError(f"container fields must be integers: {', '.join(wrong)}")
    if not isinstance(s.eta, numbers.Real) or isinstance(s.eta, bool):
        raise TypeError(f"sampler eta must be a real number, got {type(s.eta).__name__}")
    if not isinstance(c.fingerprint, (bytes, bytearray)):
        raise TypeError(f"fingerprint must be bytes, got {type(c.fingerprint).__name__}")
    if not isinstance(c.streams, (tuple, list)) or not all(
            isinstance(x, (bytes, bytearray)) for x in c.streams):
        raise TypeError("streams must be a tuple of bytes objects")
    if not (1 <= c.height <= MAX_SIDE and 1 <= c.width <= MAX_SIDE):
        raise ValueError(f"image size {c.height}x{c.width} outside 1..{MAX_SIDE}")
    if not (0 <= c.pad_bottom <= MAX_PAD and 0 <= c.pad_right <= MAX_PAD):
        raise ValueError(f"padding {c.pad_bottom},{c.pad_right} outside 0..{MAX_PAD}")
    if c.channels not in (1, 3, 4) or not 0 <= c.codec_id <= 255:
        raise ValueError(f"channels {c.channels} not in 1, 3, 4 or codec id {c.codec_id} not a byte")
    if len(c.fingerprint) != 16:
        raise ValueError("fingerprint must be 16 bytes")
    if not (1 <= len(c.streams) <= MAX_STREAMS):
        raise ValueError(f"need 1..{MAX_STREAMS} streams")
    if any(len(x) > MAX_STREAM_BYTES for x in c.streams):
        raise ValueError("stream too long")
    if not (0 <= s.steps < 2**16 and 0 <= s.t_start < 2**16 and 0 <= s.seed < SEED_LIMIT
            and math.isfinite(s.eta) and abs(s.eta) <= _F32_MAX):
        raise ValueError(f"sampler spec {s} does not fit u16 steps/t_start, a finite float32 "
                         f"eta, u64 seed")
    head = _FIXED.pack(
        MAGIC, VERSION, 0, c.height, c.width, c.pad_bottom, c.pad_right, c.channels,
        c.codec_id, 0, c.fingerprint, s.steps, s.t_start, s.eta, s.seed, len(c.streams),
    )
    lens = struct.pack(f"<{len(c.streams)}I", *(len(x) for x in c.streams))
    return seal(head + lens + b"".join(c.streams))


def seal(body: bytes) -> bytes:
    """Append the CRC32 trailer (also used by tests to forge well-sealed corrupt files)."""
    return body + struct.pack("<I", zlib.crc32(body))


def unpack(data: bytes, expected_fingerprint: bytes | None = None,
           expected_codec: int | None = None) -> Container:
    """Parse and validate; every problem of ``data`` is a :class:`BitstreamError` (an
    ``expected_fingerprint`` that is not 16 bytes: a TypeError, the caller's)."""
    if expected_fingerprint is not None and not (
            isinstance(expected_fingerprint, bytes) and len(expected_fingerprint) == 16):
        raise TypeError(f"expected_fingerprint must be 16 bytes, got "
                        f"{type(expected_fingerprint).__name__} {expected_fingerprint!r:.40}")
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise BitstreamError(f"expected bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) < FIXED_SIZE + 4 + CRC_SIZE:
        raise BitstreamError(f"file too short ({len(data)} bytes) for a FaSDiff container")
    if data[:4] != MAGIC:
        raise BitstreamError(f"bad magic {data[:4]!r}, expected {MAGIC!r}: not a FaSDiff file")
    version = struct.unpack_from("<H", data, 4)[0]
    if version != VERSION:
        raise BitstreamError(f"unsupported format version {version} (this decoder reads {VERSION})")
    (crc,) = struct.unpack_from("<I", data, len(data) - CRC_SIZE)
    if zlib.crc32(data[:-CRC_SIZE]) != crc:
        raise BitstreamError("checksum mismatch: the file is truncated or corrupt")
    (_, _, flags, h, w, pb, pr, ch, codec, res, fp, steps, t0, eta, seed, n) = _FIXED.unpack_from(data)
    if flags or res:
        raise BitstreamError(f"reserved header bits set (flags={flags}, reserved={res})")
    if not (1 <= h <= MAX_SIDE and 1 <= w <= MAX_SIDE):
        raise BitstreamError(f"image size {h}x{w} outside 1..{MAX_SIDE}")
    if pb > MAX_PAD or pr > MAX_PAD:
        raise BitstreamError(f"padding {pb},{pr} exceeds {MAX_PAD}")
    if ch not in (1, 3, 4):
        raise BitstreamError(f"channel count {ch} is not 1, 3 or 4")
    if expected_codec is not None and codec != expected_codec:
        def name(c: int) -> str:
            return f"{CODEC_NAMES.get(c, 'unknown')} (codec {c})"

        raise BitstreamError(f"the file is for {name(codec)}, this model is "
                             f"{name(expected_codec)}: decode it with a model of its kind")
    if not math.isfinite(eta):
        raise BitstreamError("sampler eta is not finite")
    if not (1 <= n <= MAX_STREAMS):
        raise BitstreamError(f"stream count {n} outside 1..{MAX_STREAMS}")
    end_lens = FIXED_SIZE + 4 * n
    if end_lens + CRC_SIZE > len(data):
        raise BitstreamError("file too short for its stream-length table")
    lens = struct.unpack_from(f"<{n}I", data, FIXED_SIZE)
    if any(x > MAX_STREAM_BYTES for x in lens):
        raise BitstreamError(f"stream length {max(lens)} exceeds limit {MAX_STREAM_BYTES}")
    if end_lens + sum(lens) + CRC_SIZE != len(data):
        raise BitstreamError(
            f"stream lengths sum to {sum(lens)} but the file holds "
            f"{len(data) - end_lens - CRC_SIZE} payload bytes"
        )
    if expected_fingerprint is not None and fp != expected_fingerprint:
        raise BitstreamError(
            f"model fingerprint {fp.hex()} does not match this model ({expected_fingerprint.hex()}):"
            " the file was written by other weights, config or entropy tables (decode it"
            " with those it was compressed with: its --model_dir, or its run's --step and"
            " --weights)"
        )
    streams, pos = [], end_lens
    for x in lens:
        streams.append(data[pos : pos + x])
        pos += x
    return Container(h, w, pb, pr, ch, codec, fp, tuple(streams), SamplerSpec(steps, t0, eta, seed))

"""Container format and malformed input: every bad file is a BitstreamError, quickly."""

import dataclasses
import struct
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fasdiff_jax.coding import BitstreamError, Container, SamplerSpec, pack, unpack
from fasdiff_jax.coding import container as ct
from fasdiff_jax.coding import decode_symbols, encode_symbols
from fasdiff_jax.errors import FasdiffError
from fasdiff_jax.models import entropy as E

FP = bytes(range(16))
TABLES = E.gaussian_tables(E.scale_thresholds(16, hi=8.0))


def _good(n_sym=200, seed=0):
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, 16, n_sym)
    sym = np.round(rng.normal(0, 1.5, n_sym)).astype(np.int64)
    s = encode_symbols(sym, idx, TABLES)
    c = Container(61, 77, 3, 51, 3, 1, FP, (s, b"\x00" * 8), SamplerSpec(10, 300, 0.5, 1234))
    return pack(c), idx, sym


GOOD, IDX, SYM = _good()


def _parse_and_decode(data: bytes):
    c = unpack(data, FP, 1)
    decode_symbols(c.streams[0], IDX, TABLES)
    return c


def test_roundtrip_fields_and_header_size():
    c = _parse_and_decode(GOOD)
    assert (c.height, c.width, c.pad_bottom, c.pad_right, c.channels) == (61, 77, 3, 51, 3)
    assert c.sampler == SamplerSpec(10, 300, 0.5, 1234)
    assert len(GOOD) - sum(map(len, c.streams)) == ct.header_bytes(2) == 70
    np.testing.assert_array_equal(decode_symbols(c.streams[0], IDX, TABLES), SYM)
    assert issubclass(BitstreamError, FasdiffError)


def _recrc(b: bytes) -> bytes:
    return ct.seal(b[:-4])


@pytest.mark.parametrize(
    "mutate, msg",
    [
        (lambda b: b[:10], "too short"),
        (lambda b: b"XXXX" + b[4:], "magic"),
        (lambda b: _recrc(b[:4] + struct.pack("<H", 2) + b[6:]), "version"),
        (lambda b: b[:30] + bytes([b[30] ^ 1]) + b[31:], "checksum"),
        (lambda b: _recrc(b[:8] + struct.pack("<I", 10**6) + b[12:]), "image size"),
        (lambda b: _recrc(b[:56] + struct.pack("<H", 60000) + b[58:]), "stream count"),
        (lambda b: _recrc(b[:58] + struct.pack("<I", 2**31) + b[62:]), "stream length"),
        (lambda b: _recrc(b[:58] + struct.pack("<I", 5) + b[62:]), "stream lengths"),
        (lambda b: _recrc(b[:24] + bytes(16) + b[40:]), "fingerprint .* --model_dir, or"),
        (lambda b: _recrc(b[:21] + bytes([2]) + b[22:]),  # named as codec info names them
         r"the file is for fasdiff \(codec 2\), this model is mbt2018-mean \(codec 1\)"),
        (lambda b: _recrc(b[:20] + bytes([2]) + b[21:]), "channel"),
        (lambda b: _recrc(b[:6] + b"\x01\x00" + b[8:]), "reserved"),
    ],
)
def test_specific_malformations(mutate, msg):
    with pytest.raises(BitstreamError, match=msg):
        _parse_and_decode(mutate(GOOD))


def test_short_stream_for_many_symbols_rejected_before_decoding():
    idx = np.zeros(10**7, np.int64) + 15  # wide tables: >= several bits per symbol
    with pytest.raises(BitstreamError, match="too short"):
        decode_symbols(b"\x01" * 16, idx, TABLES)


def _check(data: bytes, must_fail: bool):
    """Only BitstreamError may escape; corrupt files caught by size/CRC checks must fail.

    A payload change with a *recomputed* CRC can be undetectable (it decodes other symbols).
    """
    t = time.process_time()  # CPU time: robust to a loaded shared machine
    try:
        _parse_and_decode(data)
        assert not must_fail, "corrupt file accepted"
    except BitstreamError as e:
        assert len(str(e)) > 10
    assert time.process_time() - t < 1.0


_mut = st.one_of(
    st.tuples(st.just("truncate"), st.integers(0, len(GOOD) - 1)),
    st.tuples(st.just("flip"), st.integers(0, 8 * len(GOOD) - 1)),
    st.tuples(st.just("flip_recrc"), st.integers(0, 8 * (len(GOOD) - 4) - 1)),
    st.tuples(st.just("field_recrc"), st.tuples(st.integers(0, 61), st.binary(min_size=1, max_size=4))),
    st.tuples(st.just("random"), st.binary(max_size=200)),
    st.tuples(st.just("random_magic"), st.binary(max_size=200)),
    st.tuples(st.just("append"), st.binary(min_size=1, max_size=50)),
)


@settings(max_examples=2500, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(_mut)
def test_fuzz_malformed_inputs_raise_only_bitstream_error(m):
    kind, arg = m
    b = GOOD
    if kind == "truncate":
        data = b[:arg]
    elif kind == "flip":
        data = bytearray(b)
        data[arg // 8] ^= 1 << (arg % 8)
        data = bytes(data)
    elif kind == "flip_recrc":
        data = bytearray(b)
        data[arg // 8] ^= 1 << (arg % 8)
        data = _recrc(bytes(data))
    elif kind == "field_recrc":
        off, val = arg
        data = _recrc(b[:off] + val + b[off + len(val):])[: len(b)]
        data = _recrc(data) if len(data) == len(b) else data
    elif kind == "random":
        data = arg
    elif kind == "random_magic":
        data = _recrc(b"FSDC\x01\x00" + arg + b"\x00\x00\x00\x00")
    else:
        data = b + arg
    _check(data, kind in ("truncate", "flip", "random", "append"))


def test_pack_rejects_unrepresentable():
    with pytest.raises(ValueError):
        pack(Container(0, 5, 0, 0, 3, 1, FP, (b"",)))
    with pytest.raises(ValueError):
        pack(Container(5, 5, 0, 0, 3, 1, b"short", (b"",)))


_SMALL = Container(5, 5, 59, 59, 3, 1, FP, (b"ab",), SamplerSpec(2, 3, 0.5, 7))


@pytest.mark.parametrize("field, value, error, message", [
    ("height", 10.0, TypeError, "height 10.0 .float."),  # was struct.error
    ("pad_bottom", 1.5, TypeError, "pad_bottom 1.5"),
    ("height", "10", TypeError, "height '10' .str."),  # was a TypeError from a comparison
    ("channels", True, TypeError, "channels True .bool."),
    ("sampler", None, TypeError, "sampler must be a SamplerSpec, got NoneType"),  # AttributeError
    ("sampler", SamplerSpec(steps=2.0), TypeError, "sampler steps 2.0"),
    ("sampler", SamplerSpec(eta="0.5"), TypeError, "eta must be a real number"),
    ("fingerprint", "x" * 16, TypeError, "fingerprint must be bytes"),
    ("sampler", SamplerSpec(eta=1e40), ValueError, "finite float32 eta"),  # was OverflowError
    ("sampler", SamplerSpec(eta=float("inf")), ValueError, "finite float32 eta"),
    ("pad_right", 4096, ValueError, "padding 59,4096 outside 0..4095"),
])
def test_pack_refuses_wrong_types_and_ranges_by_field(field, value, error, message):
    """``pack`` said ValueError but raised struct.error, OverflowError or AttributeError from
    inside; now a TypeError (wrong type) or ValueError (out of range) naming the field."""
    with pytest.raises(error, match=message):
        pack(dataclasses.replace(_SMALL, **{field: value}))


def test_pack_takes_numpy_scalars_as_integers_and_reals():
    spec = SamplerSpec(np.uint16(2), 3, np.float32(0.5), np.uint64(2**64 - 1))
    c = unpack(pack(dataclasses.replace(_SMALL, height=np.int64(5), sampler=spec)))
    assert c.height == 5 and c.sampler == SamplerSpec(2, 3, 0.5, 2**64 - 1)


def test_non_integer_symbols_and_indexes_are_refused():
    """Float symbols were truncated toward zero and a float table index picked a table,
    silently: both are a TypeError; an expected fingerprint that is not 16 bytes too (it was
    an AttributeError on a mismatch)."""
    with pytest.raises(TypeError, match="symbols must be integers, got dtype float64"):
        encode_symbols(SYM + 0.6, IDX, TABLES)
    with pytest.raises(TypeError, match="table indexes must be integers, got dtype float64"):
        encode_symbols(SYM, IDX + 0.7, TABLES)
    with pytest.raises(TypeError, match="table indexes must be integers, got dtype bool"):
        decode_symbols(unpack(GOOD).streams[0], IDX > 3, TABLES)
    for sym in (SYM.astype(np.int8), SYM.astype(np.int32), SYM.astype(np.uint64) % 4):
        data = encode_symbols(sym, IDX.astype(np.uint16), TABLES)
        np.testing.assert_array_equal(decode_symbols(data, IDX, TABLES), sym.astype(np.int64))
    for fp in ("x" * 16, FP[:8], FP.hex()):
        with pytest.raises(TypeError, match="expected_fingerprint must be 16 bytes"):
            unpack(GOOD, fp)

"""Host-side entropy coding of integer symbols with ``constriction``'s range coder.

Each element is coded with the integer pmf row its ``table_idx`` selects (a
:class:`fasdiff_jax.models.entropy.CdfTables`). Within one :meth:`SymbolEncoder.encode` call the
elements are grouped by table (stable order), so one cached ``constriction`` ``Categorical``
model per table codes a whole group in one vectorised call (no per-symbol Python); the decoder
knows the same ``table_idx`` (it comes from data it has already decoded) and so reproduces the
order. Symbols outside a row's support are coded as the row's escape symbol (probability
``2**-ESCAPE_BITS``), followed at the end of the call by their value with a uniform 16-bit
model: an escape costs 14 + 16 = 30 bits, the cost the training likelihood floor (1e-9) puts
on it, so file sizes track the model estimate even for untrained models.

Several calls can share one range-coder stream (a hyperprior codes ``z`` then ``y`` into one
stream), which saves one coder flush (~32 bits) per extra stream. Trailing zero bytes of the
coder output are stripped (the decoder pads them back), so a stream never ends in a zero
byte; the decoder rejects one that does.

The integer pmfs are handed to ``constriction`` as exact float64 integers; its fixed-point
approximation is a deterministic function of those bits, so encoder and decoder agree.
"""

from __future__ import annotations

from typing import Any

import constriction
import numpy as np

from fasdiff_jax.coding.errors import BitstreamError
from fasdiff_jax.models.entropy import SYMBOL_LIMIT, CdfTables

_MODEL_CACHE: dict[tuple[bytes, int], object] = {}
_UNIFORM = None


def _model(tables: CdfTables, i: int):
    key = (tables.digest(), i)
    m = _MODEL_CACHE.get(key)
    if m is None:
        if len(_MODEL_CACHE) > 100_000:
            _MODEL_CACHE.clear()
        row = tables.pmf[i, : tables.length[i] + 1].astype(np.float64)
        m = constriction.stream.model.Categorical(row, perfect=False)
        _MODEL_CACHE[key] = m
    return m


def _uniform():
    global _UNIFORM
    if _UNIFORM is None:
        _UNIFORM = constriction.stream.model.Uniform(2 * SYMBOL_LIMIT)
    return _UNIFORM


def _integers(values: Any, what: str) -> np.ndarray:
    """``values`` as flat int64; other dtypes are refused (float symbols were truncated
    toward zero, a float table index picked a table, silently)."""
    arr = np.asarray(values)
    if not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"{what} must be integers, got dtype {arr.dtype} (round them first)")
    return arr.reshape(-1).astype(np.int64)


def _check_idx(table_idx: np.ndarray, tables: CdfTables) -> np.ndarray:
    idx = _integers(table_idx, "table indexes")
    if idx.size and (idx.min() < 0 or idx.max() >= len(tables.offset)):
        raise ValueError(f"table index out of range [0, {len(tables.offset)})")
    return idx


def _groups(sorted_idx: np.ndarray):
    """(start, end) of the runs of equal values in a sorted index array."""
    if not sorted_idx.size:
        return []
    bounds = np.flatnonzero(np.diff(sorted_idx)) + 1
    return zip(np.concatenate([[0], bounds]).tolist(), np.concatenate([bounds, [sorted_idx.size]]).tolist())


def min_bits(table_idx: np.ndarray, tables: CdfTables) -> float:
    """A lower bound on the coded size of any symbols with these tables (guards decoding)."""
    idx = _check_idx(table_idx, tables)
    pmax = tables.pmf.max(axis=1).astype(np.float64) / (1 << tables.precision)
    return float(-np.log2(pmax)[idx].sum())


class SymbolEncoder:
    """Accumulates :meth:`encode` calls into one range-coded stream."""

    def __init__(self) -> None:
        self._enc = constriction.stream.queue.RangeEncoder()

    def encode(self, symbols: np.ndarray, table_idx: np.ndarray, tables: CdfTables) -> None:
        """Code integer ``symbols`` (any shape), element i with row ``table_idx[i]``."""
        sym = _integers(symbols, "symbols")
        idx = _check_idx(table_idx, tables)
        if sym.shape != idx.shape:
            raise ValueError(f"symbols {sym.shape} and table indexes {idx.shape} differ in size")
        if sym.size and (sym.min() < -SYMBOL_LIMIT or sym.max() >= SYMBOL_LIMIT):
            raise ValueError(f"symbols must lie in [-{SYMBOL_LIMIT}, {SYMBOL_LIMIT})")
        order = np.argsort(idx, kind="stable")
        sym, idx = sym[order], idx[order]
        rel = sym - tables.offset[idx]
        esc = (rel < 0) | (rel >= tables.length[idx])
        rel = np.where(esc, tables.length[idx], rel).astype(np.int32)
        for s, e in _groups(idx):
            self._enc.encode(rel[s:e], _model(tables, int(idx[s])))
        if esc.any():
            self._enc.encode((sym[esc] + SYMBOL_LIMIT).astype(np.int32), _uniform())

    def finish(self) -> bytes:
        return self._enc.get_compressed().astype("<u4").tobytes().rstrip(b"\0")


class SymbolDecoder:
    """Decodes, call by call, what :class:`SymbolEncoder` wrote; :meth:`finish` checks the end.

    Every problem (stream too short for the symbols asked, undecodable or left-over data) is a
    :class:`BitstreamError`.
    """

    def __init__(self, data: bytes) -> None:
        data = bytes(data)
        if data.endswith(b"\0"):
            raise BitstreamError("symbol stream ends in a zero byte (not written by this encoder)")
        self._bits = 8 * len(data)
        self._min_bits = 0.0
        words = np.frombuffer(data + b"\0" * (-len(data) % 4), "<u4").astype(np.uint32)
        self._dec = constriction.stream.queue.RangeDecoder(words)

    def decode(self, table_idx: np.ndarray, tables: CdfTables) -> np.ndarray:
        """int64 symbols for elements with rows ``table_idx`` (flattened, original order)."""
        idx = _check_idx(table_idx, tables)
        # cheap plausibility bound first, so a tiny stream cannot make us decode millions
        self._min_bits += min_bits(idx, tables)
        if self._bits + 64 < self._min_bits:
            raise BitstreamError(
                f"symbol stream of {self._bits // 8} bytes is too short for {idx.size} more symbols"
            )
        order = np.argsort(idx, kind="stable")
        sidx = idx[order]
        try:
            rel = np.empty(idx.size, np.int64)
            for s, e in _groups(sidx):
                rel[s:e] = self._dec.decode(_model(tables, int(sidx[s])), e - s)
            esc = rel == tables.length[sidx]
            sym = rel + tables.offset[sidx]
            n_esc = int(esc.sum())
            if n_esc:
                sym[esc] = self._dec.decode(_uniform(), n_esc).astype(np.int64) - SYMBOL_LIMIT
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:  # constriction (pyo3) may report corrupt data as a panic
            raise BitstreamError(f"undecodable symbol stream: {e}") from e
        out = np.empty_like(sym)
        out[order] = sym
        return out

    def finish(self) -> None:
        if not self._dec.maybe_exhausted():
            raise BitstreamError("symbol stream has data left after the last symbol")


def encode_symbols(symbols: np.ndarray, table_idx: np.ndarray, tables: CdfTables) -> bytes:
    """One-call stream: see :meth:`SymbolEncoder.encode`."""
    enc = SymbolEncoder()
    enc.encode(symbols, table_idx, tables)
    return enc.finish()


def decode_symbols(data: bytes, table_idx: np.ndarray, tables: CdfTables) -> np.ndarray:
    """Inverse of :func:`encode_symbols`; int64 symbols in the original element order."""
    dec = SymbolDecoder(data)
    out = dec.decode(table_idx, tables)
    dec.finish()
    return out

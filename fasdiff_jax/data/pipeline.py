"""Grain input pipeline: per-process shard, seeded shuffle, random resized crop / flip,
batching, worker processes, and one global ``jax.Array`` per step.

Usage::

    it = make_train_iterator(cfg, mesh)          # cfg: DataConfig, dict, or ConfigDict
    batch = next(it)                             # {"image": uint8 (B, S, S, 3), "index": int32 (B,)}
    state = it.get_state(); ...; it.set_state(state)   # exact resume (store with Orbax)

``batch["image"]`` is a global array of the *global* batch, its batch dimension sharded
over the mesh's ``data``/``fsdp`` axes (:func:`fasdiff_jax.sharding.batch_sharding`); each
process only reads and transfers its own ``global_batch_size / process_count`` examples.
Images stay uint8 to keep host->device traffic small; :func:`to_model_input` maps them to
float32 in [-1, 1] on device. ``index`` is the source index of each example (for audits).

Order of operations (all lazy, random access, so a state is just a position):
source -> tag index -> keep ``process_index::process_count`` -> shuffle(seed, reshuffled per
epoch) -> repeat(num_epochs) -> random crop/flip (per-example rng from seed and position)
-> batch -> read ahead (``prefetch_batches`` on ``read_threads`` threads) -> worker processes
(``mp_prefetch``).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
from PIL import Image

from fasdiff_jax.errors import DataError


@dataclasses.dataclass
class DataConfig:
    """Fields read from ``config.data`` (or the config itself) by :meth:`from_config`."""

    source: str = "embedded:train"  # see fasdiff_jax.data.sources.open_source
    image_size: int = 256
    global_batch_size: int = 8
    seed: int = 0
    shuffle: bool = True
    num_epochs: int | None = None  # None: repeat forever
    augment: bool = True  # random resized crop + flip; False: resize the whole image
    crop_scale: tuple[float, float] = (0.8, 1.0)  # area fraction of the random crop
    crop_ratio: tuple[float, float] = (0.9, 1.1)  # aspect ratio range of the random crop
    flip: bool = True
    num_workers: int = 0  # Grain worker processes (0: decode in the training process)
    worker_buffer_size: int = 2
    # Batches each process (or worker) decodes ahead, on read_threads threads. Grain's own
    # default, 500 elements on 16 threads, is sized for small records: here an element is a
    # whole batch, so it held 500 batches (3 GB at 32 x 256 px) and, from the first batch or
    # a restore on, decoded them all at once, on a 2-core CPU taking the cores from the first
    # steps (a 15-step resume of a small baseline: 12-13 s -> 3.5-4.5 s; benchmarks/RESULTS.md).
    read_threads: int = 8
    prefetch_batches: int = 8
    tfds_data_dir: str | None = None
    cache_dir: str | None = None  # where the embedded default is built
    batch_axes: tuple[str, ...] = ("data", "fsdp")

    # the least value of each integer field (read_threads/prefetch_batches 0: read in the
    # training thread; seed >= 0: Grain's and numpy's seeds are unsigned)
    _LEAST = {"image_size": 1, "global_batch_size": 1, "seed": 0, "num_workers": 0,
              "worker_buffer_size": 1, "read_threads": 0, "prefetch_batches": 0}

    def __post_init__(self) -> None:
        def whole(v: Any, least: int) -> bool:
            return not isinstance(v, bool) and isinstance(v, (int, np.integer)) and v >= least

        for name, least in self._LEAST.items():
            value = getattr(self, name)
            if not whole(value, least):
                raise DataError(f"data config: {name} must be an integer >= {least}, got {value!r}")
        if self.num_epochs is not None and not whole(self.num_epochs, 1):
            raise DataError(f"data config: num_epochs must be an integer >= 1, or None to repeat "
                            f"the records for as long as training runs; got {self.num_epochs!r}")
        for name, most in (("crop_scale", 1.0), ("crop_ratio", float("inf"))):
            pair = getattr(self, name)
            if not (isinstance(pair, (tuple, list)) and len(pair) == 2
                    and all(isinstance(v, (int, float, np.number)) and not isinstance(v, bool)
                            for v in pair) and 0 < pair[0] <= pair[1] <= most):
                bound = " <= 1" if most == 1.0 else ""
                raise DataError(f"data config: {name} must be two numbers (lo, hi) with "
                                f"0 < lo <= hi{bound}, got {pair!r}")

    @classmethod
    def from_config(cls, cfg: Any) -> "DataConfig":
        """From a DataConfig, a mapping or a ConfigDict (its ``data`` sub-config if present)."""
        if isinstance(cfg, cls):
            return cfg
        if not isinstance(cfg, Mapping) and hasattr(cfg, "to_dict"):
            cfg = cfg.to_dict()
        if not isinstance(cfg, Mapping):
            cfg = vars(cfg)
        if isinstance(cfg.get("data"), Mapping):
            cfg = cfg["data"]
        elif cfg.get("data") is not None and hasattr(cfg["data"], "to_dict"):
            cfg = cfg["data"].to_dict()
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in cfg.items() if k in names}
        for k in ("crop_scale", "crop_ratio", "batch_axes"):
            if k in kw:
                kw[k] = tuple(kw[k])
        return cls(**kw)


@dataclasses.dataclass(frozen=True)
class _TagIndex:
    """Keep only the image and add its source index (positions past one epoch wrap)."""

    size: int

    def __call__(self, index: int, element: Mapping[str, Any]) -> dict[str, Any]:
        return {"image": element["image"], "index": np.int32(index % self.size)}


@dataclasses.dataclass(frozen=True)
class CropFlip:
    """Random resized crop + horizontal flip, to ``size``: the crop's area is ``scale`` of the
    largest centred square's and its aspect within ``ratio``, for any image shape (of the whole
    image's area, a 1920x1080 photo's crops were 1.14-1.40 wide per high, resized to a square:
    faces stretched)."""

    size: int
    scale: tuple[float, float] = (0.8, 1.0)
    ratio: tuple[float, float] = (0.9, 1.1)
    flip: bool = True
    augment: bool = True

    def __call__(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        img = np.asarray(element["image"])
        if img.ndim != 3 or img.shape[-1] != 3 or img.dtype != np.uint8:
            raise DataError(f"expected uint8 (H, W, 3) images, got {img.dtype} {img.shape}")
        h, w = img.shape[:2]
        box = self.crop_box(h, w, rng) if self.augment else _centre_square(h, w)
        out = Image.fromarray(img)
        if box != (0, 0, w, h) or (h, w) != (self.size, self.size):
            out = out.resize((self.size, self.size), Image.BILINEAR, box=box)
        out = np.asarray(out)
        if self.augment and self.flip and rng.random() < 0.5:
            out = out[:, ::-1]
        return {"image": np.ascontiguousarray(out), "index": element["index"]}

    def crop_box(self, h: int, w: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
        """(left, top, right, bottom). A crop wider or higher than the image is shrunk, both
        sides alike, to fit: its aspect is the drawn one (to rounding), its area less."""
        area = min(h, w) ** 2 * rng.uniform(*self.scale)
        ratio = np.exp(rng.uniform(np.log(self.ratio[0]), np.log(self.ratio[1])))
        cw, ch = np.sqrt(area * ratio), np.sqrt(area / ratio)
        fit = min(1.0, w / cw, h / ch)
        cw, ch = max(1, min(w, round(cw * fit))), max(1, min(h, round(ch * fit)))
        x0 = int(rng.integers(0, w - cw + 1))
        y0 = int(rng.integers(0, h - ch + 1))
        return x0, y0, x0 + cw, y0 + ch


def _centre_square(h: int, w: int) -> tuple[int, int, int, int]:
    s = min(h, w)
    return (w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s


def open_data_source(cfg: DataConfig) -> Sequence[Mapping[str, Any]]:
    """``cfg.source`` opened with ``cfg``'s data and cache folders and image size."""
    from fasdiff_jax.data.sources import open_source

    return open_source(cfg.source, data_dir=cfg.tfds_data_dir, cache_dir=cfg.cache_dir,
                       image_size=cfg.image_size)


def make_dataset(
    cfg: DataConfig,
    source: Sequence[Mapping[str, Any]] | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
):
    """The per-process ``grain.IterDataset`` of local numpy batches (no device transfer)."""
    import grain

    if process_index is None or process_count is None:
        import jax

        process_index, process_count = jax.process_index(), jax.process_count()
    if cfg.global_batch_size % process_count:
        raise DataError(
            f"global_batch_size {cfg.global_batch_size} is not divisible by "
            f"process_count {process_count}"
        )
    local_batch = cfg.global_batch_size // process_count
    if source is None:
        source = open_data_source(cfg)
    n = len(source)
    usable = (n // process_count) * process_count  # equal shards: equal step counts
    if usable // process_count < 1:
        raise DataError(f"source {cfg.source!r} has {n} items, fewer than {process_count} processes")
    ds = grain.MapDataset.source(source).map_with_index(_TagIndex(n))
    ds = ds[:usable][process_index::process_count]
    if cfg.shuffle:
        ds = ds.shuffle(seed=cfg.seed)
    ds = ds.repeat(cfg.num_epochs)
    ds = ds.random_map(
        CropFlip(cfg.image_size, tuple(cfg.crop_scale), tuple(cfg.crop_ratio), cfg.flip, cfg.augment),
        seed=cfg.seed,
    )
    ds = ds.batch(local_batch, drop_remainder=True)
    it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=cfg.read_threads,
                                                 prefetch_buffer_size=cfg.prefetch_batches))
    if cfg.num_workers > 0:
        from absl import flags

        if not flags.FLAGS.is_parsed():  # grain reads absl flags in its workers
            flags.FLAGS.mark_as_parsed()
        it_ds = it_ds.mp_prefetch(
            grain.MultiprocessingOptions(
                num_workers=cfg.num_workers, per_worker_buffer_size=cfg.worker_buffer_size
            )
        )
    return it_ds


def stream_batches(cfg: DataConfig, records: int, process_count: int) -> int | None:
    """How many batches each process's stream of ``records`` holds (None: endless). As
    :func:`make_dataset` cuts them: equal shards, epochs running into each other."""
    if cfg.num_epochs is None:
        return None
    local_batch = cfg.global_batch_size // process_count
    return cfg.num_epochs * (records // process_count) // local_batch


def batch_order(cfg: DataConfig, records: int) -> dict[str, Any]:
    """What fixes which images each step gets: a saved Grain position resumes the same batches
    only when all of these are as they were (the source's name is not among them, so data moved
    to another path resumes as before)."""
    return {"records": records, "seed": cfg.seed, "shuffle": cfg.shuffle,
            "global_batch_size": cfg.global_batch_size, "num_epochs": cfg.num_epochs}


def state_workers(state: Mapping[str, Any]) -> int | None:
    """How many Grain worker processes (``num_workers``) wrote a state of :func:`make_dataset`'s
    iterator; None for a form this Grain does not write."""
    if set(state) == {"next_index"}:
        return 0
    inner = state.get("iterators_in_use_states")
    return len(inner) if isinstance(inner, list) and inner else None


def state_position(state: Mapping[str, Any]) -> int | None:
    """The batches a state of :func:`make_dataset`'s iterator has handed out, whichever
    ``num_workers`` wrote it (None: a form not known, or a worker run out). With W workers,
    Grain's ``mp_prefetch`` (0.2.18) has worker i yield batches i, i+W, ... and takes them in
    turn, so each worker's position sums to the stream's."""
    workers = state_workers(state)
    if workers == 0:
        return int(state["next_index"])
    if workers is None:
        return None
    try:
        position = sum(int(s["next_index"]) for s in state["iterators_in_use_states"])
    except (TypeError, KeyError, ValueError):
        return None
    # the one state Grain writes at that position: anything else (a worker run out, futures)
    return position if state == state_at(position, workers) else None


def state_at(position: int, num_workers: int) -> dict[str, Any]:
    """The Grain state of :func:`make_dataset`'s iterator with ``num_workers`` workers after
    ``position`` batches (the inverse of :func:`state_position`)."""
    if num_workers == 0:
        return {"next_index": position}
    return {"next_index_in_cycle": position % num_workers, "next_index_in_datasets": num_workers,
            "iterators_in_use_indices": list(range(num_workers)),
            "iterators_in_use_states": [{"next_index": -(-(position - i) // num_workers)}
                                        for i in range(num_workers)],
            "exhausted": [0] * num_workers, "future_states": {}}


class TrainIterator:
    """Yields ``{"image", "index"}`` global jax.Arrays; ``get_state``/``set_state`` resume exactly.

    ``order`` (:func:`batch_order`) is saved with the state so that a resume can tell when the
    same position now means other batches."""

    def __init__(self, dataset: Any, mesh: Any, global_batch_size: int,
                 batch_axes: Sequence[str] = ("data", "fsdp"),
                 order: Mapping[str, Any] | None = None, num_workers: int = 0):
        self.grain_iterator = iter(dataset)
        self.mesh, self.global_batch_size, self.batch_axes = mesh, global_batch_size, tuple(batch_axes)
        self.order = dict(order or {})
        self.num_workers = num_workers

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self

    def __next__(self) -> dict[str, Any]:
        import jax

        from fasdiff_jax.sharding import batch_sharding

        local = next(self.grain_iterator)
        return {
            k: jax.make_array_from_process_local_data(
                batch_sharding(self.mesh, v.ndim, self.batch_axes), v,
                (self.global_batch_size,) + v.shape[1:],
            )
            for k, v in local.items()
        }

    def get_state(self) -> dict[str, Any]:
        """Grain iterator state (a small dict); store it next to the model checkpoint."""
        return self.grain_iterator.get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        """Resume from :meth:`get_state`: the next batches are exactly those that followed it,
        also where the state was written with another ``num_workers`` (Grain's own state of
        another worker count failed with a KeyError, or resumed at other batches)."""
        if state_workers(state) != self.num_workers:
            position = state_position(state)
            if position is None:
                saved = state_workers(state)
                were = "another Grain" if saved is None else f"data.num_workers={saved}"
                raise DataError(f"the saved data position (written with {were}: "
                                f"{json.dumps(state)[:200]}) cannot be resumed with "
                                f"data.num_workers={self.num_workers}: rerun with the saving "
                                f"run's data.num_workers")
            state = state_at(position, self.num_workers)
        self.grain_iterator.set_state(state)

    def close(self) -> None:
        """Stop worker processes now (otherwise they stop when the iterator is collected)."""
        close = getattr(self.grain_iterator, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> "TrainIterator":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def make_train_iterator(
    config: Any,
    mesh: Any,
    source: Sequence[Mapping[str, Any]] | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
) -> TrainIterator:
    """Training iterator for ``config`` (DataConfig / dict / ConfigDict) on ``mesh``.

    ``source`` overrides ``config.source`` (any random-access sequence of dicts with
    ``image``). Process index/count default to JAX's.
    """
    from fasdiff_jax.sharding import batch_shards

    cfg = DataConfig.from_config(config)
    for axis in cfg.batch_axes:
        if axis not in mesh.axis_names:
            raise DataError(f"data config: batch_axes {cfg.batch_axes}: {axis!r} is not an axis "
                            f"of the mesh {tuple(mesh.axis_names)}")
    shards = batch_shards(mesh, cfg.batch_axes)
    if cfg.global_batch_size % shards:
        raise DataError(
            f"global_batch_size {cfg.global_batch_size} is not divisible by the {shards} "
            f"shards of the mesh's batch axes {cfg.batch_axes} (mesh {dict(mesh.shape)})"
        )
    if source is None:
        source = open_data_source(cfg)
    ds = make_dataset(cfg, source, process_index, process_count)
    return TrainIterator(ds, mesh, cfg.global_batch_size, cfg.batch_axes,
                         batch_order(cfg, len(source)), cfg.num_workers)


def to_model_input(images: Any) -> Any:
    """uint8 images -> float32 in [-1, 1] (works on numpy or jax arrays, e.g. inside jit)."""
    return images.astype("float32") / 127.5 - 1.0

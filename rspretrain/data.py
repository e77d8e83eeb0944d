"""The WebDataset streaming pipeline: resampling, rank x worker splitting, decode, crop, batching.

Every DataLoader worker of every rank is one *slot* (``slot = rank * workers + worker``) and reads its own
stream, rebuilt at each epoch from ``(seed, epoch, slot)``:

- resampled mode (default): the slot draws shards with replacement, forever;
- split mode (``resampled: false``): the epoch's shard order is shuffled with ``(seed, epoch)``, the same on
  every slot, and slot ``s`` reads shards ``s, s + slots, s + 2 * slots, ...``, so no two slots read the same
  sample in an epoch (a slot that runs dry wraps around to a fresh pass rather than stall its rank).

Samples go through a seeded shuffle buffer, then decode and crop (rspretrain.augment). The crop and flip of a
sample are drawn from its position in the slot's stream (its *cursor*), not from a global RNG, so a stream is
a pure function of ``(seed, epoch, slot)``. Each batch reports the cursor of the worker that made it;
`StreamState` keeps them, and a resumed run skips each worker's stream to its cursor (reading tar bytes, not
decoding) and goes on with exactly the batches the uninterrupted run would have seen.

What a batch holds follows ``data.decode``: ``cpu`` (default), uint8 (N, C, H, W) crops that the training step
normalises on the device (`rspretrain.augment.normalize`); ``device``, the JPEG bytes and crops
(`EncodedBatch`) that `Batch.images_on` decodes and crops on the device. Both give the images the float path
(``output="float"``, normalised in the worker, kept for comparison) gives, from the same crops.

A sample that fails to decode (no image member, undecodable bytes) is skipped and counted (`Batch.skipped`);
a shard that cannot be read to its end (a tar cut short, an unreachable URL after `url_retries` tries with
backoff, a read that stalls past `url_timeout`) is skipped from where it broke and counted
(`Batch.bad_shards`). Neither is fatal, and neither can hang the run: HTTP(S) shards are opened here with a
timeout on the connection and on every read; `pipe:` shards must bound their own command (e.g.
``pipe:curl -sfL --max-time 600 --speed-time 60 --speed-limit 1024 URL``). If `_MAX_DEAD_IN_A_ROW` shards
in a row cannot be opened the source is dead and the run stops with a DataError.

Sizing (defaults suit shards of about 1000 samples and 8 workers per GPU):

- ``samples_per_epoch`` is what one epoch means for the schedule (steps per epoch = samples_per_epoch //
  global batch; warmup_epochs, epochs and the cosine follow from it), and the point where every slot's
  stream is rebuilt with the next epoch's seed. Leave it unset to count the samples (rspretrain.shards: size
  files of rscurate, timm, wids or img2dataset, else the tar headers). Set it by hand for URL shards without
  a size file, or to define a shorter "epoch" over a huge corpus in resampled mode
  (each slot draws shards with replacement, so any value works; the lr schedule is the only thing it changes).
  In split mode it must not exceed the samples actually held: each slot reads its own ~1/(ranks x workers) of
  the shards, and a slot that runs dry before the epoch ends wraps to a fresh pass, reading a few samples
  twice. Give each slot the same amount of data: a shard count that is a multiple of ranks x workers, shards
  of equal size (rscurate writes them so), and samples_per_epoch at most the total.
- ``shuffle_buffer`` is per DataLoader worker, in raw samples (still encoded: ~20 KB for a
  224 px JPEG tile, ~150 KB for a PNG one), so its memory is ranks_per_node x workers x shuffle_buffer x sample bytes: 8 x 8 x
  5000 x 100 KB = 32 GB per node at the defaults; lower it before memory runs out. Shards are already
  globally shuffled by rscurate, so the buffer only has to mix neighbouring shards: a few shards' worth
  (2-5 x samples per shard) is enough, and larger buffers only delay the first batch (``shuffle_initial``
  samples are read before the first is handed out). Keep ``shuffle_initial`` at 10-20% of the buffer.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
import random
import struct
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch
import webdataset as wds
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import group_by_keys

from rspretrain.augment import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    EncodedBatch,
    augment,
    crop_uint8,
    decode_batch,
    decode_rgb,
    draw_crop,
    image_member,
    jpeg_header,
    random_resized_crop_box,
)
from rspretrain.shards import (
    DataError,
    UrlPolicy,
    count_samples,
    expand_shards,
    is_url,
    open_shard,
    tar_members,
)

if TYPE_CHECKING:
    from rspretrain.config import DataConfig

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Batch",
    "BatchSource",
    "DataError",
    "ShardSource",
    "ShardStream",
    "StreamState",
    "UrlPolicy",
    "augment",
    "count_samples",
    "decode_rgb",
    "expand_shards",
    "is_url",
    "open_shard",
    "random_resized_crop_box",
]

log = logging.getLogger(__name__)

OUTPUTS = (
    "float",
    "uint8",
    "encoded",
)  # what a worker hands out; data.decode cpu -> uint8, device -> encoded
_MAX_WARNINGS = 3  # per worker and epoch; the rest are only counted (log.jsonl `skipped`)
_MAX_DEAD_IN_A_ROW = 16  # shards in a row that cannot be opened: the source is dead, stop the run


@dataclass
class Batch:
    # (N, C, H, W): uint8 crops (data.decode cpu; channels-last memory), float32 ImageNet-normalised (in-memory
    # sources, output="float"), or empty (0,) with data.decode device, where `encoded` holds the batch.
    images: Tensor
    worker: int  # logical loader worker that produced it
    cursor: int  # raw samples that worker has drawn from its stream this epoch (decoded or skipped)
    skipped: int  # samples that failed to decode since that worker's previous batch
    keys: list[str] = field(default_factory=list)  # sample keys, in batch order
    bad_shards: int = 0  # shards that failed to open or broke off since that worker's previous batch
    encoded: EncodedBatch | None = None  # data.decode device: JPEG bytes and crops, decoded by images_on
    load_s: float = 0.0  # wall seconds the worker spent making this batch (reading, decoding, cropping)

    def __len__(self) -> int:
        return len(self.encoded) if self.encoded is not None else int(self.images.shape[0])

    def pin_memory(self) -> Batch:  # called by DataLoader(pin_memory=True)
        images = self.images
        if images.dim() == 4 and images.is_contiguous(memory_format=torch.channels_last):
            # pin the (N, H, W, C) storage as it is: a contiguous pin would transpose it on the host
            return replace(self, images=images.permute(0, 2, 3, 1).pin_memory().permute(0, 3, 1, 2))
        return replace(self, images=images.pin_memory()) if images.numel() else self

    def images_on(self, device: torch.device) -> tuple[Tensor, int]:
        """The batch's images on `device`, (N, C, H, W) uint8 (or float32 if the source made float), and how
        many samples were dropped on the way (JPEGs that the device decoder and the CPU both refuse)."""
        if self.encoded is None:
            return self.images.to(device, non_blocking=True), 0
        images, dropped = decode_batch(self.encoded, device)
        for i in dropped:
            log.warning("skipping sample %s: its JPEG does not decode", self.keys[i] if self.keys else i)
        return images, len(dropped)


@dataclass
class StreamState:
    """How far one rank has read into the current epoch: enough to resume the stream exactly."""

    batches: int  # batches this rank has taken this epoch
    cursors: list[int]  # per logical worker: its cursor after its last batch

    @classmethod
    def fresh(cls, workers: int) -> StreamState:
        return cls(0, [0] * max(1, workers))

    def update(self, batch: Batch) -> None:
        self.batches += 1
        self.cursors[batch.worker] = batch.cursor

    @property
    def next_worker(self) -> int:
        # DataLoader takes batches from its workers round-robin, starting at worker 0.
        return self.batches % len(self.cursors)


class BatchSource(Protocol):
    """What the trainer reads batches from: `ShardSource`, or an in-memory stand-in in tests."""

    samples_per_epoch: int | None  # None: unknown (shards without size files, and no tar scan possible)
    workers: int

    def epoch(self, epoch: int, state: StreamState | None = None) -> Iterator[Batch]: ...


def mix_seed(*parts: int) -> int:
    """A 64-bit seed from integers, well spread (neighbouring epochs or slots give unrelated streams)."""
    packed = struct.pack(f"<{len(parts)}Q", *(p & 0xFFFF_FFFF_FFFF_FFFF for p in parts))
    digest = hashlib.blake2b(packed, digest_size=8).digest()
    return int.from_bytes(digest, "little")


# --------------------------------------------------------------------------- the per-slot stream


class _ShardReader:
    """Opens one slot's shards in turn, closes each when the next is asked for, and counts the shards that
    fail (cannot be opened, or break off in the middle). `handler` is webdataset's error handler: skip on."""

    def __init__(self, policy: UrlPolicy) -> None:
        self.policy = policy
        self.bad_shards = 0
        self._url = ""
        self._failed = False  # the current shard is already counted
        self._dead_in_a_row = 0

    def open(self, urls: Iterable[str]) -> Iterator[dict[str, Any]]:
        for url in urls:
            self._url, self._failed = url, False
            try:
                stream = open_shard(url, self.policy)
            except Exception as exn:
                self.handler(exn)
                self._dead_in_a_row += 1
                if self._dead_in_a_row >= _MAX_DEAD_IN_A_ROW:
                    raise DataError(
                        f"{self._dead_in_a_row} shards in a row cannot be opened, the last {url} ({exn}); "
                        "is the data source down?"
                    ) from None
                continue
            self._dead_in_a_row = 0
            try:
                yield {"url": url, "stream": stream}
            finally:
                try:
                    stream.close()  # a pipe: shard reports its command's failure here
                except Exception as exn:
                    self.handler(exn)

    def handler(self, exn: Exception) -> bool:
        if not self._failed:
            self._failed = True
            self.bad_shards += 1
            why = str(exn.args[0] if exn.args else exn).splitlines()[0] if str(exn) else type(exn).__name__
            log.warning("skipping the rest of shard %s: %s: %s", self._url, type(exn).__name__, why)
        return True


def _tar_files(sources: Iterable[dict[str, Any]], handler: Any) -> Iterator[dict[str, Any]]:
    """webdataset's tar_file_expander on rspretrain.shards.tar_members: the files of each opened shard, then
    an end-of-shard marker; an error skips the rest of that shard through `handler`."""
    for source in sources:
        try:
            for name, data in tar_members(source["stream"]):
                yield {"fname": name, "data": data, "__url__": source["url"]}
            yield {}  # group_by_keys closes the shard's last sample here
        except Exception as exn:
            if not handler(exn):
                break


def pin_worker_threads(worker_id: int) -> None:
    """DataLoader worker_init_fn: one thread each, or the workers fight the trainer for every core."""
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
        os.environ[var] = "1"
    torch.set_num_threads(1)


@dataclass
class ShardStream(IterableDataset):
    """One epoch of batches of one rank; each DataLoader worker iterates its own slot."""

    shards: list[str]
    img_size: int
    batch_size: int
    seed: int
    epoch: int
    rank: int
    world_size: int
    resampled: bool = True
    shuffle_buffer: int = 5000
    shuffle_initial: int = 1000
    crop_scale: tuple[float, float] = (0.2, 1.0)
    cursors: list[int] | None = None  # per logical worker: raw samples to skip (resume)
    first_worker: int = 0  # logical worker of loader worker 0 (resume keeps the round-robin phase)
    url_policy: UrlPolicy = field(default_factory=UrlPolicy)
    output: str = "uint8"  # float (normalised in the worker) | uint8 (data.decode cpu) | encoded (device)
    _warned: int = field(default=0, repr=False)

    def __post_init__(self) -> None:
        super().__init__()
        if self.output not in OUTPUTS:
            raise ValueError(f"output={self.output!r}: use one of {', '.join(OUTPUTS)}")

    def _shard_order(self, slot: int, slots: int, pass_: int) -> Iterator[str]:
        if self.resampled:
            rng = random.Random(mix_seed(self.seed, self.epoch, slot, 1))
            while True:
                yield rng.choice(self.shards)
        order = list(self.shards)
        random.Random(mix_seed(self.seed, self.epoch, pass_, 2)).shuffle(order)  # same on every slot
        yield from order[slot::slots]

    def _samples(self, slot: int, slots: int, reader: _ShardReader) -> Iterator[dict[str, Any]]:
        """The slot's raw samples, shuffled; a pass is drained before the next starts (split mode)."""
        for pass_ in itertools.count():
            files = _tar_files(reader.open(self._shard_order(slot, slots, pass_)), reader.handler)
            samples = group_by_keys(files, handler=reader.handler)
            buffer_rng = random.Random(mix_seed(self.seed, self.epoch, slot, pass_, 3))
            read = 0
            for sample in wds.shuffle(self.shuffle_buffer, self.shuffle_initial, rng=buffer_rng)(samples):
                read += 1
                yield sample
            if read == 0:
                raise DataError(f"slot {slot} of {slots} read no sample from its shards; are they empty?")
            if pass_ == 0:
                log.info(
                    "slot %d read all its %d samples of epoch %d; starting another pass",
                    slot,
                    read,
                    self.epoch,
                )

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        workers, loader_worker = (info.num_workers, info.id) if info else (1, 0)
        worker = (loader_worker + self.first_worker) % workers
        slot, slots = self.rank * workers + worker, self.world_size * workers
        cursor = self.cursors[worker] if self.cursors else 0
        reader = _ShardReader(self.url_policy)
        # resume: skip what was read before (tar bytes only, nothing decoded)
        stream = itertools.islice(self._samples(slot, slots, reader), cursor, None)
        items: list[Any] = []
        keys: list[str] = []
        skipped = 0
        reported = -1  # shard failures already reported; those met while skipping to the cursor never are
        started = time.perf_counter()  # this batch's making began (the generator is paused between batches)
        for sample in stream:
            cursor += 1
            if reported < 0:
                reported = reader.bad_shards
            rng = random.Random(mix_seed(self.seed, self.epoch, slot, cursor))
            try:
                items.append(self._item(sample, rng))
            except Exception as exn:  # any undecodable sample is skipped, never fatal
                skipped += 1
                self._warn_skip(sample, exn)
                continue
            keys.append(sample["__key__"])
            if len(items) == self.batch_size:
                bad, reported = reader.bad_shards - reported, reader.bad_shards
                batch = self._batch(items)
                batch.worker, batch.cursor, batch.skipped, batch.keys, batch.bad_shards = (
                    worker, cursor, skipped, keys, bad
                )  # fmt: skip
                batch.load_s = time.perf_counter() - started
                yield batch
                items, keys, skipped = [], [], 0
                started = time.perf_counter()

    def _item(self, sample: dict[str, Any], rng: random.Random) -> Any:
        """One sample as the output wants it; raises if it cannot be decoded."""
        if self.output == "encoded":
            _, data = image_member(sample)
            hw = jpeg_header(data)
            if hw is not None:
                return data, hw[0], hw[1], draw_crop(hw[1], hw[0], rng, self.crop_scale)
        img = decode_rgb(sample)
        if self.output == "float":
            return augment(img, rng, self.img_size, self.crop_scale)  # (C, S, S)
        crop = draw_crop(img.width, img.height, rng, self.crop_scale)
        if self.output == "encoded":  # a PNG or a CMYK JPEG: its pixels travel decoded
            return np.asarray(img), img.height, img.width, crop  # (H, W, C)
        return crop_uint8(img, crop, self.img_size)  # (S, S, C)

    def _batch(self, items: list[Any]) -> Batch:
        if self.output == "float":
            return Batch(torch.stack(items), 0, 0, 0)  # (N, C, S, S)
        if self.output == "encoded":
            return Batch(
                torch.empty(0, dtype=torch.uint8), 0, 0, 0, encoded=EncodedBatch.build(items, self.img_size)
            )
        pixels = torch.from_numpy(np.stack(items))  # (N, S, S, C)
        return Batch(pixels.permute(0, 3, 1, 2), 0, 0, 0)  # (N, C, S, S), channels-last in memory

    def _warn_skip(self, sample: dict[str, Any], exn: Exception) -> None:
        self._warned += 1
        if self._warned <= _MAX_WARNINGS:
            key, url = sample.get("__key__"), sample.get("__url__")
            log.warning("skipping sample %s of %s: cannot decode (%s)", key, url, exn)
        if self._warned == _MAX_WARNINGS:
            log.warning("further undecodable samples of this worker and epoch are counted, not logged")


def fitted_workers(trainer_threads: int) -> int:
    """Loader workers that fit beside the trainer: this process's share of the usable cores (torchrun's
    LOCAL_WORLD_SIZE processes share the machine) minus the trainer's threads. 0 when the trainer's threads
    take every core: the loader then runs in the training process between steps instead of preempting
    one of its threads in the middle of one."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    per_process = cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(0, per_process - trainer_threads)


class ShardSource:
    """Batches for one rank from WebDataset shards: one DataLoader per epoch, `workers` slots per rank.

    `trainer_threads` is the training process's share of the cores, for ``data.workers: null`` (fitted to
    the machine). With `need_epoch_size` False (a run given in steps, no warmup in epochs), shards whose
    sample count cannot be found only warn, and `samples_per_epoch` is None. `output` overrides what
    ``data.decode`` asks the workers for (benchmarks compare the three).
    """

    def __init__(
        self,
        cfg: DataConfig,
        *,
        img_size: int,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        pin_memory: bool = False,
        trainer_threads: int = 1,
        need_epoch_size: bool = True,
        output: str | None = None,
    ) -> None:
        self.cfg = cfg
        self.shards = expand_shards(list(cfg.shards))
        if cfg.workers is None:
            self.workers = fitted_workers(trainer_threads)
            log.info(
                "data.workers: %d (fitted: this process's cores minus the trainer's %d threads%s)",
                self.workers,
                trainer_threads,
                "; the loader runs between steps in the training process" if self.workers == 0 else "",
            )
        else:
            self.workers = cfg.workers
        self.output = output or {"cpu": "uint8", "device": "encoded"}[cfg.decode]
        self.img_size, self.batch_size, self.seed = img_size, batch_size, seed
        self.rank, self.world_size, self.pin_memory = rank, world_size, pin_memory
        slots = world_size * max(1, self.workers)
        if not cfg.resampled and len(self.shards) < slots:
            raise DataError(
                f"{len(self.shards)} shards cannot be split over {world_size} ranks x {max(1, self.workers)} workers "
                "without two slots reading the same shard; lower --workers, or leave resampling on"
            )
        if not cfg.resampled and len(self.shards) % slots:
            log.warning(
                "%d shards do not split evenly over %d ranks x %d workers: the slots with fewer shards run "
                "dry first and wrap around, reading some samples twice per epoch; use a multiple of %d shards",
                len(self.shards),
                world_size,
                max(1, self.workers),
                slots,
            )
        self.url_policy = UrlPolicy(cfg.url_timeout, cfg.url_retries, cfg.url_backoff)
        counted = cfg.samples_per_epoch or count_samples(self.shards)
        if not counted and need_epoch_size:
            raise DataError(
                "cannot tell how many samples an epoch holds: no sizes.json, _info.json, shardindex.json or "
                "{shard}_stats.json lists every shard, and they are not local tars to count; pass "
                "--samples-per-epoch, or give the run in --steps"
            )
        if not counted:
            log.warning(
                "the shards do not say how many samples they hold: the run is one epoch of its steps "
                "(pass --samples-per-epoch to define an epoch)"
            )
        self.samples_per_epoch: int | None = counted or None
        log.info(
            "%d shards, %s samples per epoch, %s",
            len(self.shards),
            counted or "unknown",
            "resampled" if cfg.resampled else "split over ranks x workers",
        )

    def epoch(self, epoch: int, state: StreamState | None = None) -> Iterator[Batch]:
        resume = state is not None and state.batches > 0
        dataset = ShardStream(
            shards=self.shards,
            img_size=self.img_size,
            batch_size=self.batch_size,
            seed=self.seed,
            epoch=epoch,
            rank=self.rank,
            world_size=self.world_size,
            resampled=self.cfg.resampled,
            shuffle_buffer=self.cfg.shuffle_buffer,
            shuffle_initial=min(self.cfg.shuffle_initial, self.cfg.shuffle_buffer),
            crop_scale=tuple(self.cfg.crop_scale),  # type: ignore[arg-type]
            cursors=list(state.cursors) if resume and state else None,
            first_worker=state.next_worker if resume and state else 0,
            url_policy=self.url_policy,
            output=self.output,
        )
        loader = DataLoader(
            dataset,
            batch_size=None,  # the workers batch: a batch never mixes two slots
            num_workers=self.workers,
            worker_init_fn=pin_worker_threads if self.workers > 0 else None,
            pin_memory=self.pin_memory,
            prefetch_factor=2 if self.workers > 0 else None,  # batches per worker in flight
        )
        return _one_line_errors(iter(loader))


def _one_line_errors(batches: Iterator[Batch]) -> Iterator[Batch]:
    """A DataError raised in a loader worker arrives wrapped in the worker's traceback: keep its message."""
    try:
        yield from batches
    except DataError as exc:
        lines = [line for line in str(exc).strip().splitlines() if line.strip()]
        last = lines[-1] if lines else ""
        raise DataError(last.split("DataError: ", 1)[-1]) from None

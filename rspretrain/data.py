"""The WebDataset streaming pipeline: shard expansion, resampling, rank x worker splitting, decode, augment.

Every DataLoader worker of every rank is one *slot* (``slot = rank * workers + worker``) and reads its own
stream, rebuilt at each epoch from ``(seed, epoch, slot)``:

- resampled mode (default): the slot draws shards with replacement, forever;
- split mode (``resampled: false``): the epoch's shard order is shuffled with ``(seed, epoch)``, the same on
  every slot, and slot ``s`` reads shards ``s, s + slots, s + 2 * slots, ...``, so no two slots read the same
  sample in an epoch (a slot that runs dry wraps around to a fresh pass rather than stall its rank).

Samples go through a seeded shuffle buffer, then decode and augment. The crop and flip of a sample are drawn
from its position in the slot's stream (its *cursor*), not from a global RNG, so a stream is a pure function
of ``(seed, epoch, slot)``. Each batch reports the cursor of the worker that made it; `StreamState` keeps
them, and a resumed run skips each worker's stream to its cursor (reading tar bytes, not decoding) and goes
on with exactly the batches the uninterrupted run would have seen.

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
  stream is rebuilt with the next epoch's seed. Leave it unset to read the true count from sizes.json / _info.json. Set it by hand
  for URL shards without a size file, or to define a shorter "epoch" over a huge corpus in resampled mode
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

import glob
import hashlib
import io
import itertools
import json
import logging
import math
import os
import posixpath
import random
import struct
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Protocol

import braceexpand
import torch
import torchvision.transforms.functional as TF
import webdataset as wds
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchvision.transforms import InterpolationMode
from webdataset.tariterators import group_by_keys, tar_file_expander

from rscurate.sample import IMAGE_MEMBER_SELECTOR

if TYPE_CHECKING:
    from rspretrain.config import DataConfig

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_MEMBERS = tuple(IMAGE_MEMBER_SELECTOR.split(";"))
RATIO = (3 / 4, 4 / 3)  # aspect-ratio range of RandomResizedCrop (torchvision's default)
SIZE_FILES = ("sizes.json", "_info.json")
_MAX_WARNINGS = 3  # per worker and epoch; the rest are only counted (log.jsonl `skipped`)
_MAX_DEAD_IN_A_ROW = 16  # shards in a row that cannot be opened: the source is dead, stop the run
_MAX_BACKOFF_S = 30.0
_RETRY_HTTP = frozenset({408, 425, 429, 500, 502, 503, 504})  # other 4xx will not get better with time


class DataError(ValueError):
    """A problem with the shards or data options that the user can fix."""


@dataclass
class Batch:
    images: Tensor  # (N, C, H, W) float32, ImageNet-normalised
    worker: int  # logical loader worker that produced it
    cursor: int  # raw samples that worker has drawn from its stream this epoch (decoded or skipped)
    skipped: int  # samples that failed to decode since that worker's previous batch
    keys: list[str] = field(default_factory=list)  # sample keys, in batch order
    bad_shards: int = 0  # shards that failed to open or broke off since that worker's previous batch

    def pin_memory(self) -> Batch:  # called by DataLoader(pin_memory=True)
        return replace(self, images=self.images.pin_memory())


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

    samples_per_epoch: int
    workers: int

    def epoch(self, epoch: int, state: StreamState | None = None) -> Iterator[Batch]: ...


# --------------------------------------------------------------------------- shards and their sizes


def is_url(spec: str) -> bool:
    return "://" in spec or spec.startswith("pipe:")


def expand_shards(spec: str | Sequence[str]) -> list[str]:
    """Shard URLs and paths from brace patterns, globs, folders (every *.tar inside), files or URLs.

    `spec` is one string or a list; a string may join several specs with ``::`` (webdataset's convention).
    """
    items = [spec] if isinstance(spec, str) else list(spec)
    shards: list[str] = []
    for item in items:
        for part in str(item).split("::"):
            part = part.strip()
            if not part:
                continue
            for one in braceexpand.braceexpand(part):
                if is_url(one):
                    shards.append(one)
                    continue
                path = os.path.expanduser(one)
                if os.path.isdir(path):
                    found = sorted(glob.glob(os.path.join(path, "*.tar")))
                elif glob.has_magic(path):
                    found = sorted(p for p in glob.glob(path, recursive=True) if os.path.isfile(p))
                elif os.path.isfile(path):
                    found = [path]
                else:
                    raise DataError(f"shard {one} does not exist; check --shards")
                if not found:
                    raise DataError(f"no shards match {one!r}; check --shards")
                shards.extend(found)
    if not shards:
        raise DataError("no shards given; pass --shards (a brace pattern, glob, folder or URL)")
    return shards


@dataclass(frozen=True)
class UrlPolicy:
    """How hard to try an HTTP(S) shard: seconds per connect or read, extra tries, first backoff in seconds."""

    timeout: float = 60.0
    retries: int = 3
    backoff: float = 1.0


def open_shard(location: str, policy: UrlPolicy = UrlPolicy()) -> Any:
    """A binary stream of one shard: a local file, an HTTP(S) URL (timeouts, retries with backoff), or any
    other webdataset URL (``pipe:``, ``gs://``, ...) through `wds.gopen`. Raises OSError once it gives up."""
    if not is_url(location):
        return open(location, "rb")  # noqa: SIM115 (the caller closes it)
    if not location.startswith(("http://", "https://")):
        return wds.gopen(location, "rb")
    error = OSError("not tried")
    for attempt in range(policy.retries + 1):
        try:
            # the timeout bounds the connect and every read of the body: a stalled server cannot hang a worker
            return urllib.request.urlopen(location, timeout=policy.timeout)  # noqa: S310 (http(s) only)
        except urllib.error.HTTPError as exc:
            error = exc
            if exc.code not in _RETRY_HTTP:
                break
        except (OSError, ValueError) as exc:  # refused, reset, timed out, DNS, malformed
            error = exc if isinstance(exc, OSError) else OSError(str(exc))
        if attempt < policy.retries:
            delay = min(policy.backoff * 2**attempt, _MAX_BACKOFF_S)
            log.info(
                "%s: %s; try %d of %d in %.1f s", location, error, attempt + 2, policy.retries + 1, delay
            )
            time.sleep(delay)
    raise OSError(f"{location}: cannot open ({error})")


def _read_text(location: str) -> str | None:
    try:
        with open_shard(location, UrlPolicy(timeout=30.0, retries=1)) as stream:
            return stream.read().decode("utf-8")
    except Exception:  # absent or unreachable: the caller falls back to the next file or to the user
        return None


def _shard_counts(info: Any) -> dict[str, int]:
    """basename -> sample count from rscurate's sizes.json or a timm-style _info.json."""
    if not isinstance(info, dict):
        return {}
    if all(isinstance(v, int) and not isinstance(v, bool) for v in info.values()):
        return {posixpath.basename(k): int(v) for k, v in info.items()}  # sizes.json
    splits = info.get("splits")
    sections = list(splits.values()) if isinstance(splits, dict) else [info]
    counts: dict[str, int] = {}
    for section in sections:
        if not isinstance(section, dict):
            continue
        names = [
            n for pattern in section.get("filenames") or [] for n in braceexpand.braceexpand(str(pattern))
        ]
        lengths = section.get("shard_lengths") or []
        if len(names) == len(lengths):
            counts.update({posixpath.basename(n): int(c) for n, c in zip(names, lengths, strict=True)})
    return counts


def count_samples(shards: Sequence[str]) -> int | None:
    """Total samples in `shards` per the size files next to them, or None if a shard is not listed."""
    by_folder: dict[str, list[str]] = {}
    for shard in shards:
        folder = posixpath.dirname(shard) if is_url(shard) else os.path.dirname(os.path.abspath(shard))
        by_folder.setdefault(folder, []).append(shard)
    total = 0
    for folder, members in by_folder.items():
        names = [posixpath.basename(s) if is_url(s) else os.path.basename(s) for s in members]
        for size_file in SIZE_FILES:
            location = f"{folder}/{size_file}" if is_url(folder) else os.path.join(folder, size_file)
            text = _read_text(location)
            if text is None:
                continue
            try:
                counts = _shard_counts(json.loads(text))
            except json.JSONDecodeError:
                log.warning("%s is not valid JSON; ignoring it", location)
                continue
            if all(n in counts for n in names):
                total += sum(counts[n] for n in names)
                break
        else:
            return None
    return total


# --------------------------------------------------------------------------- decode and augment


def decode_rgb(sample: dict[str, Any]) -> Image.Image:
    """The sample's image member (rscurate.sample.IMAGE_MEMBER_SELECTOR order) as 8-bit RGB."""
    for member in IMAGE_MEMBERS:
        if member in sample:
            img = Image.open(io.BytesIO(sample[member]))
            img.load()  # decodes, and drops the file object: the image owns its pixels
            # convert() would copy an RGB image whole (about 5% of a 512 px sample's decode and augment).
            return img if img.mode == "RGB" else img.convert("RGB")
    raise ValueError(f"sample has no {IMAGE_MEMBER_SELECTOR} member")


def random_resized_crop_box(
    width: int, height: int, rng: random.Random, scale: tuple[float, float]
) -> tuple[int, int, int, int]:
    """(top, left, h, w): torchvision's RandomResizedCrop.get_params, drawing from `rng`."""
    area = width * height
    log_lo, log_hi = math.log(RATIO[0]), math.log(RATIO[1])
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    in_ratio = width / height  # fallback: central crop at the nearest allowed aspect ratio
    if in_ratio < RATIO[0]:
        w, h = width, round(width / RATIO[0])
    elif in_ratio > RATIO[1]:
        w, h = round(height * RATIO[1]), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def augment(img: Image.Image, rng: random.Random, img_size: int, scale: tuple[float, float]) -> Tensor:
    """RandomResizedCrop (bicubic) + horizontal flip + ImageNet normalisation: PIL (W, H) -> (C, img_size, img_size)."""
    top, left, h, w = random_resized_crop_box(img.width, img.height, rng, scale)
    img = TF.resized_crop(img, top, left, h, w, [img_size, img_size], InterpolationMode.BICUBIC)
    if rng.random() < 0.5:
        img = TF.hflip(img)
    return TF.normalize(TF.to_tensor(img), IMAGENET_MEAN, IMAGENET_STD)


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
    _warned: int = field(default=0, repr=False)

    def __post_init__(self) -> None:
        super().__init__()

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
            files = tar_file_expander(
                reader.open(self._shard_order(slot, slots, pass_)), handler=reader.handler
            )
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
        images: list[Tensor] = []
        keys: list[str] = []
        skipped = 0
        reported = -1  # shard failures already reported; those met while skipping to the cursor never are
        for sample in stream:
            cursor += 1
            if reported < 0:
                reported = reader.bad_shards
            try:
                img = decode_rgb(sample)
            except Exception as exn:  # any undecodable sample is skipped, never fatal
                skipped += 1
                self._warn_skip(sample, exn)
                continue
            rng = random.Random(mix_seed(self.seed, self.epoch, slot, cursor))
            images.append(augment(img, rng, self.img_size, self.crop_scale))  # (C, H, W)
            keys.append(sample["__key__"])
            if len(images) == self.batch_size:
                bad, reported = reader.bad_shards - reported, reader.bad_shards
                yield Batch(torch.stack(images), worker, cursor, skipped, keys, bad)  # (N, C, H, W)
                images, keys, skipped = [], [], 0

    def _warn_skip(self, sample: dict[str, Any], exn: Exception) -> None:
        self._warned += 1
        if self._warned <= _MAX_WARNINGS:
            key, url = sample.get("__key__"), sample.get("__url__")
            log.warning("skipping sample %s of %s: cannot decode (%s)", key, url, exn)
        if self._warned == _MAX_WARNINGS:
            log.warning("further undecodable samples of this worker and epoch are counted, not logged")


class ShardSource:
    """Batches for one rank from WebDataset shards: one DataLoader per epoch, `workers` slots per rank."""

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
    ) -> None:
        self.cfg = cfg
        self.shards = expand_shards(list(cfg.shards))
        self.workers = cfg.workers
        self.img_size, self.batch_size, self.seed = img_size, batch_size, seed
        self.rank, self.world_size, self.pin_memory = rank, world_size, pin_memory
        slots = world_size * max(1, cfg.workers)
        if not cfg.resampled and len(self.shards) < slots:
            raise DataError(
                f"{len(self.shards)} shards cannot be split over {world_size} ranks x {max(1, cfg.workers)} workers "
                "without two slots reading the same shard; lower --workers, or leave resampling on"
            )
        if not cfg.resampled and len(self.shards) % slots:
            log.warning(
                "%d shards do not split evenly over %d ranks x %d workers: the slots with fewer shards run "
                "dry first and wrap around, reading some samples twice per epoch; use a multiple of %d shards",
                len(self.shards),
                world_size,
                max(1, cfg.workers),
                slots,
            )
        self.url_policy = UrlPolicy(cfg.url_timeout, cfg.url_retries, cfg.url_backoff)
        counted = cfg.samples_per_epoch or count_samples(self.shards)
        if not counted:
            raise DataError(
                "cannot tell how many samples an epoch holds: no sizes.json or _info.json lists every shard; "
                "pass --samples-per-epoch"
            )
        self.samples_per_epoch = counted
        log.info(
            "%d shards, %d samples per epoch, %s",
            len(self.shards),
            counted,
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

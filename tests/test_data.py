"""The shard pipeline: expansion, epoch sizes, decode/skip, rank x worker splitting, exact stream resume, and the
three outputs (float in the worker, uint8 normalised on the device, decode and crop on the device) agreeing."""

from __future__ import annotations

import json
import os
import random
from itertools import islice
from pathlib import Path

import pytest
import torch
from _shards import write_shards

from rspretrain.augment import normalize
from rspretrain.config import DataConfig
from rspretrain.data import (
    DataError,
    ShardSource,
    StreamState,
    augment,
    count_samples,
    decode_rgb,
    expand_shards,
    fitted_workers,
    random_resized_crop_box,
)


def source(
    folder: Path,
    batch_size: int = 4,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    output: str | None = None,
    **data,
) -> ShardSource:
    cfg = DataConfig(
        shards=(str(folder),), **{"workers": 0, "shuffle_buffer": 8, "shuffle_initial": 4, **data}
    )
    return ShardSource(
        cfg, img_size=32, batch_size=batch_size, seed=seed, rank=rank, world_size=world_size, output=output
    )


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("shards")
    write_shards(folder, shards=4, per_shard=8, size=40)
    return folder


def test_expand_shards_braces_globs_folders_urls(shards: Path) -> None:
    names = [str(shards / f"tiles-{i:06d}.tar") for i in range(4)]
    assert expand_shards(str(shards / "tiles-{000000..000003}.tar")) == names
    assert expand_shards(str(shards / "tiles-*.tar")) == names
    assert expand_shards(str(shards)) == names
    assert expand_shards([names[0], names[1]]) == names[:2]
    assert expand_shards(f"{names[0]}::{names[3]}") == [names[0], names[3]]
    assert expand_shards("https://host/data/tiles-{0..2}.tar") == [
        f"https://host/data/tiles-{i}.tar" for i in range(3)
    ]
    with pytest.raises(DataError, match="does not exist"):
        expand_shards(str(shards / "missing-{0..1}.tar"))
    with pytest.raises(DataError, match="no shards match"):
        expand_shards(str(shards / "nothing-*.tar"))


def test_samples_per_epoch_from_sizes_json(tmp_path: Path) -> None:
    write_shards(tmp_path, shards=3, per_shard=5, size=16)
    sizes = json.loads((tmp_path / "sizes.json").read_text())
    sizes["tiles-000001.tar"] = 7  # the counts come from the file, not from reading the tars
    (tmp_path / "sizes.json").write_text(json.dumps(sizes))
    assert count_samples(expand_shards(str(tmp_path))) == 17
    assert count_samples(expand_shards(str(tmp_path / "tiles-00000{0,1}.tar"))) == 12
    assert source(tmp_path).samples_per_epoch == 17
    assert source(tmp_path, samples_per_epoch=100).samples_per_epoch == 100  # the option wins


def test_samples_per_epoch_from_timm_info_json(tmp_path: Path) -> None:
    write_shards(tmp_path, shards=2, per_shard=6, size=16, sizes_json=False)
    info = {
        "name": "tiles",
        "splits": {
            "train": {"num_samples": 12, "filenames": ["tiles-{000000..000001}.tar"], "shard_lengths": [6, 6]}
        },
    }
    (tmp_path / "_info.json").write_text(json.dumps(info))
    assert count_samples(expand_shards(str(tmp_path))) == 12


def test_corrupt_sample_is_skipped_and_counted(tmp_path: Path) -> None:
    write_shards(tmp_path, shards=2, per_shard=8, size=40, corrupt=[(1, 3)])
    src = source(tmp_path, batch_size=5, resampled=False, shuffle_buffer=1, shuffle_initial=1)
    batches = list(islice(src.epoch(0), 3))  # 16 samples, 1 corrupt: 15 decode into 3 batches
    assert sum(b.skipped for b in batches) == 1
    keys = [k for b in batches for k in b.keys]
    assert len(set(keys)) == 15 and "synthetic_scene1_144_0" not in keys
    assert batches[-1].cursor == 16
    for b in batches:
        assert b.images.shape == (5, 3, 32, 32) and b.images.dtype == torch.uint8
        assert 20 < float(b.images.float().mean()) < 235


def test_decode_reads_jpg_and_png_members(tmp_path: Path) -> None:
    import webdataset as wds

    (path,) = write_shards(tmp_path, shards=1, per_shard=2, size=24)
    samples = list(wds.WebDataset(str(path), shardshuffle=False))
    assert {"jpg", "png"} == {m for s in samples for m in ("jpg", "png") if m in s}
    for s in samples:
        img = decode_rgb(s)
        assert img.mode == "RGB" and img.size == (24, 24)
    with pytest.raises(ValueError, match="jpg;png"):
        decode_rgb({"__key__": "k", "json": b"{}"})


def test_augment_is_seeded_and_normalised() -> None:
    import numpy as np
    from _shards import tile_image

    img = tile_image(np.random.default_rng(0), 64)
    a = augment(img, random.Random(5), 32, (0.2, 1.0))
    b = augment(img, random.Random(5), 32, (0.2, 1.0))
    c = augment(img, random.Random(6), 32, (0.2, 1.0))
    assert a.shape == (3, 32, 32)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert -2.5 < float(a.mean()) < 2.5  # ImageNet-normalised, not [0, 255]
    for seed in range(200):
        top, left, h, w = random_resized_crop_box(64, 48, random.Random(seed), (0.2, 1.0))
        assert 0 <= top and top + h <= 48 and 0 <= left and left + w <= 64
        assert 0.2 * 64 * 48 * 0.9 <= h * w <= 64 * 48


def test_split_mode_gives_each_sample_to_one_rank_and_worker(shards: Path) -> None:
    # 2 ranks x 2 workers = 4 slots over 4 shards of 8: every sample read exactly once in the epoch
    seen: list[str] = []
    for rank in range(2):
        src = source(shards, batch_size=4, rank=rank, world_size=2, resampled=False, workers=2)
        state = StreamState.fresh(2)
        for batch in islice(src.epoch(3), 4):
            state.update(batch)
            seen += batch.keys
        assert state.cursors == [8, 8]  # each worker read its whole shard
    assert len(seen) == 32 and len(set(seen)) == 32


def test_split_mode_slots_are_disjoint_and_cover_the_epoch_over_several_shards(tmp_path: Path) -> None:
    # 2 ranks x 2 workers over 8 shards of 6: each (rank, worker) slot reads 2 shards, 12 samples, in epoch 1
    write_shards(tmp_path, shards=8, per_shard=6, size=24)
    every = {f"synthetic_scene{s}_{i * 24}_0" for s in range(8) for i in range(6)}
    per_slot: dict[tuple[int, int], list[str]] = {}
    for rank in range(2):
        src = source(tmp_path, batch_size=3, rank=rank, world_size=2, resampled=False, workers=2)
        for batch in islice(src.epoch(1), 8):  # 2 workers x 4 batches x 3 = this rank's 24 samples
            per_slot.setdefault((rank, batch.worker), []).extend(batch.keys)
    assert sorted(per_slot) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    slots = list(per_slot.values())
    assert all(len(keys) == len(set(keys)) == 12 for keys in slots)
    for i, a in enumerate(slots):
        for b in slots[i + 1 :]:
            assert not set(a) & set(b)  # no sample read by two slots
    assert set().union(*slots) == every  # and none left out
    # each slot's samples come from whole shards: 2 scenes of 6
    assert all(len({k.split("_")[1] for k in keys}) == 2 for keys in slots)


def test_split_mode_refuses_more_slots_than_shards(shards: Path) -> None:
    with pytest.raises(DataError, match="lower --workers"):
        source(shards, world_size=3, resampled=False, workers=2)


def test_resampled_stream_is_a_function_of_seed_epoch_and_slot(shards: Path) -> None:
    first = [b.keys for b in islice(source(shards, seed=1).epoch(0), 4)]
    again = [b.keys for b in islice(source(shards, seed=1).epoch(0), 4)]
    other_epoch = [b.keys for b in islice(source(shards, seed=1).epoch(1), 4)]
    other_rank = [b.keys for b in islice(source(shards, seed=1, rank=1, world_size=2).epoch(0), 4)]
    assert first == again
    assert first != other_epoch and first != other_rank


@pytest.mark.parametrize("resampled", [True, False])
def test_resumed_stream_continues_with_the_same_batches(shards: Path, resampled: bool) -> None:
    src = source(shards, batch_size=3, resampled=resampled, workers=2)
    full = list(islice(src.epoch(2), 7))
    state = StreamState.fresh(2)
    for batch in full[:3]:  # stop after 3 batches: worker 0 made two, worker 1 one
        state.update(batch)
    resumed = list(islice(src.epoch(2, state), 4))
    for want, got in zip(full[3:], resumed, strict=True):
        assert got.worker == want.worker and got.keys == want.keys
        assert torch.equal(got.images, want.images)


@pytest.mark.parametrize("output", ["uint8", "encoded"])
def test_resumed_stream_continues_with_the_same_crops_in_every_output(shards: Path, output: str) -> None:
    src = source(shards, batch_size=3, output=output, resampled=False, workers=2)
    full = list(islice(src.epoch(2), 5))
    state = StreamState.fresh(2)
    for batch in full[:2]:
        state.update(batch)
    for want, got in zip(full[2:], islice(src.epoch(2, state), 3), strict=True):
        assert got.keys == want.keys
        if output == "uint8":
            assert torch.equal(got.images, want.images)
        else:
            assert got.encoded is not None and want.encoded is not None
            assert torch.equal(got.encoded.crops, want.encoded.crops)
            assert torch.equal(got.encoded.data, want.encoded.data)


def test_uint8_batches_normalised_on_the_device_equal_the_float_path(shards: Path) -> None:
    # same seed: same samples, same crops and flips; only where the float conversion happens differs
    floats = list(islice(source(shards, batch_size=4, seed=7, output="float").epoch(1), 4))
    pixels = list(islice(source(shards, batch_size=4, seed=7).epoch(1), 4))
    for f, u in zip(floats, pixels, strict=True):
        assert f.keys == u.keys
        assert u.images.dtype == torch.uint8 and u.images.is_contiguous(memory_format=torch.channels_last)
        x = normalize(u.images)
        assert x.dtype == torch.float32 and x.is_contiguous()
        torch.testing.assert_close(x, f.images, rtol=0, atol=1e-5)
    assert normalize(floats[0].images) is floats[0].images  # float input is already normalised


def test_device_decode_on_cpu_gives_the_cpu_pipelines_crops(shards: Path) -> None:
    # The test shards alternate JPEG and PNG: JPEGs travel encoded, PNGs as pixels decoded in the worker.
    encoded = list(islice(source(shards, batch_size=8, seed=3, output="encoded").epoch(0), 4))
    pixels = list(islice(source(shards, batch_size=8, seed=3).epoch(0), 4))
    assert any(
        b.encoded is not None and b.encoded.pixels.any() and not b.encoded.pixels.all() for b in encoded
    )
    for e, u in zip(encoded, pixels, strict=True):
        assert e.keys == u.keys and e.images.numel() == 0 and len(e) == 8
        decoded, dropped = e.images_on(torch.device("cpu"))
        assert dropped == 0 and decoded.shape == u.images.shape and decoded.dtype == torch.uint8
        diff = (decoded.int() - u.images.int()).abs()
        # Pillow picks the order of its two resampling passes per image; one order is exact, the other
        # differs by a level or a few on a small share of pixels.
        assert float((diff == 0).float().mean()) > 0.9 and int(diff.max()) <= 16
        assert float(diff.float().mean()) < 0.2
        torch.testing.assert_close(
            decoded.float().mean((0, 2, 3)), u.images.float().mean((0, 2, 3)), atol=0.3, rtol=0
        )
        torch.testing.assert_close(
            decoded.float().std((0, 2, 3)), u.images.float().std((0, 2, 3)), atol=0.3, rtol=0
        )


def test_device_crops_follow_random_resized_crop_and_flip(shards: Path) -> None:
    crops = torch.cat(
        [b.encoded.crops for b in islice(source(shards, batch_size=8, output="encoded").epoch(5), 12)]  # type: ignore[union-attr]
    )
    top, left, h, w, flip = crops.T.double()
    assert ((top >= 0) & (left >= 0) & (top + h <= 40) & (left + w <= 40)).all()
    area = h * w / (40 * 40)
    assert (area >= 0.2 * 0.9).all() and (area <= 1).all() and float(area.std()) > 0.1
    assert ((w / h >= 3 / 4 - 0.05) & (w / h <= 4 / 3 + 0.05)).all()
    assert 0.3 < float(flip.mean()) < 0.7


def test_resized_crops_match_pillow_and_fold_the_flip() -> None:
    import numpy as np
    from _shards import tile_image

    from rspretrain.augment import Crop, crop_uint8, resized_crops

    img = tile_image(np.random.default_rng(4), 96)
    x = torch.from_numpy(np.array(img)).permute(2, 0, 1)[None]  # (1, C, H, W)
    # crop widths and heights that shrink, keep and grow, each with and without the flip
    for crop in [
        Crop(0, 0, 96, 96, False),
        Crop(10, 5, 40, 70, True),
        Crop(3, 9, 20, 17, False),
        Crop(0, 0, 32, 32, True),
    ]:
        want = torch.from_numpy(crop_uint8(img, crop, 32).copy()).permute(2, 0, 1)
        got = resized_crops(x, torch.tensor([list(crop)]), 32)[0]
        diff = (got.int() - want.int()).abs()
        assert int(diff.max()) <= 8 and float((diff == 0).float().mean()) > 0.85, crop


def test_device_decode_drops_a_jpeg_that_will_not_decode() -> None:
    from rspretrain.augment import EncodedBatch, decode_batch, draw_crop, jpeg_header

    good = _jpeg(40)
    cut = good[: len(good) // 2]  # a valid header over a body cut short
    assert jpeg_header(cut) == (40, 40)
    crop = draw_crop(40, 40, random.Random(0), (0.2, 1.0))
    batch = EncodedBatch.build([(good, 40, 40, crop), (cut, 40, 40, crop), (good, 40, 40, crop)], 32)
    images, dropped = decode_batch(batch, torch.device("cpu"))
    assert dropped == [1] and images.shape == (2, 3, 32, 32) and torch.equal(images[0], images[1])


def _jpeg(size: int) -> bytes:
    import io

    import numpy as np
    from _shards import tile_image

    buf = io.BytesIO()
    tile_image(np.random.default_rng(1), size).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def test_workers_default_to_this_process_share_of_the_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(range(16)), raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert fitted_workers(1) == 15
    assert fitted_workers(16) == 0  # a CPU run whose threads take every core: load between steps
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")  # 8 ranks share the node
    assert fitted_workers(1) == 1
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(range(2)), raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert fitted_workers(2) == 0


def test_config_workers_null_is_fitted_and_an_explicit_count_is_kept(shards: Path) -> None:
    fitted = ShardSource(
        DataConfig(shards=(str(shards),)), img_size=32, batch_size=2, seed=0, trainer_threads=10**6
    )
    assert fitted.workers == 0
    kept = ShardSource(DataConfig(shards=(str(shards),), workers=3), img_size=32, batch_size=2, seed=0)
    assert kept.workers == 3


def test_fitted_workers_start_without_pytorchs_too_many_workers_warning(shards: Path) -> None:
    import warnings

    src = ShardSource(DataConfig(shards=(str(shards),), shuffle_buffer=8, shuffle_initial=4), img_size=32,
                      batch_size=2, seed=0, trainer_threads=1)  # fmt: skip
    assert 0 <= src.workers < (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batch = next(src.epoch(0))
    assert batch.images.shape == (2, 3, 32, 32)
    assert not [w for w in caught if "worker" in str(w.message)], [str(w.message) for w in caught]

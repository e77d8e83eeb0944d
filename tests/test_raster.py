"""rscurate.raster: identification, headers, conversion to 8-bit RGB, nodata masks, orientation, bounded memory."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import rasterio
from _images import (
    ORIGIN,
    PIXEL,
    TEXTS,
    textured,
    write_cmyk_jpeg,
    write_exif_jpeg,
    write_geotiff,
    write_gray16_png,
    write_jpeg,
    write_palette_png,
    write_png,
    write_png_header_only,
    write_rgba_png,
    write_text_as_image,
    write_truncated,
    write_zero_byte,
    write_zero_png,
)
from PIL import Image, ImageOps
from rasterio.enums import ColorInterp

from rscurate import raster
from rscurate.raster import UnreadableImage, open_path, open_scene, read_header, read_rgb_whole


def reason_of(path: Path) -> str:
    with pytest.raises(UnreadableImage) as err:
        read_header(str(path))
    return err.value.reason


def read_all(path: Path, bands: tuple[int, ...] | None = None) -> tuple[np.ndarray, np.ndarray]:
    with open_path(str(path), bands) as reader:
        rgb, valid = reader.read_rgb()
        return rgb.copy(), valid.copy()


# --------------------------------------------------------------------------------------------------
# Identification and readable reasons


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("html", "not an image: looks like HTML text"),
        ("json", "not an image: looks like JSON text"),
        ("xml", "not an image: looks like XML text"),
        ("text", "not an image: looks like plain text"),
        ("lfs", "not an image: a Git LFS pointer"),
    ],
)
def test_text_under_an_image_name_says_what_it_is(tmp_path: Path, kind: str, expected: str) -> None:
    path = write_text_as_image(tmp_path / "x.png", kind)
    assert reason_of(path).startswith(expected)


def test_broken_files_get_readable_reasons(tmp_path: Path) -> None:
    assert reason_of(write_zero_byte(tmp_path / "empty.jpg")) == "zero-byte file"
    jpg = write_jpeg(tmp_path / "ok.jpg", textured(64, 64))
    assert reason_of(write_truncated(tmp_path / "cut.jpg", jpg)) == "truncated JPEG (no end-of-image marker)"
    png = write_png(tmp_path / "ok.png", textured(64, 64))
    assert reason_of(write_truncated(tmp_path / "cut.png", png)) == "truncated PNG (no IEND chunk at the end)"
    tif = write_geotiff(tmp_path / "ok.tif", textured(300, 300), compress=None)
    assert reason_of(write_truncated(tmp_path / "cut.tif", tif, keep=0.6)).startswith("truncated TIFF")
    (tmp_path / "folder.jpg").mkdir()
    assert reason_of(tmp_path / "folder.jpg") == "a directory, not a file (its name looks like an image)"
    (tmp_path / "zip.jpg").write_bytes(b"PK\x03\x04" + bytes(60))
    assert reason_of(tmp_path / "zip.jpg") == "not an image: a ZIP archive"
    (tmp_path / "junk.tif").write_bytes(bytes(range(200)))
    assert reason_of(tmp_path / "junk.tif").startswith(
        "not an image: unknown format (starts with bytes 00 01 02"
    )
    os.symlink(tmp_path / "nowhere.jpg", tmp_path / "dangling.jpg")
    assert reason_of(tmp_path / "dangling.jpg") == "broken symlink (its target does not exist)"


def test_permission_denied(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_jpeg(tmp_path / "secret.jpg", textured(32, 32))
    if os.geteuid() != 0:
        path.chmod(0)
    else:  # root reads anything: make open() fail the way it does for other users

        def denied(*a: object, **k: object) -> None:
            raise PermissionError(13, "Permission denied")

        monkeypatch.setattr(raster, "open", denied, raising=False)
    assert reason_of(path) == "permission denied"


# --------------------------------------------------------------------------------------------------
# Headers


def test_geotiff_header_fields(tmp_path: Path) -> None:
    path = write_geotiff(tmp_path / "g.tif", textured(300, 200, 4, dtype="uint16"), nodata=0, block=128)
    info = read_header(str(path))
    assert (info.format, info.backend, info.width, info.height, info.bands, info.dtype) == (
        "tiff",
        "rasterio",
        200,
        300,
        4,
        "uint16",
    )
    assert info.crs == "EPSG:32633" and info.nodata == 0.0
    assert info.transform == (PIXEL, 0.0, ORIGIN[0], 0.0, -PIXEL, ORIGIN[1])
    assert info.block == (128, 128) and info.mode == "4-band"

    plain = read_header(str(write_geotiff(tmp_path / "p.tif", textured(40, 50), crs=None, tiled=False)))
    assert (plain.crs, plain.transform, plain.nodata, plain.mode) == (None, None, None, "RGB")

    f32 = read_header(
        str(write_geotiff(tmp_path / "f.tif", textured(40, 50, 1, dtype="float32"), nodata=float("nan")))
    )
    assert f32.dtype == "float32" and f32.bands == 1 and np.isnan(f32.nodata) and f32.mode == "L"


def test_custom_wkt_crs_is_kept_as_wkt(tmp_path: Path) -> None:
    wkt = rasterio.crs.CRS.from_proj4(
        "+proj=tmerc +lat_0=0 +lon_0=11.5 +k=0.9996 +x_0=600000 +y_0=0 +ellps=GRS80 +units=m"
    ).to_wkt()
    info = read_header(str(write_geotiff(tmp_path / "w.tif", textured(32, 32), crs=wkt)))
    assert info.crs is not None and info.crs.startswith(("PROJCS", "PROJCRS")) and "11.5" in info.crs


def test_pillow_headers(tmp_path: Path) -> None:
    jpg = read_header(str(write_jpeg(tmp_path / "a.JPG", textured(48, 64))))
    assert (jpg.format, jpg.backend, jpg.width, jpg.height, jpg.bands, jpg.dtype, jpg.mode) == (
        "jpeg",
        "pil",
        64,
        48,
        3,
        "uint8",
        "RGB",
    )
    png16, _ = write_gray16_png(tmp_path / "g16.png")
    info = read_header(str(png16))
    assert (info.dtype, info.bands, info.mode) == ("uint16", 1, "I;16")
    pal, _ = write_palette_png(tmp_path / "p.png")
    assert read_header(str(pal)).mode == "P"
    rotated, _ = write_exif_jpeg(tmp_path / "r.jpg", 6, h=48, w=64)
    r = read_header(str(rotated))
    assert (r.width, r.height, r.orientation) == (48, 64, 6)  # displayed size, after the rotation
    # A .png that is really a JPEG is identified by its content.
    assert read_header(str(write_jpeg(tmp_path / "lies.png", textured(16, 16)))).format == "jpeg"


def test_png_claiming_30000_px_is_never_decoded(tmp_path: Path) -> None:
    """Header reads of huge PNGs stay small: a crafted one (truncated IDAT) is an error, a real one of
    30000 x 30000 px goes to GDAL, and a strip at its bottom reads in bounded memory."""
    crafted = write_png_header_only(tmp_path / "claims.png", 30000, 30000)
    real = write_zero_png(tmp_path / "zeros.png", 30000)
    assert real.stat().st_size < 400_000
    code = textwrap.dedent(
        f"""
        import numpy as np
        from rscurate.raster import read_header, open_path, UnreadableImage
        try:
            read_header({str(crafted)!r}); print("no error")
        except UnreadableImage as e:
            print(e.reason)
        info = read_header({str(real)!r})
        print(info.width, info.height, info.backend)
        with open_path({str(real)!r}) as r:
            rgb, valid = r.read_rgb((29000, 29500, 512, 500))
        print(rgb.shape, int(rgb.max()), bool(valid.all()))
        print(int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) // 1024)  # this process's peak (ru_maxrss would include the parent pytest: it survives exec)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    ).stdout.split("\n")
    assert out[0] == "truncated PNG (no IEND chunk at the end)"
    assert out[1] == "30000 30000 rasterio"
    assert out[2] == "(500, 512, 3) 0 True"
    peak_mb = int(out[3])
    assert peak_mb < 600, f"peak RSS {peak_mb} MB: the 30000 px PNG (2.7 GB as RGB) was decoded whole?"


# --------------------------------------------------------------------------------------------------
# Conversion to 8-bit RGB and nodata


def test_uint16_is_stretched_per_band_to_the_full_range(tmp_path: Path) -> None:
    data = textured(200, 240, 3, dtype="uint16")
    data[:20, :20] = 0  # nodata corner: ignored by the percentiles, black, invalid
    rgb, valid = read_all(write_geotiff(tmp_path / "u16.tif", data, nodata=0))
    assert rgb.dtype == np.uint8 and rgb.shape == (200, 240, 3)
    assert not valid[:20, :20].any() and valid[20:, 20:].all()
    assert (rgb[:20, :20] == 0).all()
    for c in range(3):
        band = rgb[..., c][valid]
        lo, hi = np.percentile(data[..., c][valid], [2, 98])
        assert band.min() == 0 and band.max() == 255
        # 2% of valid pixels at or under the low cut, 2% at or over the high one
        assert 0.015 <= np.mean(band == 0) <= 0.03 and 0.015 <= np.mean(band == 255) <= 0.03
        mid = data[..., c][valid & (data[..., c] > lo) & (data[..., c] < hi)][:100]
        expected = np.floor((mid - lo) / (hi - lo) * 255 + 0.5)
        got = rgb[..., c][valid & (data[..., c] > lo) & (data[..., c] < hi)][:100]
        assert np.abs(got.astype(int) - expected).max() <= 2  # percentiles come from a decimated read


def test_stretch_is_computed_once_per_scene_not_per_window(tmp_path: Path) -> None:
    data = textured(600, 600, 3, dtype="uint16")
    path = write_geotiff(tmp_path / "u16.tif", data)
    whole, _ = read_all(path)
    with open_path(str(path)) as reader:
        window, _ = reader.read_rgb((300, 300, 200, 200))
        assert reader._limits is not None  # type: ignore[attr-defined]
    assert np.array_equal(window, whole[300:500, 300:500])


def test_large_scene_stretch_samples_blocks(tmp_path: Path) -> None:
    data = textured(2200, 2200, 1, dtype="int16")
    path = write_geotiff(tmp_path / "big16.tif", data, block=256)
    with open_path(str(path)) as reader:
        rgb, _ = reader.read_rgb((0, 0, 2200, 256))
        lo, hi = reader._limits[0]  # type: ignore[attr-defined,index]
    true_lo, true_hi = np.percentile(data, [2, 98])
    span = float(data.max()) - float(data.min())
    assert abs(lo - true_lo) < 0.05 * span and abs(hi - true_hi) < 0.05 * span
    assert (rgb[..., 0] == rgb[..., 1]).all() and rgb.max() == 255


def test_float_nan_is_nodata(tmp_path: Path) -> None:
    data = textured(100, 100, 3, dtype="float32")
    data[40:60, 10:90, 1] = np.nan  # NaN in one band is enough
    rgb, valid = read_all(write_geotiff(tmp_path / "f.tif", data))
    assert valid.sum() == 100 * 100 - 20 * 80
    assert not valid[40:60, 10:90].any() and (rgb[40:60, 10:90] == 0).all()
    assert rgb[valid].max() == 255 and rgb[valid].min() == 0


def test_declared_nodata_needs_every_band(tmp_path: Path) -> None:
    data = textured(50, 50)
    data[:10] = 0  # all bands 0: nodata
    data[10:20, :, 0] = 0  # only red 0: a valid (very dark red) pixel, as GDAL's dataset mask has it
    _, valid = read_all(write_geotiff(tmp_path / "n.tif", data, nodata=0))
    assert not valid[:10].any() and valid[10:].all()


def test_alpha_band_and_internal_mask(tmp_path: Path) -> None:
    rgba = np.dstack([textured(60, 70), np.full((60, 70), 255, np.uint8)])
    rgba[:, :25, 3] = 0
    path = write_geotiff(tmp_path / "a.tif", rgba, photometric="rgb", alpha="yes")
    rgb, valid = read_all(path)
    assert read_header(str(path)).mode == "RGBA"
    assert not valid[:, :25].any() and valid[:, 25:].all() and (rgb[:, :25] == 0).all()
    assert np.array_equal(rgb[:, 25:], rgba[:, 25:, :3])

    mask = np.ones((60, 70), bool)
    mask[30:, 30:] = False
    _, mvalid = read_all(write_geotiff(tmp_path / "m.tif", textured(60, 70), mask=mask))
    assert np.array_equal(mvalid, mask)

    png_rgb, png_valid = read_all(write_rgba_png(tmp_path / "a.png", transparent_cols=16))
    assert not png_valid[:, :16].any() and png_valid[:, 16:].all() and (png_rgb[:, :16] == 0).all()


@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")
def test_palette_cmyk_gray_and_16bit_png(tmp_path: Path) -> None:
    pal, shown = write_palette_png(tmp_path / "p.png")
    rgb, valid = read_all(pal)
    assert np.array_equal(rgb, shown) and valid.all()

    cmyk, expected = write_cmyk_jpeg(tmp_path / "c.jpg")
    rgb, _ = read_all(cmyk)
    assert np.array_equal(rgb, expected)

    gray = textured(40, 30, 1)[:, :, 0]
    rgb, _ = read_all(write_png(tmp_path / "g.png", gray))
    assert rgb.shape == (40, 30, 3) and all(np.array_equal(rgb[..., c], gray) for c in range(3))

    g16, arr = write_gray16_png(tmp_path / "g16.png")
    rgb, _ = read_all(g16)
    assert rgb.min() == 0 and rgb.max() == 255
    assert np.corrcoef(rgb[..., 0].ravel(), arr.ravel())[0, 1] > 0.98

    # A palette GeoTIFF goes through its colour map.
    index = (np.arange(40 * 50).reshape(40, 50) % 4).astype(np.uint8)
    cmap = {0: (255, 0, 0, 255), 1: (0, 255, 0, 255), 2: (0, 0, 255, 255), 3: (9, 9, 9, 255)}
    path = tmp_path / "pal.tif"
    with rasterio.open(
        path, "w", driver="GTiff", width=50, height=40, count=1, dtype="uint8", photometric="palette"
    ) as ds:
        ds.write(index, 1)
        ds.write_colormap(1, cmap)
    rgb, _ = read_all(path)
    assert np.array_equal(rgb, np.array([c[:3] for c in cmap.values()], np.uint8)[index])


def test_more_than_three_bands(tmp_path: Path) -> None:
    data = textured(40, 40, 8, seed=3)
    path = write_geotiff(tmp_path / "ms.tif", data)
    first, _ = read_all(path)
    assert np.array_equal(first, data[..., :3])
    chosen, _ = read_all(path, bands=(5, 3, 2))
    assert np.array_equal(chosen, data[..., [4, 2, 1]])
    single, _ = read_all(path, bands=(7,))
    assert np.array_equal(single[..., 1], data[..., 6])
    with pytest.raises(UnreadableImage, match="asks for bands"):
        read_all(path, bands=(9, 2, 1))


def test_bgr_colour_interpretation_is_respected(tmp_path: Path) -> None:
    data = textured(20, 20, 3, seed=5)
    path = write_geotiff(
        tmp_path / "bgr.tif", data, colorinterp=[ColorInterp.blue, ColorInterp.green, ColorInterp.red]
    )
    rgb, _ = read_all(path)
    assert np.array_equal(rgb, data[..., ::-1])


# --------------------------------------------------------------------------------------------------
# Windows, padding, orientation


def test_windows_reaching_past_the_scene_are_padded_as_nodata(tmp_path: Path) -> None:
    data = textured(100, 120)
    for path in (write_geotiff(tmp_path / "t.tif", data, block=32), write_png(tmp_path / "t.png", data)):
        with open_path(str(path)) as reader:
            rgb, valid = reader.read_rgb((100, 80, 50, 40))
        assert rgb.shape == (40, 50, 3)
        assert np.array_equal(rgb[:20, :20], data[80:, 100:]) and valid[:20, :20].all()
        assert not valid[20:].any() and not valid[:, 20:].any() and (rgb[20:] == 0).all()


def test_overlapping_strips_reuse_rows_and_match_direct_reads(tmp_path: Path) -> None:
    data = textured(300, 200, 3, dtype="uint16")
    path = write_geotiff(tmp_path / "s.tif", data, block=64)
    whole, _ = read_all(path)
    with open_path(str(path)) as reader:
        for y, h in ((0, 128), (96, 128), (172, 128), (200, 100)):
            rgb, _ = reader.read_rgb((0, y, 200, h))
            assert np.array_equal(rgb, whole[y : y + h])


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied(tmp_path: Path, orientation: int) -> None:
    path, stored = write_exif_jpeg(tmp_path / "o.jpg", orientation)
    expected = np.asarray(ImageOps.exif_transpose(Image.open(path)).convert("RGB"))
    rgb, _ = read_all(path)
    assert rgb.shape == expected.shape and np.array_equal(rgb, expected)
    assert np.array_equal(raster.orient_array(stored, orientation), expected)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_stored_window_maps_displayed_windows(orientation: int) -> None:
    stored = np.arange(7 * 11).reshape(7, 11)
    shown = raster.orient_array(stored, orientation)
    rng = np.random.default_rng(orientation)
    for _ in range(10):
        h, w = shown.shape
        x, y = int(rng.integers(0, w - 1)), int(rng.integers(0, h - 1))
        ww, hh = int(rng.integers(1, w - x + 1)), int(rng.integers(1, h - y + 1))
        sx, sy, sw, sh = raster.stored_window((x, y, ww, hh), orientation, 11, 7)
        part = raster.orient_array(stored[sy : sy + sh, sx : sx + sw], orientation)
        assert np.array_equal(part, shown[y : y + hh, x : x + ww])


def test_large_jpeg_goes_through_gdal_with_its_orientation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, _ = write_exif_jpeg(tmp_path / "big.jpg", 6, h=96, w=128)
    via_pillow, _ = read_all(path)
    monkeypatch.setattr(raster, "PIL_MAX_PIXELS", 1000)  # "too large for Pillow"
    info = read_header(str(path))
    assert (info.backend, info.width, info.height, info.orientation) == ("rasterio", 96, 128, 6)
    via_gdal, _ = read_all(path)
    with open_path(str(path)) as reader:
        part, _ = reader.read_rgb((10, 20, 40, 50))
    assert via_gdal.shape == via_pillow.shape
    # GDAL's libjpeg upsamples chroma differently from Pillow's (a few levels); a wrong orientation
    # would differ by tens of levels.
    assert np.abs(via_gdal.astype(int) - via_pillow).mean() < 4
    assert np.abs(via_gdal[::-1, ::-1].astype(int) - via_pillow).mean() > 20
    assert np.array_equal(part, via_gdal[20:70, 10:50])


def test_read_rgb_whole_reduces_to_max_side(tmp_path: Path) -> None:
    data = textured(400, 300)
    for path in (write_png(tmp_path / "w.png", data), write_geotiff(tmp_path / "w.tif", data)):
        rgb, valid = read_rgb_whole(str(path), max_side=100)
        assert max(rgb.shape[:2]) <= 100 and rgb.shape[:2] == valid.shape
        full, _ = read_rgb_whole(str(path))
        assert np.array_equal(full, data)


def test_open_scene_with_header_matches_open_path(tmp_path: Path) -> None:
    path = write_geotiff(tmp_path / "x.tif", textured(64, 64, 3, dtype="uint16"))
    info = read_header(str(path))
    with open_scene(str(path), info) as a, open_path(str(path)) as b:
        assert a.info == b.info
        assert np.array_equal(a.read_rgb()[0], b.read_rgb()[0])


def test_bounds_of_window() -> None:
    t = (2.0, 0.0, 1000.0, 0.0, -2.0, 5000.0)
    assert raster.bounds_of(t, (10, 20, 5, 5)) == [1020.0, 4950.0, 1030.0, 4960.0]
    assert raster.bounds_of(None, (0, 0, 1, 1)) is None


def test_sniff_knows_the_formats() -> None:
    assert raster.sniff_format(b"\xff\xd8\xff\xe0" + bytes(60)) == "jpeg"
    assert raster.sniff_format(b"II*\x00" + bytes(60)) == "tiff"
    assert raster.sniff_format(b"RIFF\x00\x00\x00\x00WEBPVP8 " + bytes(50)) == "webp"
    assert raster.sniff_format(b"\x00\x00\x00\x0cjP  \r\n\x87\n" + bytes(52)) == "jp2"
    with pytest.raises(UnreadableImage, match="AppleDouble"):
        raster.sniff_format(b"\x00\x05\x16\x07" + bytes(60))
    assert set(TEXTS) == {"html", "json", "xml", "text", "lfs"}


# --------------------------------------------------------------------------------------------------
# Real imagery (RS_REAL_DATA)


@pytest.mark.realdata
def test_real_alpha_16bit_multiband_and_crs(real_data: Path) -> None:
    _, valid = read_all(real_data / "rio-tiler/pix4d_alpha_nodata.tif")
    assert 0.05 < 1 - valid.mean() < 0.5  # transparent outside the flight footprint

    info = read_header(str(real_data / "rio-color/rgb16.tif"))
    assert info.dtype == "uint16"
    rgb, valid = read_all(real_data / "rio-color/rgb16.tif")
    assert all(rgb[..., c][valid].min() == 0 and rgb[..., c][valid].max() == 255 for c in range(3))

    ms = real_data / "torchsat/tiff_8channel_uint8.tif"
    assert read_header(str(ms)).bands == 8
    with rasterio.open(ms) as ds:
        raw = ds.read([5, 3, 2])  # (3, H, W)
    chosen, _ = read_all(ms, bands=(5, 3, 2))
    assert np.array_equal(chosen, np.moveaxis(raw, 0, 2))

    byte = read_header(str(real_data / "rasterio/RGB.byte.tif"))
    assert byte.crs == "EPSG:32618" and byte.nodata == 0.0
    _, valid = read_all(real_data / "rasterio/RGB.byte.tif")
    assert 0.2 < 1 - valid.mean() < 0.45  # black collar around the rotated Landsat footprint

"""`rscurate report`: the HTML page's content (sections, counts, images, escaping, no external URLs),
its fallbacks when _work or the sources are gone, the empty cases, the CLI, and a headless-Chromium render."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from _browser import image_spread, render
from conftest import MINI_EXPECTED, aerialish, write_mini_corpus
from PIL import Image
from typer.testing import CliRunner

from rscurate import pipeline
from rscurate.cli import app
from rscurate.recipe import load_recipe
from rscurate.report import ReportConfig, write_report
from rscurate.report import render as render_page

SECTIONS = (
    "summary",
    "sources",
    "passes",
    "reasons",
    "sizes",
    "nodata",
    "samples",
    "duplicates",
    "benchmarks",
    "excluded",
    "recipe",
)
# A file name that breaks a page that forgot to escape: quotes, a tag with a handler, an ampersand.
HOSTILE = "\"'><img src=x onerror=alert(1)>&amp;"


# --- reading the page back ----------------------------------------------------------------------------


class _Page(HTMLParser):
    """Sections (id -> inner HTML span), tables (id -> rows of cell texts) and every img/link attribute."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tables: dict[str, list[list[str]]] = {}
        self.imgs: list[dict[str, str]] = []
        self.links: list[str] = []
        self._table: str | None = None
        self._cell: list[str] | None = None
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "table":
            self._table = a.get("id", "")
            self.tables[self._table] = []
        elif tag == "tr" and self._table is not None:
            self.tables[self._table].append([])
        elif tag in ("td", "th") and self._table is not None:
            self._cell = []
        elif tag == "img":
            self.imgs.append(a)
        for name in ("href", "src"):
            if name in a and tag != "img":
                self.links.append(a[name])

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None and self._table is not None:
            self.tables[self._table][-1].append("".join(self._cell).strip())
            self._cell = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def section(page: str, sid: str) -> str:
    match = re.search(rf'<section id="{sid}">(.*?)</section>', page, re.S)
    assert match, f"section {sid} missing"
    return match.group(1)


def num(cell: str) -> int:
    return int(cell.replace(",", ""))


def decode_img(src: str) -> Image.Image:
    head, _, data = src.partition(",")
    assert head in ("data:image/jpeg;base64", "data:image/png;base64"), head[:40]
    im = Image.open(io.BytesIO(base64.b64decode(data)))
    im.load()
    return im


def thumbs(html_part: str) -> list[Image.Image]:
    return [decode_img(a["src"]) for a in _Page(html_part).imgs]


# --- fixtures -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mini_page(mini_curated: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    html_path = tmp_path_factory.mktemp("report") / "mini.html"
    result = write_report(mini_curated, html_path)
    return {
        "out": mini_curated,
        "path": html_path,
        "text": html_path.read_text(encoding="utf-8"),
        "result": result,
        "stats": json.loads((mini_curated / "stats.json").read_text()),
        "tiles": pd.read_parquet(mini_curated / "tiles.parquet"),
        "inputs": pd.read_parquet(mini_curated / "inputs.parquet"),
    }


def curate(recipe: Path, out: Path) -> Path:
    pipeline.run(load_recipe(recipe), out, workers=1)
    return out


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The mini corpus plus: an unreadable file and a near-duplicate with hostile names, and a benchmark
    image that is one tile of alpha/big.png (a per-tile match; the scene as a whole stays)."""
    root = tmp_path_factory.mktemp("hostile") / "corpus"
    recipe = write_mini_corpus(root)
    (root / "alpha" / f"{HOSTILE}.png").write_bytes(b"<html>not an image</html>\n")
    a03 = np.asarray(Image.open(root / "alpha" / "a03.png"))
    near = np.clip(a03.astype(np.int16) + 2, 0, 255).astype(np.uint8)
    Image.fromarray(near).save(root / "beta" / f"{HOSTILE}.jpg", quality=95)
    big = np.asarray(Image.open(root / "alpha" / "big.png"))
    Image.fromarray(big[0:256, 256:512]).save(root / "bench" / "tile_of_big.png")
    out = curate(recipe, tmp_path_factory.mktemp("hostile-out") / "out")
    html_path = out.parent / "report.html"
    write_report(out, html_path)
    return {"out": out, "path": html_path, "text": html_path.read_text(encoding="utf-8"), "root": root}


# --- content ------------------------------------------------------------------------------------------


def test_every_section_is_there_and_the_counts_are_stats_json(mini_page: dict) -> None:
    page, stats = mini_page["text"], mini_page["stats"]
    for sid in SECTIONS:
        section(page, sid)
        assert f'href="#{sid}"' in page
    tables = _Page(page).tables
    for name, statuses in (("inputs", pipeline.INPUT_STATUSES), ("tiles", pipeline.TILE_STATUSES)):
        rows = tables[f"{name}-by-source"]
        assert rows[0] == ["source", "total", *statuses]
        got = {r[0]: [num(c) for c in r[1:]] for r in rows[1:]}
        want = {s: [c["total"], *(c[st] for st in statuses)] for s, c in stats[name]["by_source"].items()}
        want["all"] = [stats[name]["total"], *(stats[name]["by_status"][st] for st in statuses)]
        assert got == want
    reasons = {(r[0], r[1]): num(r[2]) for r in tables["reasons-table"][1:]}
    assert reasons == {(t, r): n for t in ("inputs", "tiles") for r, n in stats[t]["by_reason"].items()}
    assert reasons[("inputs", "benchmark")] == MINI_EXPECTED["by_reason"]["benchmark"]
    passes = {(r[0], r[1]): num(r[2]) for r in tables["passes-table"][1:]}
    assert passes[("shard", "samples")] == stats["kept"] == MINI_EXPECTED["kept"]
    assert passes[("dedup", "tiles duplicate")] == MINI_EXPECTED["duplicate"]
    summary = section(page, "summary")
    assert f'<div class="value">{stats["kept"]:,}</div><div class="label">kept samples' in summary
    # Tile sizes sum to every tile; the nodata table counts every tile once.
    tiles = mini_page["tiles"]
    assert sum(num(r[1]) for r in tables["sizes-table"][1:]) == len(tiles)
    nodata = {r[0]: r[1] for r in tables["nodata-table"][1:]}
    assert num(nodata["tiles with no nodata"]) + num(nodata["tiles with some nodata"]) == len(tiles)
    # The recipe is the resolved one, verbatim (escaped).
    recipe_text = (mini_page["out"] / "recipe.yaml").read_text()
    assert "fingerprint: " + stats["fingerprint"] in section(page, "recipe")
    assert len(recipe_text) > 100 and "name: mini" in section(page, "recipe")


def test_mosaic_shows_seeded_kept_samples_from_the_shards(mini_page: dict, tmp_path: Path) -> None:
    page, tiles = mini_page["text"], mini_page["tiles"]
    part = section(page, "samples")
    kept = tiles[tiles["status"] == "kept"].set_index("key")
    figures = re.findall(r'<figure class="thumb" title="([^"]+) in ([^"]+)">', part)
    assert len(figures) == mini_page["result"].samples == MINI_EXPECTED["kept"]  # fewer kept than 48
    for key, shard_name in figures:
        assert kept.loc[key, "shard"] == shard_name
    images = thumbs(part)
    assert len(images) == len(figures)
    assert all(im.format == "JPEG" and max(im.size) == 160 for im in images)
    # The thumbnail is the shard's image, reduced.
    import tarfile

    key, shard_name = figures[0]
    with tarfile.open(mini_page["out"] / "shards" / shard_name) as tar:
        member = tar.extractfile(f"{key}.jpg")
        assert member is not None
        original = Image.open(io.BytesIO(member.read())).convert("RGB")
    original.thumbnail((160, 160))
    diff = np.abs(np.asarray(original, float) - np.asarray(images[0].convert("RGB"), float)).mean()
    assert diff < 6, diff

    # Seeded: with fewer samples than kept, another seed draws others (the same seed: test_page_is_reproducible).
    a, _ = render_page(mini_page["out"], ReportConfig(samples=5, seed=1))
    c, _ = render_page(mini_page["out"], ReportConfig(samples=5, seed=2))
    keys = [re.findall(r'title="([\w-]+) in ', section(p, "samples")) for p in (a, c)]
    assert len(keys[0]) == len(keys[1]) == 5 and keys[0] != keys[1]


def test_page_is_reproducible(mini_page: dict, tmp_path: Path) -> None:
    again = write_report(mini_page["out"], tmp_path / "again.html")
    assert (tmp_path / "again.html").read_bytes() == mini_page["path"].read_bytes()
    assert again.bytes == mini_page["path"].stat().st_size


def test_duplicate_cluster_shows_kept_and_dropped_with_distance(mini_page: dict) -> None:
    tiles = mini_page["tiles"]
    dup = tiles[tiles["status"] == "duplicate"].iloc[0]
    part = section(mini_page["text"], "duplicates")
    assert part.count('class="cluster"') == 1 == mini_page["result"].duplicate_clusters
    assert f'title="{dup["duplicate_of"]}"' in part and f'title="{dup["key"]}"' in part
    assert f"dropped · distance {int(dup['duplicate_distance'])}" in part
    assert "near_a01.jpg" in part and "pixels not available" not in part
    kept_img, dropped_img = thumbs(part)
    # The near-duplicate is the kept chip plus 3 grey levels: the thumbnails look alike.
    diff = np.abs(np.asarray(kept_img, float) - np.asarray(dropped_img, float)).mean()
    assert diff < 12, diff
    assert "from the staged bytes under _work/slice" in part


def test_benchmark_match_shows_the_excluded_scene_next_to_the_benchmark(mini_page: dict) -> None:
    inputs = mini_page["inputs"]
    hit = inputs[inputs["reason"] == "benchmark"].iloc[0]
    part = section(mini_page["text"], "benchmarks")
    assert mini_page["result"].benchmark_matches == 1
    # a chip is a scene of one tile: its match is named as the tile's (mechanism `tile`)
    assert f"excluded · tile · distance {int(hit['benchmark_distance'])}" in part
    assert "a02.png" in part and "leak_a02.png" in part
    excluded, benchmark = thumbs(part)
    diff = np.abs(np.asarray(excluded, float) - np.asarray(benchmark, float)).mean()
    assert diff < 12, diff  # the leak is the chip plus 2 grey levels


def test_without_work_the_dropped_tile_is_cropped_from_its_source(mini_page: dict, tmp_path: Path) -> None:
    out = tmp_path / "out"
    shutil.copytree(mini_page["out"], out, ignore=shutil.ignore_patterns("_work"))
    page, result = render_page(out, ReportConfig())
    part = section(page, "duplicates")
    assert "re-read and cropped from their source scene" in part and "pixels not available" not in part
    assert len(thumbs(part)) == 2 and not result.notes
    assert result.benchmark_matches == 1 and len(thumbs(section(page, "benchmarks"))) == 2

    # And with the source scene gone too: a note, not a crash, and the kept tile still shown.
    tiles = pd.read_parquet(out / "tiles.parquet")
    tiles.loc[tiles["status"] == "duplicate", "path"] = str(tmp_path / "moved-away.jpg")
    pipeline.write_parquet(out / "tiles.parquet", tiles)
    page, _ = render_page(out, ReportConfig())
    part = section(page, "duplicates")
    assert "pixels not available" in part and len(thumbs(part)) == 1
    assert "1 could not be shown" in part


def test_hostile_file_names_are_escaped(hostile: dict) -> None:
    page = hostile["text"]
    assert "onerror=alert" not in page.replace("onerror=alert(1)&gt;", "")  # only ever as escaped text
    assert "<img src=x" not in page
    escaped = "&quot;&#x27;&gt;&lt;img src=x onerror=alert(1)&gt;&amp;amp;"
    assert escaped + ".png" in section(page, "excluded")  # the unreadable one
    assert escaped + ".jpg" in section(page, "duplicates")  # the near-duplicate, shown with its pixels
    assert "pixels not available" not in section(page, "duplicates")


def test_tile_level_benchmark_match_finds_its_benchmark_image(hostile: dict) -> None:
    tiles = pd.read_parquet(hostile["out"] / "tiles.parquet")
    hit = tiles[(tiles["reason"] == "benchmark") & tiles["path"].str.endswith("big.png")].set_index(
        ["x", "y"]
    )
    assert sorted(hit.index) == [(256, 0), (444, 0)]
    assert str(hit.loc[(256, 0), "benchmark_match"]).endswith("bench/tile_of_big.png")
    assert hit.loc[(256, 0), "benchmark_mechanism"] == "tile"
    # The edge tile (shifted to x 444) holds 68 of the benchmark image's 256 columns: the image was also
    # found inside big.png (a window of the scene), and a tile holding over a fifth of it goes too.
    assert hit.loc[(444, 0), "benchmark_mechanism"] == "window"
    assert hit.loc[(444, 0), "benchmark_window"] in {f"{x},0,256,256" for x in range(250, 263)}
    part = section(hostile["text"], "benchmarks")
    assert "bench/tile_of_big.png" in part and "x 256, y 0 · 256×256" in part
    assert "excluded · window · distance" in part and "found in the scene at x,y,w,h" in part
    assert "benchmark image not recorded" not in part
    assert len(thumbs(part)) == 6  # a02 scene + its leak, two big.png tiles + their benchmark


def test_rscurate_stats_prints_the_matches_per_benchmark_and_mechanism(hostile: dict) -> None:
    result = CliRunner().invoke(
        app, ["stats", str(hostile["out"])], catch_exceptions=False, terminal_width=200
    )
    assert result.exit_code == 0, result.output
    part = result.output.split("Benchmark matches", 1)[1].strip().splitlines()
    assert part[0].split() == ["benchmark", "┃", "tile", "┃", "window"]
    assert part[2].split() == ["bench", "│", "2", "(2)", "│", "1", "(1)"]
    assert "tiles (and scenes) each mechanism removed" in " ".join(" ".join(part[3:]).split())


def test_benchmark_section_counts_tiles_per_benchmark_and_mechanism(hostile: dict) -> None:
    stats = json.loads((hostile["out"] / "stats.json").read_text())
    assert stats["benchmarks"]["by_benchmark"] == {
        "bench": {"tile": {"tiles": 2, "scenes": 2}, "window": {"tiles": 1, "scenes": 1}}
    }
    table = _Page(section(hostile["text"], "benchmarks")).tables["benchmark-table"]
    assert table[0] == ["benchmark", "tile", "window", "tiles"]
    assert table[1] == ["bench", "2 (2 scenes)", "1 (1 scene)", "3"]


def test_no_external_urls(mini_page: dict, hostile: dict) -> None:
    for page in (mini_page["text"], hostile["text"]):
        parsed = _Page(page)
        assert parsed.imgs and all(a["src"].startswith("data:image/") for a in parsed.imgs)
        assert all(link.startswith("#") for link in parsed.links), parsed.links
        assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page, re.I)
        assert "url(" not in page and "@import" not in page and "<script" not in page
        assert """content="default-src &#x27;none&#x27;; img-src data:;""" in page


def test_reasonable_size(mini_page: dict) -> None:
    assert 50_000 < mini_page["result"].bytes < 1_500_000


# --- empty cases --------------------------------------------------------------------------------------


def small_corpus(root: Path, *, benchmark: bool, extra: dict | None = None) -> Path:
    """Two chips; with `benchmark`, each has a twin among the benchmark images (so nothing is kept)."""
    rng = np.random.default_rng(7)
    (root / "alpha").mkdir(parents=True)
    chip = aerialish(rng, 160, 160)
    Image.fromarray(chip).save(root / "alpha" / "one.png")
    Image.fromarray(aerialish(rng, 160, 160)).save(root / "alpha" / "two.png")
    recipe: dict = {"name": "small", "sources": [{"name": "alpha", "root": "alpha"}], **(extra or {})}
    if benchmark:
        (root / "bench").mkdir()
        Image.fromarray(chip).save(root / "bench" / "one.jpg", quality=95)
        Image.fromarray(aerialish(rng, 160, 160)).save(root / "bench" / "other.png")
        Image.fromarray(np.asarray(Image.open(root / "alpha" / "two.png"))).save(root / "bench" / "two.jpg")
        recipe["benchmarks"] = [{"name": "b", "root": "bench"}]
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_no_duplicates_no_benchmarks(tmp_path: Path) -> None:
    out = curate(small_corpus(tmp_path / "c", benchmark=False), tmp_path / "out")
    page, result = render_page(out, ReportConfig())
    assert (result.samples, result.duplicate_clusters, result.benchmark_matches) == (2, 0, 0)
    assert "no near-duplicates" in section(page, "duplicates")
    assert "no scene or tile was excluded as a near-match" in section(page, "benchmarks")
    assert "nothing was excluded" in section(page, "reasons")
    assert "every input file was used" in section(page, "excluded")
    assert len(thumbs(section(page, "samples"))) == 2


def test_zero_kept_tiles(tmp_path: Path) -> None:
    # Both chips are benchmark images: every tile is excluded, the shards are empty.
    out = curate(small_corpus(tmp_path / "c", benchmark=True), tmp_path / "out")
    stats = json.loads((out / "stats.json").read_text())
    assert stats["kept"] == 0 and stats["tiles"]["total"] == 2
    page, result = render_page(out, ReportConfig())
    for sid in SECTIONS:
        section(page, sid)
    assert "no tile was kept" in section(page, "samples") and result.samples == 0
    assert result.benchmark_matches == 2 and len(thumbs(section(page, "benchmarks"))) == 4


def test_zero_tiles(tmp_path: Path) -> None:
    # Scenes too small to keep: no tile is ever cut.
    recipe = small_corpus(tmp_path / "c", benchmark=False, extra={"exclude": {"min_side": 200}})
    out = curate(recipe, tmp_path / "out")
    page, result = render_page(out, ReportConfig())
    assert json.loads((out / "stats.json").read_text())["tiles"]["total"] == 0
    assert "no tiles were cut" in section(page, "sizes") and "no tiles were cut" in section(page, "nodata")
    assert "no tile was kept" in section(page, "samples")
    table = _Page(page).tables["excluded-table"]
    assert sorted(r[3] for r in table[1:]) == ["too_small", "too_small"]


# --- real imagery -------------------------------------------------------------------------------------


@pytest.mark.realdata
def test_real_imagery_report(real_data: Path, tmp_path: Path) -> None:
    """GeoTIFFs (16-bit, tiled, huge and tiny), JPEGs with near-duplicates, and a benchmark whose
    pixel-identical GeoTIFF twin is in the source (see tests/test_real_data.py)."""
    from rscurate.recipe import recipe_from_dict

    recipe = recipe_from_dict(
        {
            "name": "rs-real-report",
            "sources": [
                {
                    "name": "aerial",
                    "root": str(real_data),
                    "patterns": ["rasterio/*.tif", "RSPrompter/*.jpg", "DeepForest/*.tif"],
                }
            ],
            "benchmarks": [
                {"name": "neon", "root": str(real_data / "DeepForest"), "patterns": ["OSBS_029.png"]}
            ],
            "slice": {"tile_size": 512, "max_side": 1024},
        },
        where="report real-data recipe",
    )
    out = tmp_path / "out"
    pipeline.run(recipe, out, workers=1)
    page, result = render_page(out, ReportConfig(samples=24))
    tiles = pd.read_parquet(out / "tiles.parquet")
    assert result.samples == min(24, int((tiles["status"] == "kept").sum())) and not result.notes
    assert (
        result.duplicate_clusters == tiles.loc[tiles["status"] == "duplicate", "duplicate_of"].nunique() > 0
    )
    bench = section(page, "benchmarks")
    assert "DeepForest/OSBS_029.tif" in bench and "DeepForest/OSBS_029.png" in bench
    assert "pixels not available" not in page
    spreads = [float(np.asarray(im.convert("L"), float).std()) for im in thumbs(section(page, "samples"))]
    assert len(spreads) == result.samples and min(spreads) > 1  # real pixels, not black squares


# --- command line -------------------------------------------------------------------------------------


def test_cli_default_path_summary_json_quiet_and_errors(mini_curated: Path, tmp_path: Path) -> None:
    out = tmp_path / "out [bold]x"  # brackets: the summary must not be read as rich markup
    shutil.copytree(mini_curated, out)
    runner = CliRunner()
    result = runner.invoke(app, ["report", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    line = result.output.strip()
    assert len(line.splitlines()) == 1 and str(out / "report.html") in line.replace("\n", "")
    assert re.search(r"\(\d+ kB\)", line) and (out / "report.html").stat().st_size > 10_000

    result = runner.invoke(app, ["report", str(out), "--html", str(tmp_path / "r.html"), "--json"])
    data = json.loads(result.output)
    assert data["path"] == str(tmp_path / "r.html") and data["bytes"] == (tmp_path / "r.html").stat().st_size
    assert data["samples"] == MINI_EXPECTED["kept"] and data["duplicate_clusters"] == 1

    result = runner.invoke(app, ["report", str(out), "--html", str(tmp_path / "q.html"), "--quiet"])
    assert result.exit_code == 0 and result.output == "" and (tmp_path / "q.html").exists()

    result = runner.invoke(app, ["report", str(tmp_path / "nothing")])
    assert result.exit_code == 2 and "stats.json not found" in result.output
    result = runner.invoke(app, ["report", "s3://bucket/curated"])
    assert result.exit_code == 2 and "reads a local folder" in result.output
    result = runner.invoke(app, ["report", str(out), "--samples", "-1"])
    assert result.exit_code == 2 and "samples must be 0 or more" in result.output


# --- in a browser -------------------------------------------------------------------------------------


def test_missing_chromium_without_root_skips_with_the_install_line(monkeypatch: pytest.MonkeyPatch) -> None:
    import _browser

    monkeypatch.setattr(_browser, "CHROMIUM", "/nonexistent/chromium")
    monkeypatch.setattr(_browser.os, "geteuid", lambda: 1000)
    with pytest.raises(
        pytest.skip.Exception,
        match="not root; install it with `sudo sh -c 'apt-get update && apt-get install -y chromium'`",
    ):
        _browser.ensure_chromium()


@pytest.mark.slow
def test_browser_check_can_fail(tmp_path: Path) -> None:
    """The checks below must be able to fail: a script error, console.error, a blocked external image
    and a blank page are each detected."""
    bad = tmp_path / "bad.html"
    bad.write_text(
        '<!DOCTYPE html><html><head><meta http-equiv="Content-Security-Policy" content="default-src \'none\'; '
        "img-src data:; script-src 'unsafe-inline'\"></head><body><h1>x</h1>"
        '<script>console.error("deliberate"); notDefinedAnywhere();</script>'
        '<img src="https://example.invalid/a.png"></body></html>'
    )
    rendered = render(bad, tmp_path / "bad.png", 800, 600)
    console = "\n".join(rendered.console)
    assert "notDefinedAnywhere is not defined" in console
    assert "deliberate" in console and "example.invalid/a.png" in console
    blank = tmp_path / "blank.html"
    blank.write_text("<!DOCTYPE html><html><body style='background:#fff'></body></html>")
    rendered = render(blank, tmp_path / "blank.png", 800, 600)
    std, colours = image_spread(rendered.screenshot)
    assert rendered.console == [] and std < 1 and colours <= 2


@pytest.mark.slow
def test_report_renders_in_chromium_without_console_errors(hostile: dict, tmp_path: Path) -> None:
    rendered = render(hostile["path"], tmp_path / "report.png", 1200, 3000)
    assert rendered.console == [], rendered.console
    std, colours = image_spread(rendered.screenshot)
    assert std > 20 and colours > 2000, (std, colours)

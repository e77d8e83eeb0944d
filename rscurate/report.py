"""`rscurate report`: one self-contained HTML page that shows what a finished curation decided.

The page opens offline and alone: images are base64 data URIs, the CSS is inline, there is no script,
and a Content-Security-Policy (`img-src data:`) makes a browser refuse, and report on its console,
anything that would load from elsewhere. Every string that comes from the data (file names, reasons,
source names, the recipe) goes through `html.escape`. Nothing depends on the date or the clock: the
same OUT gives the same bytes.

What it shows: counts per source, per pass and per reason (tables and bar charts), the distributions of
tile size and nodata fraction, a seeded mosaic of kept samples read from the shards, near-duplicate
clusters (the kept tile next to the dropped ones, with their Hamming distance), benchmark near-matches
(the excluded scene or tile next to the benchmark image it matched), the inputs that were not used,
and the recipe.

A tile that is not in any shard (a dropped duplicate, a benchmark match) is shown from its staged bytes
under OUT/_work/slice when they are still there, else by re-reading its source scene and cropping the
tile's window; if neither works the page says so instead of showing it.
"""

from __future__ import annotations

import base64
import html
import io
import logging
import math
import os
import tarfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import yaml
from PIL import Image

from . import pipeline

log = logging.getLogger(__name__)

REPORT_FILE = "report.html"
# The only things the page may load are its own data-URI images and its inline style.
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
STATUS_COLOURS = {
    "ok": "#3a7d5c",
    "kept": "#3a7d5c",
    "duplicate": "#d4952b",
    "excluded": "#b94a3f",
    "error": "#7a7f87",
}
PASS_COLOURS = ("#4c72b0", "#55a868", "#c44e52", "#8172b2", "#ccb974", "#64b5cd")
ACCENT = "#4c72b0"


@dataclass(frozen=True)
class ReportConfig:
    """How much the page shows. Defaults keep a report of any corpus around a megabyte."""

    samples: int = 48  # kept samples in the mosaic
    seed: int = 0  # which ones
    clusters: int = 12  # near-duplicate clusters shown (largest first)
    per_cluster: int = 4  # dropped tiles shown per cluster
    benchmark_matches: int = 12  # excluded images shown next to their benchmark
    excluded_rows: int = 100  # rows of the table of inputs that were not used
    thumb_side: int = 160  # longer side of a thumbnail, pixels
    jpeg_quality: int = 80

    def __post_init__(self) -> None:
        for name in ("samples", "clusters", "per_cluster", "benchmark_matches", "excluded_rows"):
            if getattr(self, name) < 0:
                raise pipeline.OutputError(f"report: {name} must be 0 or more, got {getattr(self, name)}")
        if self.thumb_side < 16:
            raise pipeline.OutputError(f"report: thumb_side must be at least 16, got {self.thumb_side}")


@dataclass
class ReportResult:
    path: Path
    bytes: int
    samples: int  # thumbnails in the mosaic
    duplicate_clusters: int  # clusters shown
    benchmark_matches: int  # pairs shown
    notes: list[str] = field(default_factory=list)  # what could not be shown, and why

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "bytes": self.bytes,
            "samples": self.samples,
            "duplicate_clusters": self.duplicate_clusters,
            "benchmark_matches": self.benchmark_matches,
            "notes": list(self.notes),
        }


def write_report(
    out: str | os.PathLike[str],
    html_path: str | os.PathLike[str] | None = None,
    cfg: ReportConfig | None = None,
) -> ReportResult:
    """Write the report of the finished run in OUT to `html_path` (default OUT/report.html), atomically."""
    out = _local(out)
    target = Path(html_path) if html_path is not None else out / REPORT_FILE
    if target.is_dir():
        raise pipeline.OutputError(
            f"{target} is a folder; give the page a file name, e.g. {target / REPORT_FILE}"
        )
    page, result = render(out, cfg or ReportConfig())
    data = page.encode("utf-8")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    result.path = target
    result.bytes = len(data)
    return result


def render(out: str | os.PathLike[str], cfg: ReportConfig | None = None) -> tuple[str, ReportResult]:
    """The page for OUT, as text, and what it shows (`path` and `bytes` are left for write_report)."""
    cfg = cfg or ReportConfig()
    run = _load(_local(out))
    pixels = _Pixels(run, cfg)
    result = ReportResult(Path(), 0, 0, 0, 0)
    stats, tiles = run.stats, run.tiles

    sections = [
        _section_summary(run),
        _section_sources(stats),
        _section_passes(stats),
        _section_reasons(stats, tiles),
        _section_sizes(tiles),
        _section_nodata(tiles, run.recipe),
        _section_mosaic(run, pixels, cfg, result),
        _section_duplicates(run, pixels, cfg, result),
        _section_benchmarks(run, pixels, cfg, result),
        _section_excluded(run, cfg),
        _section_recipe(run),
    ]
    result.notes.extend(pixels.notes)
    nav = "".join(f'<a href="#{sid}">{_e(title)}</a>' for sid, title, _ in sections)
    body = "\n".join(
        f'<section id="{sid}"><h2>{_e(title)}</h2>\n{content}</section>' for sid, title, content in sections
    )
    name = str(stats.get("recipe", "?"))
    page = _PAGE.format(
        csp=_e(CSP),
        title=_e(f"rscurate report: {name}"),
        css=_CSS,
        name=_e(name),
        subtitle=_e(
            f"recipe fingerprint {stats.get('fingerprint', '?')} · "
            f"{_n(len(stats.get('inputs', {}).get('by_source', {})), 'source')} · "
            f"{_n(int(stats.get('kept', 0)), 'sample')} in {_n(int(stats.get('shards', 0)), 'shard')}"
        ),
        nav=nav,
        body=body,
    )
    return page, result


# --- reading OUT --------------------------------------------------------------------------------------


@dataclass
class _Run:
    out: Path
    stats: dict[str, Any]
    inputs: pd.DataFrame
    tiles: pd.DataFrame
    recipe_text: str | None
    recipe: dict[str, Any]  # recipe.yaml as plain data ({} if missing or unreadable)


def _local(out: str | os.PathLike[str]) -> Path:
    if "://" in os.fspath(out):  # the page reads shards and part files at random: a local folder only
        raise pipeline.OutputError(
            f"report reads a local folder; copy or mount {os.fspath(out)} (e.g. with rclone) and report on that"
        )
    return Path(out)


def _load(out: Path) -> _Run:
    stats = pipeline.load_stats(out)  # OutputError naming the fix when the run is not finished
    tables = {}
    for name in ("inputs", "tiles"):
        path = out / f"{name}.parquet"
        if not path.is_file():
            raise pipeline.OutputError(f"{path} not found; finish the run into {out} first")
        tables[name] = pd.read_parquet(path)
    recipe_file = out / "recipe.yaml"
    recipe_text = recipe_file.read_text(encoding="utf-8") if recipe_file.is_file() else None
    try:
        recipe = yaml.safe_load(recipe_text) if recipe_text else {}
    except yaml.YAMLError:
        recipe = {}
    return _Run(
        out, stats, tables["inputs"], tables["tiles"], recipe_text, recipe if isinstance(recipe, dict) else {}
    )


def _col(df: pd.DataFrame, name: str) -> pd.Series:
    """A column, or all-missing if this table predates it."""
    if name in df.columns:
        return df[name]
    return pd.Series([None] * len(df), index=df.index, dtype=object)


def _present(value: Any) -> bool:
    if value is None or value is pd.NA:
        return False
    return not (isinstance(value, float) and math.isnan(value))


class _Pixels:
    """Thumbnails (data URIs) of tiles and whole images, wherever their pixels still are."""

    def __init__(self, run: _Run, cfg: ReportConfig) -> None:
        self.run = run
        self.cfg = cfg
        self.notes: list[str] = []
        sources = run.recipe.get("sources") or []
        self.bands = {
            str(s.get("name")): tuple(s["bands"]) if s.get("bands") else None
            for s in sources
            if isinstance(s, dict)
        }

    def thumb(self, image: Image.Image | np.ndarray) -> str:
        im = Image.fromarray(image) if isinstance(image, np.ndarray) else image
        im = im.convert("RGB")
        im.thumbnail((self.cfg.thumb_side, self.cfg.thumb_side), Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=self.cfg.jpeg_quality, optimize=False, progressive=False)
        return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")

    def _decode(self, data: bytes) -> str | None:
        try:
            with Image.open(io.BytesIO(data)) as im:
                im.load()
                return self.thumb(im)
        except Exception as exc:  # a bad blob is shown as missing, not a crash
            log.debug("cannot decode a stored tile: %s", exc)
            return None

    def from_shards(self, rows: pd.DataFrame) -> dict[str, str]:
        """key -> thumbnail of kept tiles, read from their tars (one pass over each tar needed)."""
        found: dict[str, str] = {}
        shards_dir = self.run.out / "shards"
        for name, group in rows.groupby(_col(rows, "shard"), sort=True):
            wanted = {str(k) for k in group["key"]}
            path = shards_dir / str(name)
            try:
                with tarfile.open(path, mode="r:") as tar:
                    # Headers only (tarfile seeks over the data), and no further than the last wanted key.
                    for member in tar:
                        key, _, ext = member.name.partition(".")
                        if key in wanted and ext in ("jpg", "png") and member.isreg():
                            fileobj = tar.extractfile(member)
                            uri = self._decode(fileobj.read()) if fileobj is not None else None
                            if uri is not None:
                                found[key] = uri
                            wanted.discard(key)
                            if not wanted:
                                break
            except (tarfile.TarError, OSError, EOFError) as exc:
                self.notes.append(f"shards/{name}: cannot read ({exc})")
        return found

    def staged(self, keys: Iterable[str]) -> dict[str, str]:
        """key -> thumbnail from the encoded bytes the slice pass staged under OUT/_work/slice.

        Reads each partition's key and data_offset/data_length columns, then exactly the bytes of the
        wanted tiles from its part-*.data.bin: a large corpus stages far too many tiles to scan for a few.
        """
        wanted = set(keys)
        slice_dir = self.run.out / "_work" / "slice"
        found: dict[str, str] = {}
        if not wanted or not slice_dir.is_dir():
            return found
        for part in sorted(slice_dir.glob("part-*.parquet")):
            if part.name.endswith(".scenes.parquet") or not wanted - set(found):
                continue
            data_file = part.with_name(part.name.removesuffix(".parquet") + ".data.bin")
            try:
                located = pq.read_table(part, columns=["key", "data_offset", "data_length"]).to_pydict()
                blobs = {}
                with open(data_file, "rb") as f:
                    for key, offset, length in zip(
                        located["key"], located["data_offset"], located["data_length"], strict=True
                    ):
                        if key in wanted and key not in found and offset is not None:
                            blobs[key] = os.pread(f.fileno(), length, offset)
            except Exception as exc:  # a damaged or older part: fall back to the source scenes
                log.debug("%s: %s", part, exc)
                continue
            for key, blob in blobs.items():
                uri = self._decode(blob)
                if uri is not None:
                    found[key] = uri
        return found

    def crop(self, row: Mapping[str, Any]) -> str | None:
        """The tile's window re-read from its source scene (what slicing saw, before encoding)."""
        from . import raster

        window = (int(row["x"]), int(row["y"]), int(row["width"]), int(row["height"]))
        try:
            with raster.open_path(str(row["path"]), self.bands.get(str(row["source"]))) as reader:
                rgb, _ = reader.read_rgb(window)  # (h, w, 3) uint8
                return self.thumb(np.ascontiguousarray(rgb))
        except Exception as exc:  # missing, moved or unreadable: the page says so
            log.debug("cannot re-read %s: %s", row.get("path"), exc)
            return None

    def whole(self, path: str, source: str | None = None) -> str | None:
        """A whole image (a scene or a benchmark image), reduced while reading so huge ones stay cheap."""
        from . import raster

        try:
            rgb, _ = raster.read_rgb_whole(
                path, self.bands.get(source or ""), max_side=2 * self.cfg.thumb_side
            )
            return self.thumb(np.ascontiguousarray(rgb))
        except Exception as exc:
            log.debug("cannot read %s: %s", path, exc)
            return None

    def benchmark(self, r: Mapping[str, Any]) -> str | None:
        """The benchmark image a row matched, as it matched: flipped or rotated into the variant, or the
        sub-window a tile is a crop of."""
        from . import decontam, raster

        if not _present(r.get("benchmark_match")):
            return None
        variant = str(r["benchmark_variant"]) if _present(r.get("benchmark_variant")) else "identity"
        window = r.get("benchmark_window") if r.get("benchmark_mechanism") == "crop" else None
        try:
            # Crop windows are in the pixels of the image as hashed (at most BENCHMARK_MAX_SIDE).
            side = decontam.BENCHMARK_MAX_SIDE if _present(window) else 2 * self.cfg.thumb_side
            rgb, _ = raster.read_rgb_whole(str(r["benchmark_match"]), max_side=side)
            if _present(window):
                x, y, w, h = (int(v) for v in str(window).split(","))
                rgb = rgb[y : y + h, x : x + w]
            return self.thumb(np.ascontiguousarray(decontam.oriented(rgb, variant)))
        except Exception as exc:
            log.debug("cannot read %s: %s", r.get("benchmark_match"), exc)
            return None

    def tiles(self, rows: pd.DataFrame) -> tuple[dict[str, str], dict[str, str]]:
        """Thumbnails of tiles, and where each came from (shard, staged bytes, source scene)."""
        found: dict[str, str] = {}
        origin: dict[str, str] = {}
        in_shard = rows[(rows["status"] == "kept") & _col(rows, "shard").notna()]
        for key, uri in self.from_shards(in_shard).items():
            found[key], origin[key] = uri, "shard"
        rest = [str(k) for k in rows["key"] if k not in found]
        for key, uri in self.staged(rest).items():
            found[key], origin[key] = uri, "staged"
        for r in rows[~rows["key"].isin(found)].to_dict("records"):
            cropped = self.crop(r)
            if cropped is not None:
                found[str(r["key"])], origin[str(r["key"])] = cropped, "source"
        return found, origin


# --- charts -------------------------------------------------------------------------------------------


def _mpl_text(s: Any) -> str:
    """Text for a matplotlib label: '$' would start mathtext."""
    return str(s).replace("$", r"\$")


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)  # no pyplot: no global backend state, nothing to close
    return fig


def _chart(fig: Any, alt: str) -> str:
    buf = io.BytesIO()
    # No Software/date chunks: the same data gives the same bytes.
    fig.savefig(buf, format="png", dpi=144, metadata={"Software": None}, bbox_inches="tight", pad_inches=0.08)
    png = buf.getvalue()
    uri = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
    width, height = Image.open(io.BytesIO(png)).size  # drawn at 1.44x, shown at 1x: sharp on HiDPI too
    return (
        f'<img class="chart" width="{round(width / 1.44)}" height="{round(height / 1.44)}" '
        f'alt="{_e(alt)}" src="{uri}">'
    )


def _style_axes(ax: Any, counts_on: str = "x") -> None:
    from matplotlib.ticker import MaxNLocator

    # Counts are whole numbers: no 0.25-file ticks on small corpora.
    (ax.xaxis if counts_on == "x" else ax.yaxis).set_major_locator(MaxNLocator(integer=True))
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    ax.spines["left"].set_color("#9aa0a6")
    ax.spines["bottom"].set_color("#9aa0a6")
    ax.tick_params(colors="#3c4043", labelsize=8.5)
    ax.grid(axis="x", color="#e3e6ea", linewidth=0.8)
    ax.set_axisbelow(True)


def _rc() -> Any:
    import matplotlib

    return matplotlib.rc_context({"font.size": 9, "font.family": "DejaVu Sans", "axes.titlesize": 10})


def _stacked_bars(labels: Sequence[str], series: Mapping[str, Sequence[int]], title: str, xlabel: str) -> str:
    """Horizontal bars, one per label, stacked by series (coloured by status name)."""
    with _rc():
        fig = _figure(7.2, 0.9 + 0.32 * len(labels))
        ax = fig.add_subplot()
        y = np.arange(len(labels))
        left = np.zeros(len(labels))
        for i, (name, values) in enumerate(series.items()):
            v = np.asarray(values, dtype=float)
            colour = STATUS_COLOURS.get(name, PASS_COLOURS[i % len(PASS_COLOURS)])
            bars = ax.barh(y, v, left=left, color=colour, label=_mpl_text(name), height=0.62)
            left += v
            if len(series) == 1:
                ax.bar_label(bars, labels=[f"{int(n):,}" for n in v], padding=3, fontsize=8)
        totals = left
        if len(series) > 1:
            for yi, t in zip(y, totals, strict=True):
                ax.text(t, yi, f" {int(t):,}", va="center", fontsize=8, color="#3c4043")
        ax.set_yticks(y, [_mpl_text(s) for s in labels])
        ax.invert_yaxis()
        ax.set_xlim(0, max(1.0, float(totals.max(initial=0)) * 1.12))
        ax.set_xlabel(xlabel)
        ax.set_title(_mpl_text(title), loc="left")
        _style_axes(ax)
        if len(series) > 1:
            ax.legend(ncols=len(series), loc="lower right", bbox_to_anchor=(1, 1), frameon=False, fontsize=8)
        return _chart(fig, title)


def _bars_by_group(rows: Sequence[tuple[str, str, int]], title: str) -> str:
    """Horizontal bars (group, label, count), one colour per group."""
    groups = list(dict.fromkeys(g for g, _, _ in rows))
    colour = {g: PASS_COLOURS[i % len(PASS_COLOURS)] for i, g in enumerate(groups)}
    with _rc():
        fig = _figure(6.4, 0.9 + 0.28 * len(rows))
        ax = fig.add_subplot()
        y = np.arange(len(rows))
        counts = np.array([n for _, _, n in rows], dtype=float)
        bars = ax.barh(y, counts, color=[colour[g] for g, _, _ in rows], height=0.62)
        ax.bar_label(bars, labels=[f"{int(n):,}" for n in counts], padding=3, fontsize=8)
        ax.set_yticks(y, [_mpl_text(f"{g} · {label}") for g, label, _ in rows])
        ax.invert_yaxis()
        ax.set_xlim(0, max(1.0, float(counts.max(initial=0)) * 1.15))
        ax.set_xlabel("count")
        ax.set_title(_mpl_text(title), loc="left")
        _style_axes(ax)
        return _chart(fig, title)


def _hist_by_status(
    values: pd.Series, status: pd.Series, bins: np.ndarray, title: str, xlabel: str, mark: float | None = None
) -> str:
    with _rc():
        fig = _figure(7.2, 2.8)
        ax = fig.add_subplot()
        stacks = [values[status == s].to_numpy(dtype=float) for s in pipeline.TILE_STATUSES]
        present = [(s, v) for s, v in zip(pipeline.TILE_STATUSES, stacks, strict=True) if len(v)]
        ax.hist(
            [v for _, v in present],
            bins=bins,
            stacked=True,
            color=[STATUS_COLOURS[s] for s, _ in present],
            label=[s for s, _ in present],
        )
        if mark is not None:
            ax.axvline(mark, color="#3c4043", linestyle="--", linewidth=1)
            ax.annotate(
                f"limit {mark:g}",
                (mark, 1),
                xycoords=("data", "axes fraction"),
                xytext=(4, -10),
                textcoords="offset points",
                fontsize=8,
                color="#3c4043",
            )
        ax.set_xlabel(xlabel)
        ax.set_ylabel("tiles")
        ax.set_title(_mpl_text(title), loc="left")
        _style_axes(ax, counts_on="y")
        counts, _ = np.histogram(values.to_numpy(dtype=float), bins=bins)
        if counts.max(initial=0) > 20 * max(1, counts[counts > 0].min(initial=1)):
            from matplotlib.ticker import FuncFormatter

            ax.set_yscale("log")  # one tall bar (no nodata, one tile size) would flatten the rest
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.set_ylabel("tiles (log scale)")
        ax.grid(axis="y", color="#e3e6ea", linewidth=0.8)
        ax.grid(axis="x", visible=False)
        ax.legend(frameon=False, fontsize=8)
        return _chart(fig, title)


# --- HTML pieces --------------------------------------------------------------------------------------


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _note(text: str) -> str:
    return f'<p class="note">{_e(text)}</p>'


def _table(table_id: str, header: Sequence[str], rows: Iterable[Sequence[Any]], numeric_from: int = 1) -> str:
    """A table whose cells are escaped; columns from `numeric_from` on are right-aligned counts."""

    def cell(i: int, v: Any, tag: str) -> str:
        cls = ' class="num"' if i >= numeric_from else ""
        text = f"{v:,}" if isinstance(v, (int, np.integer)) and not isinstance(v, bool) else str(v)
        return f"<{tag}{cls}>{_e(text)}</{tag}>"

    head = "".join(cell(i, h, "th") for i, h in enumerate(header))
    body = "".join("<tr>" + "".join(cell(i, v, "td") for i, v in enumerate(r)) + "</tr>" for r in rows)
    return f'<table id="{_e(table_id)}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _n(count: int, word: str, plural: str | None = None) -> str:
    """'1 tile', '3 tiles'."""
    return f"{count:,} {word if count == 1 else plural or word + 's'}"


def _pair(left: str, right: str) -> str:
    """A table (and its notes) beside a chart; stacked on narrow screens."""
    return f'<div class="pair"><div>{left}</div>{right}</div>'


def _tile_caption(r: Mapping[str, Any]) -> list[str]:
    """Caption lines of a tile: source, file (relative to its source root), window."""
    rel = r.get("relpath") if _present(r.get("relpath")) else Path(str(r.get("path", ""))).name
    window = f"x {int(r['x'])}, y {int(r['y'])} · {int(r['width'])}×{int(r['height'])}"
    return [str(r.get("source")), str(rel), window]


def _short_path(path: str, parts: int = 2) -> str:
    """The last folders of an absolute path (the whole one goes in the tooltip)."""
    p = Path(path)
    return str(Path(*p.parts[-parts:])) if len(p.parts) > parts else path


def _figure_html(
    uri: str | None, caption: Sequence[str], label: str = "", kind: str = "", title: str = ""
) -> str:
    cls = f"thumb {kind}".strip()
    text = " · ".join(caption)
    img = (
        f'<img alt="{_e(text)}" src="{uri}">'
        if uri is not None
        else '<div class="missing">pixels not available</div>'
    )
    badge = f'<div><span class="badge {kind}">{_e(label)}</span></div>' if label else ""
    lines = "".join(f"<span>{_e(line)}</span>" for line in caption)
    tip = f' title="{_e(title or text)}"'
    return f'<figure class="{cls}"{tip}>{img}<figcaption>{badge}{lines}</figcaption></figure>'


# --- sections -----------------------------------------------------------------------------------------

Section = tuple[str, str, str]  # (id, title, html)


def _section_summary(run: _Run) -> Section:
    s = run.stats
    tiles = s.get("tiles", {}).get("by_status", {})
    inputs = s.get("inputs", {})
    cards = [
        ("input files", inputs.get("total", 0), f"{inputs.get('by_status', {}).get('ok', 0):,} used"),
        ("candidate tiles", s.get("tiles", {}).get("total", 0), "cut from the used inputs"),
        ("kept samples", s.get("kept", 0), f"in {s.get('shards', 0):,} shards"),
        ("near-duplicates", tiles.get("duplicate", 0), "tiles dropped by dedup"),
        ("excluded tiles", tiles.get("excluded", 0), "nodata, blank or benchmark"),
    ]
    html_cards = "".join(
        f'<div class="card"><div class="value">{int(v):,}</div><div class="label">{_e(label)}</div>'
        f'<div class="sub">{_e(sub)}</div></div>'
        for label, v, sub in cards
    )
    return "summary", "Summary", f'<div class="cards">{html_cards}</div>'


def _section_sources(stats: Mapping[str, Any]) -> Section:
    parts = []
    for name, statuses in (("inputs", pipeline.INPUT_STATUSES), ("tiles", pipeline.TILE_STATUSES)):
        part = stats.get(name, {})
        by_source = part.get("by_source", {})
        rows: list[list[Any]] = [
            [src, int(c.get("total", 0)), *(int(c.get(st, 0)) for st in statuses)]
            for src, c in by_source.items()
        ]
        rows.append(
            [
                "all",
                int(part.get("total", 0)),
                *(int(part.get("by_status", {}).get(st, 0)) for st in statuses),
            ]
        )
        table = _table(f"{name}-by-source", ["source", "total", *statuses], rows)
        chart = (
            _stacked_bars(
                list(by_source),
                {st: [int(c.get(st, 0)) for c in by_source.values()] for st in statuses},
                f"{name.capitalize()} per source",
                "files" if name == "inputs" else "tiles",
            )
            if by_source
            else _note("no sources")
        )
        parts.append(f"<h3>{_e(name.capitalize())}</h3>{_pair(table, chart)}")
    return "sources", "Per source", "".join(parts)


def _flatten(prefix: str, value: Any) -> list[tuple[str, int]]:
    if isinstance(value, Mapping):
        out: list[tuple[str, int]] = []
        for k, v in value.items():
            out += _flatten(f"{prefix} {k}".strip(), v)
        return out
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return [(prefix, int(value))]
    return []


def _section_passes(stats: Mapping[str, Any]) -> Section:
    rows = [
        (p, what, n) for p in pipeline.PASSES for what, n in _flatten("", stats.get("passes", {}).get(p, {}))
    ]
    if not rows:
        return "passes", "Per pass", _note("stats.json records no per-pass counts")
    table = _table("passes-table", ["pass", "decided", "count"], rows, numeric_from=2)
    chart = _bars_by_group(rows, "What each pass decided")
    intro = _note(
        "What each pass recorded: scan lists files, exclude drops inputs by header, slice cuts tiles, "
        "hash removes benchmark near-matches, dedup drops near-duplicates, shard writes the kept ones."
    )
    return "passes", "Per pass", intro + _pair(table, chart)


def _section_reasons(stats: Mapping[str, Any], tiles: pd.DataFrame) -> Section:
    rows = [
        (name, reason, int(n))
        for name in ("inputs", "tiles")
        for reason, n in stats.get(name, {}).get("by_reason", {}).items()
    ]
    dup = int(stats.get("tiles", {}).get("by_status", {}).get("duplicate", 0))
    table = _table("reasons-table", ["table", "reason", "count"], rows, numeric_from=2) if rows else ""
    chart_rows = rows + ([("tiles", "duplicate (dedup)", dup)] if dup else [])
    chart = _bars_by_group(chart_rows, "Why inputs and tiles were left out") if chart_rows else ""
    if not rows and not dup:
        return "reasons", "Per exclusion reason", _note("nothing was excluded: every input and tile was kept")
    extra = (
        _note(
            f"{_n(dup, 'tile')} dropped as near-duplicates (status duplicate, not a reason code); see below."
        )
        if dup
        else ""
    )
    if not rows:
        table = _note("no input or tile has an exclusion reason")
    return "reasons", "Per exclusion reason", _pair(table, chart) + extra


def _section_sizes(tiles: pd.DataFrame) -> Section:
    if not len(tiles):
        return "sizes", "Tile sizes", _note("no tiles were cut")
    label = tiles["width"].astype(int).astype(str) + "×" + tiles["height"].astype(int).astype(str)
    counts = (
        pd.DataFrame({"size": label, "status": tiles["status"], "pixels": tiles["width"] * tiles["height"]})
        .groupby("size")
        .agg(pixels=("pixels", "first"), n=("status", "size"))
        .sort_values(["n", "pixels"], ascending=[False, False])
    )
    by_status = pd.crosstab(label, tiles["status"])
    top = list(counts.index[:12])
    rows = [
        [s, int(counts.loc[s, "n"]), *(int(by_status.loc[s].get(st, 0)) for st in pipeline.TILE_STATUSES)]
        for s in top
    ]
    more = len(counts) - len(top)
    table = _table("sizes-table", ["width×height", "tiles", *pipeline.TILE_STATUSES], rows)
    if more > 0:
        rest = int(counts["n"].iloc[len(top) :].sum())
        table += _note(f"and {_n(more, 'other size')} ({_n(rest, 'tile')})")
    if len(counts) <= 12:
        chart = _stacked_bars(
            top,
            {st: [int(by_status.loc[s].get(st, 0)) for s in top] for st in pipeline.TILE_STATUSES},
            "Tiles per size (width×height)",
            "tiles",
        )
    else:  # many sizes (whole images of any shape): the longer side as a histogram
        side = np.maximum(tiles["width"], tiles["height"]).astype(float)
        bins = np.linspace(0, float(side.max()) * 1.02 + 1, 25)
        chart = _hist_by_status(side, tiles["status"], bins, "Longer side of each tile", "pixels")
    return "sizes", "Tile sizes", _pair(table, chart)


def _section_nodata(tiles: pd.DataFrame, recipe: Mapping[str, Any]) -> Section:
    if not len(tiles) or "nodata_fraction" not in tiles.columns:
        return "nodata", "Nodata fraction", _note("no tiles were cut")
    frac = tiles["nodata_fraction"].astype(float).fillna(0.0)
    limit = (recipe.get("exclude") or {}).get("max_nodata_fraction")
    mark = float(limit) if isinstance(limit, (int, float)) else None
    chart = _hist_by_status(
        frac, tiles["status"], np.linspace(0, 1, 21), "Nodata fraction of each tile", "nodata fraction", mark
    )
    with_nodata = int((frac > 0).sum())
    rows: list[list[Any]] = [
        ["tiles with no nodata", int((frac == 0).sum())],
        ["tiles with some nodata", with_nodata],
        ["mean nodata fraction", f"{frac.mean():.3f}"],
        ["largest nodata fraction", f"{frac.max():.3f}"],
    ]
    note = _note(
        "Tiles over the limit were dropped as nodata before hashing; declared nodata, alpha 0 and NaN count."
    )
    return (
        "nodata",
        "Nodata fraction",
        _pair(_table("nodata-table", ["", "value"], rows), chart) + note,
    )


def _section_mosaic(run: _Run, pixels: _Pixels, cfg: ReportConfig, result: ReportResult) -> Section:
    title = "Random kept samples"
    kept = (
        run.tiles[run.tiles["status"] == "kept"].sort_values("key", kind="stable")
        if len(run.tiles)
        else run.tiles
    )
    if not len(kept):
        return "samples", title, _note("no tile was kept, so the shards hold no samples")
    n = min(cfg.samples, len(kept))
    pick = np.random.default_rng(cfg.seed).choice(len(kept), size=n, replace=False)  # in draw order
    chosen = kept.iloc[pick]
    thumbs = pixels.from_shards(chosen[_col(chosen, "shard").notna()])
    figures = [
        _figure_html(thumbs.get(str(r["key"])), _tile_caption(r), title=f"{r['key']} in {r.get('shard')}")
        for r in chosen.to_dict("records")
    ]
    result.samples = sum(1 for r in chosen["key"] if str(r) in thumbs)
    missing = n - result.samples
    intro = _note(
        f"{n:,} of {len(kept):,} kept samples, drawn with seed {cfg.seed} and read back from the shards."
    )
    warn = _note(f"{missing:,} of them could not be read from their shard.") if missing else ""
    return "samples", title, f'{intro}{warn}<div class="mosaic">{"".join(figures)}</div>'


def _origin_note(origins: Mapping[str, str], missing: int, what: str) -> str:
    counts = pd.Series(list(origins.values()), dtype=object).value_counts().to_dict() if origins else {}
    parts = []
    if counts.get("staged"):
        parts.append(f"{counts['staged']:,} from the staged bytes under _work/slice")
    if counts.get("source"):
        parts.append(f"{counts['source']:,} re-read and cropped from their source scene")
    text = f"{what} are in no shard; shown: " + ", ".join(parts) + "." if parts else ""
    if missing:
        text += (
            f" {missing:,} could not be shown: OUT/_work no longer holds their bytes and the source scene "
            "cannot be read (moved or deleted)."
        )
    return _note(text.strip()) if text else ""


def _section_duplicates(run: _Run, pixels: _Pixels, cfg: ReportConfig, result: ReportResult) -> Section:
    title = "Near-duplicate clusters"
    tiles = run.tiles
    dups = tiles[tiles["status"] == "duplicate"] if len(tiles) else tiles
    if not len(dups):
        return "duplicates", title, _note("no near-duplicates: dedup kept every tile it saw")
    by_key = tiles.set_index("key", drop=False)
    dups = dups.assign(_d=pd.to_numeric(_col(dups, "duplicate_distance"), errors="coerce"))
    sizes = dups.groupby("duplicate_of").size().rename("n").reset_index()
    sizes = sizes.sort_values(["n", "duplicate_of"], ascending=[False, True], kind="stable")
    shown = sizes.iloc[: cfg.clusters]
    members = []
    for kept_key in shown["duplicate_of"]:
        group = dups[dups["duplicate_of"] == kept_key].sort_values(["_d", "key"], kind="stable")
        members.append((str(kept_key), group.iloc[: cfg.per_cluster], len(group)))
    keys = [k for k, _, _ in members if k in by_key.index] + [k for _, g, _ in members for k in g["key"]]
    thumbs, origin = pixels.tiles(by_key.loc[keys].drop_duplicates("key") if keys else tiles.iloc[:0])
    rows = []
    for kept_key, group, total in members:
        if kept_key in by_key.index:
            kept_fig = _figure_html(
                thumbs.get(kept_key), _tile_caption(by_key.loc[kept_key]), "kept", "kept", kept_key
            )
        else:
            kept_fig = _figure_html(None, [kept_key, "(not in tiles.parquet)"], "kept", "kept")
        dropped = "".join(
            _figure_html(
                thumbs.get(str(r["key"])),
                _tile_caption(r),
                f"dropped · distance {int(r['_d'])}" if _present(r["_d"]) else "dropped",
                "dropped",
                str(r["key"]),
            )
            for r in group.to_dict("records")
        )
        more = f'<div class="more">+{total - len(group):,} more</div>' if total > len(group) else ""
        rows.append(f'<div class="cluster">{kept_fig}<div class="arrow">≈</div>{dropped}{more}</div>')
    result.duplicate_clusters = len(members)
    dropped_keys = [str(k) for _, g, _ in members for k in g["key"]]
    missing = sum(1 for k in dropped_keys if k not in thumbs)
    intro = _note(
        f"{_n(len(dups), 'tile')} in {_n(len(sizes), 'cluster')} dropped as near-duplicates, each shown with "
        "the pHash Hamming distance to the tile its cluster kept"
        + (f"; the {len(members):,} largest clusters:" if len(members) < len(sizes) else ":")
    )
    origins = {k: origin[k] for k in dropped_keys if k in origin}
    if missing:
        result.notes.append(
            f"{_n(missing, 'dropped duplicate tile')} shown without pixels (no staged bytes, no source)"
        )
    body = f'<div class="pairs">{"".join(rows)}</div>'
    return "duplicates", title, intro + body + _origin_note(origins, missing, "Dropped tiles")


def _benchmark_table(out: Path) -> pd.DataFrame | None:
    path = out / "_work" / "exclude.benchmarks.parquet"
    if not path.is_file():
        return None
    bench = pd.read_parquet(path)
    return bench[(bench["status"] == "ok") & bench["phash"].notna()].reset_index(drop=True)


def _benchmark_counts(run: _Run) -> dict[str, Any]:
    """stats.json's per-benchmark, per-mechanism counts (computed again for a run that predates them)."""
    from . import decontam

    counts = run.stats.get("benchmarks")
    if isinstance(counts, dict) and "by_benchmark" in counts:
        return counts
    return decontam.summary(run.inputs, run.tiles)


def _mechanism_table(counts: Mapping[str, Any]) -> str:
    """One row per benchmark: tiles (and scenes) each mechanism removed."""
    from . import decontam

    by_benchmark = counts.get("by_benchmark", {})
    mechanisms = [m for m in decontam.MECHANISMS[1:] if any(m in e for e in by_benchmark.values())]
    rows = []
    for name, entry in by_benchmark.items():
        cells = [
            f"{entry[m]['tiles']:,} ({_n(entry[m]['scenes'], 'scene')})" if m in entry else ""
            for m in mechanisms
        ]
        total = sum(entry[m]["tiles"] for m in mechanisms if m in entry)
        rows.append([name or "(unnamed)", *cells, total])
    return _table("benchmark-table", ["benchmark", *mechanisms, "tiles"], rows)


def _match_caption(r: Mapping[str, Any]) -> tuple[list[str], str]:
    """Caption lines of the benchmark side of a pair, and the pair's label (mechanism and distance)."""
    mechanism = str(r["benchmark_mechanism"]) if _present(r.get("benchmark_mechanism")) else "tile"
    variant = str(r["benchmark_variant"]) if _present(r.get("benchmark_variant")) else "identity"
    window = str(r["benchmark_window"]) if _present(r.get("benchmark_window")) else None
    lines = [_short_path(str(r["benchmark_match"]))] if _present(r.get("benchmark_match")) else []
    if not lines:
        lines = ["benchmark image not recorded"]
    if mechanism == "crop" and window:
        lines.append("its crop x,y,w,h " + window)
    elif mechanism == "window" and window:
        lines.append(f"found in the scene at x,y,w,h {window}")
    if variant != "identity":
        lines.append(f"as {variant}")
    return lines, f"{mechanism} · distance {int(r['benchmark_distance'])}"


def _section_benchmarks(run: _Run, pixels: _Pixels, cfg: ReportConfig, result: ReportResult) -> Section:
    title = "Benchmark near-matches"
    inputs, tiles = run.inputs, run.tiles
    scenes = inputs[(_col(inputs, "reason") == "benchmark") & _col(inputs, "benchmark_match").notna()]
    listed = (
        inputs[
            (inputs["reason"].map(pipeline.reason_code) == "benchmark")
            & _col(inputs, "benchmark_match").isna()
        ]
        if len(inputs)
        else inputs
    )
    per_tile = (
        tiles[
            (_col(tiles, "reason") == "benchmark")
            & _col(tiles, "benchmark_distance").notna()
            & ~tiles["path"].isin(set(scenes["path"]))
        ]
        if len(tiles)
        else tiles
    )
    notes = []
    if len(listed):
        notes.append(
            _note(
                f"{_n(len(listed), 'input')} excluded because a source lists them in a benchmark test split "
                "(exclude_paths / manifests); they are in the table of unused inputs below."
            )
        )
    if not len(scenes) and not len(per_tile):
        body = _note("no scene or tile was excluded as a near-match of a benchmark image")
        return "benchmarks", title, body + "".join(notes)

    if len(per_tile) and "benchmark_match" not in tiles.columns:
        per_tile = _refind_matches(run, per_tile, notes)

    # (left caption, left uri, right caption, right uri, label)
    pairs: list[tuple[list[str], str | None, list[str], str | None, str]] = []
    shown_scenes = scenes.sort_values(["benchmark_distance", "source", "relpath"], kind="stable").iloc[
        : cfg.benchmark_matches
    ]
    for r in shown_scenes.to_dict("records"):
        right, label = _match_caption(r)
        pairs.append(
            (
                [str(r["source"]), _relpath(r), "whole scene"],
                pixels.whole(str(r["path"]), str(r["source"])),
                right,
                pixels.benchmark(r),
                label,
            )
        )
    room = max(0, cfg.benchmark_matches - len(pairs))
    # Closest first, one mechanism after another so that every kind of match is seen.
    ranked = per_tile.assign(
        _rank=per_tile.groupby(_col(per_tile, "benchmark_mechanism").fillna("tile"), sort=False).cumcount()
    )
    shown_tiles = ranked.sort_values(["_rank", "benchmark_distance", "key"], kind="stable").iloc[:room]
    thumbs, _ = pixels.tiles(shown_tiles)
    for r in shown_tiles.to_dict("records"):
        right, label = _match_caption(r)
        pairs.append((_tile_caption(r), thumbs.get(str(r["key"])), right, pixels.benchmark(r), label))
    result.benchmark_matches = len(pairs)
    html_pairs = "".join(
        '<div class="cluster">'
        + _figure_html(left, left_cap, f"excluded · {label}", "excluded")
        + '<div class="arrow">≈</div>'
        + _figure_html(right, right_cap, "benchmark", "benchmark")
        + "</div>"
        for left_cap, left, right_cap, right, label in pairs
    )
    total = len(scenes) + len(per_tile)
    intro = _note(
        "Excluded as near-matches of a held-out benchmark image: "
        f"{_n(len(scenes), 'whole scene')} and {_n(len(per_tile), 'further tile')}. Mechanisms: scene (the "
        "scene's thumbnail), tile (the tile as the image is, or slightly rotated), dihedral (a flip or "
        "90-degree rotation of it), crop (the tile is a re-crop of it), window (the image lies inside the "
        "tile's scene); beyond the no-check distance a match is confirmed on pixels. Tiles removed per "
        "benchmark and mechanism:"
    )
    shown = _note(f"{len(pairs):,} of {total:,} shown, each mechanism in turn, closest first.")
    unreadable = sum(1 for p in pairs if p[1] is None or p[3] is None)
    if unreadable:
        result.notes.append(
            f"{_n(unreadable, 'benchmark pair')} shown without an image (file missing or unreadable)"
        )
        notes.append(
            _note(
                f"{_n(unreadable, 'pair')} without an image: the file was moved, deleted or cannot be read."
            )
        )
    table = _mechanism_table(_benchmark_counts(run))
    return (
        "benchmarks",
        title,
        intro + table + shown + f'<div class="pairs">{html_pairs}</div>' + "".join(notes),
    )


def _refind_matches(run: _Run, per_tile: pd.DataFrame, notes: list[str]) -> pd.DataFrame:
    """Tiles of a run that predates `benchmark_match` on tiles: find each one's image again among the
    benchmark hashes in OUT/_work (nearest within its recorded distance)."""
    from . import dedup
    from . import hash as tilehash

    bench = _benchmark_table(run.out)
    if bench is None or not len(bench):
        notes.append(
            _note(
                "Which benchmark image each excluded tile matched is not recorded in the final tables and "
                "OUT/_work (which holds the benchmark hashes) is gone; the tiles are shown alone."
            )
        )
        return per_tile
    reach = int(pd.to_numeric(per_tile["benchmark_distance"]).max())
    match, _ = dedup.query(
        tilehash.from_hex_array(per_tile["phash"].to_numpy()),
        tilehash.from_hex_array(bench["phash"].to_numpy()),
        reach,
    )
    paths = bench["path"].to_numpy(object)
    return per_tile.assign(benchmark_match=[str(paths[m]) if m >= 0 else None for m in match])


def _relpath(r: Mapping[str, Any]) -> str:
    return str(r["relpath"]) if _present(r.get("relpath")) else str(r.get("path", ""))


def _section_excluded(run: _Run, cfg: ReportConfig) -> Section:
    title = "Inputs not used"
    inputs = run.inputs
    rejected = inputs[inputs["status"] != "ok"] if len(inputs) else inputs
    if not len(rejected):
        return "excluded", title, _note("every input file was used")
    rows = []
    for r in rejected.iloc[: cfg.excluded_rows].to_dict("records"):
        detail = ""
        if _present(r.get("duplicate_of_path")):
            detail = f"same bytes as {r['duplicate_of_path']}"
        elif _present(r.get("benchmark_match")):
            detail = f"near {r['benchmark_match']} (distance {int(r['benchmark_distance'])})"
        rows.append(
            [r["source"], _relpath(r), r["status"], r["reason"] if _present(r["reason"]) else "", detail]
        )
    table = _table("excluded-table", ["source", "file", "status", "reason", "detail"], rows, numeric_from=99)
    more = len(rejected) - len(rows)
    tail = _note(f"and {more:,} more; inputs.parquet lists every file with its reason.") if more > 0 else ""
    return "excluded", title, f'<div class="scroll">{table}</div>{tail}'


def _section_recipe(run: _Run) -> Section:
    if run.recipe_text is None:
        return "recipe", "Recipe", _note("OUT/recipe.yaml is missing")
    return (
        "recipe",
        "Recipe",
        f'<p class="note">OUT/recipe.yaml, as resolved by the run:</p><pre>{_e(run.recipe_text)}</pre>',
    )


# Colours shared with the charts; the rest of the style is fixed.
_CSS_ROOT = (
    ":root { --ink:#202124; --muted:#5f6368; --line:#e3e6ea; --bg:#f6f7f9; --card:#fff; "
    f"--accent:{ACCENT}; --kept:{STATUS_COLOURS['kept']}; --dup:{STATUS_COLOURS['duplicate']}; "
    f"--exc:{STATUS_COLOURS['excluded']}; }}"
)
_CSS = (
    _CSS_ROOT
    + """
* { box-sizing: border-box; }
body { margin:0; color: var(--ink); background: var(--bg);
  font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
header { background: #1f2a37; color: #fff; padding: 22px 32px 18px; }
header h1 { margin: 0; font-size: 22px; font-weight: 600; letter-spacing: .2px; }
header .sub { margin-top: 4px; color: #c5ccd6; font-size: 13px; }
nav { position: sticky; top: 0; z-index: 2; background: #fff; border-bottom: 1px solid var(--line);
  padding: 8px 32px; display: flex; flex-wrap: wrap; gap: 4px 18px; font-size: 13px; }
nav a { color: var(--accent); text-decoration: none; }
nav a:hover { text-decoration: underline; }
main { max-width: 1180px; margin: 0 auto; padding: 8px 24px 40px; }
section { background: var(--card); border: 1px solid var(--line); border-radius: 8px; padding: 16px 20px 18px;
  margin: 18px 0; }
h2 { margin: 0 0 10px; font-size: 17px; font-weight: 600; }
h3 { margin: 16px 0 6px; font-size: 14px; font-weight: 600; color: var(--muted); }
.note { color: var(--muted); margin: 6px 0 10px; }
.cards { display: grid; grid-template-columns: repeat(auto-fit, minmax(170px, 1fr)); gap: 12px; }
.card { border: 1px solid var(--line); border-radius: 6px; padding: 12px 14px; background: #fbfcfd; }
.card .value { font-size: 24px; font-weight: 600; }
.card .label { font-weight: 600; color: var(--ink); }
.card .sub { color: var(--muted); font-size: 12px; }
.pair { display: grid; grid-template-columns: minmax(0, max-content) minmax(0, 1fr); gap: 12px 28px;
  align-items: start; }
.pair > .note { grid-column: 1 / -1; }
@media (max-width: 900px) { .pair { grid-template-columns: minmax(0, 1fr); } }
img.chart { display: block; max-width: 100%; height: auto; }
table { border-collapse: collapse; font-size: 13px; }
th, td { padding: 4px 10px; border-bottom: 1px solid var(--line); text-align: left; vertical-align: top; }
th { background: #f1f3f5; font-weight: 600; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
tbody tr:last-child td { border-bottom: none; }
#inputs-by-source tr:last-child td, #tiles-by-source tr:last-child td { font-weight: 600;
  border-top: 2px solid var(--line); }
.scroll { max-height: 520px; overflow: auto; border: 1px solid var(--line); border-radius: 6px; }
.scroll table { width: 100%; }
.scroll td { overflow-wrap: break-word; }
.scroll td:nth-child(2), .scroll td:nth-child(5) { overflow-wrap: anywhere; }
.scroll td:nth-child(1), .scroll td:nth-child(3) { white-space: nowrap; }
.mosaic { display: grid; grid-template-columns: repeat(auto-fill, 166px); justify-content: space-between;
  gap: 12px; }
figure.thumb { margin: 0; width: 166px; }
figure.thumb img, figure.thumb .missing { display: block; width: 160px; height: 160px; object-fit: contain;
  background: #eceff2; border-radius: 4px; border: 3px solid transparent; }
figure.thumb .missing { display: flex; align-items: center; justify-content: center; color: var(--muted);
  font-size: 12px; text-align: center; border: 1px dashed #c3c8ce; }
figure.kept img { border-color: var(--kept); }
figure.dropped img { border-color: var(--dup); }
figure.excluded img { border-color: var(--exc); }
figure.benchmark img { border-color: #1f2a37; }
figcaption { font-size: 11px; line-height: 1.35; color: var(--muted); margin-top: 4px; }
figcaption > span { display: block; overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
figcaption > span:first-of-type { color: var(--ink); }
figcaption .badge { display: inline-block; font-size: 10.5px; font-weight: 600; color: #fff; border-radius: 3px;
  padding: 0 5px; margin-bottom: 2px; }
.badge.kept { background: var(--kept); }
.badge.dropped { background: var(--dup); }
.badge.excluded { background: var(--exc); }
.badge.benchmark { background: #1f2a37; }
.pairs { display: flex; flex-wrap: wrap; gap: 14px; }
.cluster { display: flex; flex-wrap: wrap; gap: 8px; align-items: flex-start; padding: 10px;
  border: 1px solid var(--line); border-radius: 6px; background: #fbfcfd; }
.cluster .arrow { align-self: center; font-size: 22px; color: var(--muted); margin-top: -48px; }
.cluster .more { align-self: center; color: var(--muted); }
pre { background: #f6f8fa; border: 1px solid var(--line); border-radius: 6px; padding: 12px 14px; overflow: auto;
  max-height: 640px; font: 12px/1.45 ui-monospace, SFMono-Regular, Menlo, Consolas, "DejaVu Sans Mono", monospace; }
footer { text-align: center; color: var(--muted); font-size: 12px; padding: 0 0 28px; }
"""
)

_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{csp}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="generator" content="rscurate report">
<title>{title}</title>
<style>{css}</style>
</head>
<body>
<header><h1>rscurate report: {name}</h1><div class="sub">{subtitle}</div></header>
<nav>{nav}</nav>
<main>
{body}
</main>
<footer>Written by <code>rscurate report</code> from stats.json, inputs.parquet, tiles.parquet, the shards
and recipe.yaml.</footer>
</body>
</html>
"""


def summary_line(result: ReportResult) -> str:
    """The CLI's one line: where the page is and how big."""
    size = result.bytes
    human = f"{size / 1e6:.1f} MB" if size >= 1e6 else f"{size / 1e3:.0f} kB"
    return (
        f"wrote {result.path} ({human}): {_n(result.samples, 'sample')}, "
        f"{_n(result.duplicate_clusters, 'duplicate cluster')}, "
        f"{_n(result.benchmark_matches, 'benchmark match', 'benchmark matches')}"
    )

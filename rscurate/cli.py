"""`rscurate`: the command line. Parses, loads the recipe, sets up logging once, calls the library, prints.

User errors (a bad recipe, an output folder made by another recipe, a full disk or an output folder this
user may not write, ...) exit with code 2 and one line; `--debug` shows the traceback. `verify` exits 1
when it finds problems.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.progress import BarColumn, ProgressColumn, Task, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.progress import Progress as RichProgressBar
from rich.table import Table
from rich.text import Text

from . import archive, fs, pipeline
from .recipe import RecipeError, load_recipe
from .sample import SampleFormatError
from .shard import ShardError

app = typer.Typer(
    name="rscurate",
    help="Curate remote-sensing datasets into WebDataset shards (scan, exclude, slice, hash, dedup, shard).",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
err_console = Console(stderr=True)
out_console = Console()
log = logging.getLogger("rscurate")


class _UsageError(Exception):
    """A command-line value the library refused."""


USER_ERRORS: tuple[type[BaseException], ...] = (
    RecipeError,
    pipeline.OutputError,
    pipeline.ExecutorError,
    fs.RemoteError,
    archive.ArchiveError,
    ShardError,
    SampleFormatError,
    _UsageError,
)

RecipeArg = Annotated[Path, typer.Argument(help="recipe YAML file", show_default=False)]
OutOpt = Annotated[
    str,
    typer.Option(
        "--out",
        "-o",
        help="output folder, or a URL such as s3://bucket/prefix (created; resumed if it exists)",
    ),
]
ExecutorOpt = Annotated[
    str,
    typer.Option(
        "--executor", help="local: a process pool on this machine; dask: a Dask cluster (see --scheduler)"
    ),
]
SchedulerOpt = Annotated[
    str | None,
    typer.Option(
        "--scheduler",
        help="address of a running Dask scheduler (tcp://HOST:8786) [default: a local Dask cluster]",
    ),
]
WorkOpt = Annotated[
    str | None,
    typer.Option(
        "--work",
        help="folder for the pass state when --out is a URL; on a filesystem every Dask worker mounts "
        "[default: a folder per URL under ~/.cache/rscurate]",
    ),
]
WorkersOpt = Annotated[
    int | None, typer.Option("--workers", "-w", help="worker processes [default: CPU count]")
]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="no progress bars, no summary; warnings only")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print the stats as JSON on stdout")]
DebugOpt = Annotated[bool, typer.Option("--debug", help="debug logging; tracebacks on errors")]
ForceOpt = Annotated[
    bool, typer.Option("--force", help="redo this pass even if it finished (and every later one)")
]
AllowMissingOpt = Annotated[
    bool,
    typer.Option(
        "--allow-missing",
        help="leave out sources whose root folder is missing (say which) instead of failing",
    ),
]


# --- plumbing -----------------------------------------------------------------------------------------


def _setup_logging(quiet: bool, debug: bool) -> None:
    level = logging.DEBUG if debug else logging.WARNING if quiet else logging.INFO
    handler = RichHandler(
        console=err_console, show_time=False, show_path=debug, markup=False, rich_tracebacks=debug
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    log.setLevel(level)


@contextmanager
def _user_errors(debug: bool) -> Iterator[None]:
    try:
        yield
    except USER_ERRORS as exc:
        if debug:
            raise
        # Escaped: a path or pattern in the message may look like rich markup ('[/data]', '[ab]').
        err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    except OSError as exc:
        message = pipeline.write_failure(exc)  # a full disk or a folder this user may not write
        if debug or message is None:
            raise
        err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        err_console.print("interrupted; run the same command again to resume", highlight=False)
        raise typer.Exit(130) from None


class _CountColumn(ProgressColumn):
    def render(self, task: Task) -> Text:
        unit = task.fields.get("unit", "")
        total = f"{task.total:,.0f}" if task.total is not None else "?"
        return Text(f"{task.completed:,.0f}/{total} {unit}", style="progress.download")


class _RateColumn(ProgressColumn):
    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        if speed is None:
            return Text("", style="progress.data.speed")
        return Text(f"{speed:,.1f} {task.fields.get('unit', '')}/s", style="progress.data.speed")


class RichProgress:
    """rscurate.progress.Progress drawn as one rich bar per pass, with rate and ETA."""

    def __init__(self, console: Console) -> None:
        self._bars = RichProgressBar(
            TextColumn("[bold]{task.description:<10}"),
            BarColumn(),
            _CountColumn(),
            _RateColumn(),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=console,
        )
        self._task: Any = None
        self._started = False

    def start(self, name: str, total: float, unit: str) -> None:
        if not self._started:
            self._bars.start()
            self._started = True
        self._complete()
        self._task = self._bars.add_task(name, total=total, unit=unit)

    def advance(self, amount: float = 1) -> None:
        if self._task is not None:
            self._bars.advance(self._task, amount)

    def _complete(self) -> None:
        if self._task is not None:
            total = self._bars.tasks[-1].total
            self._bars.update(self._task, completed=total)
            self._task = None

    def finish(self) -> None:
        self._complete()
        if self._started:
            self._bars.stop()
            self._started = False


# --- summaries ----------------------------------------------------------------------------------------


def _counts_table(title: str, part: Mapping[str, Any], statuses: tuple[str, ...]) -> Table:
    table = Table(title=title, title_justify="left", show_edge=False)
    table.add_column("source")
    for col in ("total", *statuses):
        table.add_column(col, justify="right")
    for source, counts in part.get("by_source", {}).items():
        table.add_row(source, *(f"{counts.get(c, 0):,}" for c in ("total", *statuses)))
    by_status = part.get("by_status", {})
    table.add_row(
        "[bold]all[/]",
        f"[bold]{part.get('total', 0):,}[/]",
        *(f"[bold]{by_status.get(s, 0):,}[/]" for s in statuses),
    )
    return table


def _reasons_table(stats: Mapping[str, Any]) -> Table:
    table = Table(title="Reasons", title_justify="left", show_edge=False)
    table.add_column("table")
    table.add_column("reason")
    table.add_column("count", justify="right")
    for name in ("inputs", "tiles"):
        for reason, n in stats.get(name, {}).get("by_reason", {}).items():
            table.add_row(name, reason, f"{n:,}")
    return table


def _benchmarks_table(stats: Mapping[str, Any]) -> Table | None:
    """Tiles (and scenes) each decontamination mechanism removed, per benchmark; None when none did."""
    from .decontam import MECHANISMS

    counts = stats.get("benchmarks", {})
    by_benchmark = counts.get("by_benchmark", {})
    if not by_benchmark and not counts.get("listed"):
        return None
    mechanisms = [m for m in MECHANISMS[1:] if any(m in e for e in by_benchmark.values())]
    table = Table(title="Benchmark matches", title_justify="left", show_edge=False)
    table.add_column("benchmark")
    for m in mechanisms:
        table.add_column(m, justify="right")
    for name, entry in by_benchmark.items():
        cells = [f"{entry[m]['tiles']:,} ({entry[m]['scenes']:,})" if m in entry else "" for m in mechanisms]
        table.add_row(escape(name), *cells)
    caption = "tiles (and scenes) each mechanism removed"
    if counts.get("listed"):
        caption += f"; {counts['listed']:,} inputs held out by the sources' test-split lists"
    table.caption, table.caption_justify = caption, "left"
    return table


def _passes_table(stats: Mapping[str, Any], reports: list[pipeline.PassReport] | None) -> Table:
    table = Table(title="Passes", title_justify="left", show_edge=False)
    table.add_column("pass")
    if reports is not None:
        table.add_column("this run")
        table.add_column("time", justify="right")
    table.add_column("decided")
    timing = {r.name: r for r in reports or []}
    names = [r.name for r in reports] if reports is not None else list(stats.get("passes", {}))
    for name in names:
        summary = stats.get("passes", {}).get(name, {})
        parts = []
        for key, value in summary.items():
            if isinstance(value, dict):
                parts.append(f"{key}: " + ", ".join(f"{k} {v:,}" for k, v in value.items()))
            else:
                parts.append(f"{key} {value:,}")
        decided = "; ".join(parts) or "-"
        if reports is not None:
            r = timing[name]
            ran = ("ran" + (f" ({r.detail})" if r.detail else "")) if r.ran else "reused"
            table.add_row(name, ran, f"{r.seconds:.1f} s" if r.ran else "", decided)
        else:
            table.add_row(name, decided)
    return table


def print_stats(
    console: Console,
    stats: Mapping[str, Any],
    *,
    reports: list[pipeline.PassReport] | None = None,
    seconds: float | None = None,
    out: Path | str | None = None,
    complete: bool = True,
) -> None:
    console.print(_counts_table("Inputs", stats["inputs"], pipeline.INPUT_STATUSES))
    console.print()
    console.print(_counts_table("Tiles", stats["tiles"], pipeline.TILE_STATUSES))
    console.print()
    if any(stats.get(t, {}).get("by_reason") for t in ("inputs", "tiles")):
        console.print(_reasons_table(stats))
        console.print()
    benchmarks = _benchmarks_table(stats)
    if benchmarks is not None:
        console.print(benchmarks)
        console.print()
    console.print(_passes_table(stats, reports))
    console.print()
    if complete:
        line = f"[bold]kept {stats.get('kept', 0):,}[/] samples in [bold]{stats.get('shards', 0):,}[/] shards"
        if out is not None and stats.get("shards"):
            line += f" under {escape(fs.join(str(out), 'shards'))}"
    else:
        kept = stats["tiles"]["by_status"].get("kept", 0)
        line = f"[bold]{kept:,}[/] tiles kept so far; no shards yet (`rscurate run` finishes the passes)"
    if seconds is not None:
        line += f"  ({seconds:.1f} s)"
    console.print(line, highlight=False)


# --- commands -----------------------------------------------------------------------------------------


def _curate(
    until: str,
    recipe_path: Path,
    out: str,
    *,
    workers: int | None,
    quiet: bool,
    as_json: bool,
    debug: bool,
    force: bool = False,
    allow_missing: bool = False,
    executor: str = "local",
    scheduler: str | None = None,
    work: str | None = None,
) -> None:
    _setup_logging(quiet, debug)
    with _user_errors(debug):
        recipe = load_recipe(recipe_path, allow_missing=allow_missing)
        for line in recipe.missing:
            log.warning("left out: %s", line)
        pipeline.check_output(recipe, out, work)
        if until != "shard":
            earlier = [p for p in pipeline.pending(out, until, work) if p != until]
            if earlier and not quiet:
                err_console.print(
                    f"running {', '.join(earlier)} first: {until} needs their outputs, which are missing",
                    highlight=False,
                )
        progress = None if quiet else RichProgress(err_console)
        # The local pool is the pipeline's own; a Dask executor connects on first use and is closed here.
        ex = None
        if executor != "local" or scheduler is not None:
            ex = pipeline.make_executor(workers, kind=executor, scheduler=scheduler)
        try:
            result = pipeline.run(
                recipe,
                out,
                until=until,
                workers=workers,
                force=force,
                progress=progress,
                executor=ex,
                work=work,
            )
        finally:
            if ex is not None:
                ex.close()
    if as_json:
        out_console.print_json(json.dumps(result.stats))
    elif not quiet:
        print_stats(
            out_console,
            result.stats,
            reports=result.passes,
            seconds=result.seconds,
            out=result.out,
            complete=until == "shard",
        )
        if result.passes and not any(r.ran for r in result.passes):
            out_console.print(
                f"nothing to do: every pass through {until} had finished in {result.out}",
                highlight=False,
                markup=False,
            )


@app.command()
def run(
    recipe: RecipeArg,
    out: OutOpt,
    workers: WorkersOpt = None,
    executor: ExecutorOpt = "local",
    scheduler: SchedulerOpt = None,
    work: WorkOpt = None,
    allow_missing: AllowMissingOpt = False,
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Run every pass, resuming from what OUT already holds."""
    _curate(
        "shard",
        recipe,
        out,
        workers=workers,
        quiet=quiet,
        as_json=as_json,
        debug=debug,
        allow_missing=allow_missing,
        executor=executor,
        scheduler=scheduler,
        work=work,
    )


def _pass_command(name: str, doc: str) -> None:
    def command(
        recipe: RecipeArg,
        out: OutOpt,
        workers: WorkersOpt = None,
        executor: ExecutorOpt = "local",
        scheduler: SchedulerOpt = None,
        work: WorkOpt = None,
        force: ForceOpt = False,
        allow_missing: AllowMissingOpt = False,
        quiet: QuietOpt = False,
        as_json: JsonOpt = False,
        debug: DebugOpt = False,
    ) -> None:
        _curate(
            name,
            recipe,
            out,
            workers=workers,
            quiet=quiet,
            as_json=as_json,
            debug=debug,
            force=force,
            allow_missing=allow_missing,
            executor=executor,
            scheduler=scheduler,
            work=work,
        )

    command.__doc__ = doc
    app.command(name)(command)


for _name, _doc in (
    ("scan", "Pass 1: list files under the source roots and read their headers."),
    (
        "exclude",
        "Pass 2: header-level exclusion (unreadable, too small, not optical, exact duplicates, benchmark lists).",
    ),
    ("slice", "Pass 3: cut scenes into tiles; drop nodata and blank tiles; hash and encode the rest."),
    (
        "hash",
        "Pass 4: benchmark decontamination: scenes and tiles near a benchmark image, its flips, rotations and "
        "crops, and tiles holding a benchmark image found inside their scene.",
    ),
    ("dedup", "Pass 5: near-duplicate clustering; keep one tile per cluster."),
    ("shard", "Pass 6: write the shuffled WebDataset shards and the final tables."),
):
    _pass_command(_name, _doc + " Earlier passes run first if their outputs are missing.")


@app.command()
def stats(
    out: Annotated[str, typer.Argument(help="output folder (or URL) of a finished run", show_default=False)],
    as_json: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Print the counts of a finished run: per pass, per reason, per source."""
    _setup_logging(False, debug)
    with _user_errors(debug):
        data = pipeline.load_stats(out)
    if as_json:
        out_console.print_json(json.dumps(data))
    else:
        print_stats(out_console, data, out=out)


@app.command()
def verify(
    out: Annotated[str, typer.Argument(help="output folder of a finished run", show_default=False)],
    workers: WorkersOpt = None,
    as_json: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Re-read every shard and check it against tiles.parquet; exit 1 on any mismatch."""
    from . import shard

    _setup_logging(False, debug)
    with _user_errors(debug):
        if fs.is_url(out):
            raise _UsageError(
                f"verify reads a local folder; copy or mount {out} (e.g. with s3fs-fuse or rclone) and verify that"
            )
        with pipeline.make_executor(workers) as executor:
            report = shard.verify(fs.local_path(out), mapper=executor.map)
    if as_json:
        out_console.print_json(
            json.dumps(
                {
                    "ok": report.ok,
                    "shards": report.shards,
                    "samples": report.samples,
                    "problems": report.problems,
                }
            )
        )
    elif report.ok:
        out_console.print(
            f"[bold green]ok[/]: {report.shards:,} shards, {report.samples:,} samples match tiles.parquet",
            highlight=False,
        )
    else:
        for problem in report.problems:
            # Escaped: member names come from the tar, which may be hostile ('[/x].jpg').
            out_console.print(f"[red]x[/] {escape(problem)}", highlight=False, soft_wrap=True)
        out_console.print(
            f"[bold red]{len(report.problems):,} problems[/] in {report.shards:,} shards", highlight=False
        )
    if not report.ok:
        raise typer.Exit(1)


@app.command()
def report(
    out: Annotated[str, typer.Argument(help="output folder of a finished run", show_default=False)],
    html: Annotated[
        Path | None, typer.Option("--html", help="where to write the page [default: OUT/report.html]")
    ] = None,
    samples: Annotated[int, typer.Option("--samples", help="kept samples in the mosaic")] = 48,
    seed: Annotated[int, typer.Option("--seed", help="seed of the mosaic's random draw")] = 0,
    quiet: QuietOpt = False,
    as_json: Annotated[bool, typer.Option("--json", help="print what was written as JSON on stdout")] = False,
    debug: DebugOpt = False,
) -> None:
    """Write a self-contained HTML page (counts, charts, samples, duplicates, benchmark matches, recipe)."""
    from . import report as report_module

    _setup_logging(quiet, debug)
    with _user_errors(debug):
        result = report_module.write_report(out, html, report_module.ReportConfig(samples=samples, seed=seed))
    for note in result.notes:
        log.warning("%s", note)
    if as_json:
        out_console.print_json(json.dumps(result.to_dict()))
    elif not quiet:
        # markup=False: a path may look like rich markup ('[/data]').
        out_console.print(report_module.summary_line(result), markup=False, highlight=False, soft_wrap=True)


@app.command()
def synth(
    out: Annotated[
        Path, typer.Argument(help="folder for the demo corpus and its recipe", show_default=False)
    ],
    chips: Annotated[int | None, typer.Option("--chips", help="number of small chips")] = None,
    large_side: Annotated[
        int | None, typer.Option("--large-side", help="side of the large scene, pixels")
    ] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="random seed")] = None,
    scenes: Annotated[
        bool,
        typer.Option(
            "--scenes/--no-scenes",
            help="also write a labelled land-cover set under OUT/scenes for `rspretrain probe`",
        ),
    ] = True,
    debug: DebugOpt = False,
) -> None:
    """Write the synthetic aerial-like demo corpus and its recipe, then print how to curate it."""
    from . import synth as synth_module

    _setup_logging(False, debug)
    chosen = {"n_chips": chips, "large_side": large_side, "seed": seed}
    kwargs: dict[str, Any] = {k: v for k, v in chosen.items() if v is not None}  # else synth's defaults
    with _user_errors(debug):
        try:
            recipe_path = synth_module.synth(out, **kwargs)
            if scenes:
                synth_module.scene_classes(out / "scenes", seed=kwargs.get("seed", 0))
        except ValueError as exc:  # synth checks its arguments with ValueError: a usage error here
            raise _UsageError(str(exc)) from None
    curated = out.parent / f"{out.name}-out"
    out_console.print(f"wrote the demo corpus and its recipe to {out}", highlight=False)
    out_console.print("curate it with:", highlight=False)
    out_console.print(f"  rscurate run {recipe_path} --out {curated}", highlight=False, soft_wrap=True)
    if scenes:
        out_console.print(
            f"a labelled land-cover set for `rspretrain probe` is in {out / 'scenes'} (train/ and val/)",
            highlight=False,
            soft_wrap=True,
        )


def main() -> None:
    """Console-script entry point (`rscurate`)."""
    app(prog_name="rscurate")


if __name__ == "__main__":  # pragma: no cover
    main()

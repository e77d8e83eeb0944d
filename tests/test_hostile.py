"""Hostile and broken inputs through a real `rscurate run` subprocess.

One run curates `_images.write_hostile_corpus` (broken, odd, oddly named and unreadable files, links and
loops) plus a 30000 x 30000 px PNG bomb. Every file must end up in inputs.parquet with the status and
reason a person reads, nothing may print a traceback, and the whole process tree stays under 1 GB.

Permission cases need a reader that cannot override file modes. Tests usually run as root, which reads
anything: the run then drops CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH (prctl PR_CAPBSET_DROP before exec),
so root is held to the mode bits like any user. Where that is impossible the permission test skips and
says why.
"""

from __future__ import annotations

import ctypes
import io
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
import yaml
from _images import (
    NON_UTF8_NAME,
    NON_UTF8_TEXT,
    NON_UTF8_TIFF,
    NON_UTF8_TIFF_TEXT,
    QUOTED_NAME,
    UNICODE_NAME,
    write_hostile_corpus,
    write_zero_png,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from rscurate.cli import app
from rscurate.raster import fs_path, path_text
from rscurate.sample import decode_metadata

PERMISSION_CASES = ("locked.png", "locked_dir")
BOMB_SIDE = 30000
PEAK_LIMIT_MB = 1024  # the bomb as RGB is 2.7 GB
_PR_CAPBSET_DROP = 24
_CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH = 1, 2


def _drop_dac_override() -> None:
    """preexec_fn for root: after exec, the process is held to file modes like any user. Without
    CAP_SETPCAP the drop fails silently; `modes_bite` finds that out by trying."""
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (_CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH):
        libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0)


def modes_bite(locked_file: Path) -> tuple[bool, str]:
    """Whether a CLI run started with `_drop_dac_override` cannot read a mode-000 file, and why not."""
    if os.geteuid() != 0:
        return not os.access(locked_file, os.R_OK), "this user can read a mode-000 file"
    try:
        probe = subprocess.run(
            [sys.executable, "-S", "-c", f"open({str(locked_file)!r}).close()"],
            preexec_fn=_drop_dac_override,
            capture_output=True,
            timeout=30,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return False, f"running as root and cannot drop CAP_DAC_OVERRIDE ({exc})"
    if probe.returncode == 0:
        return False, "running as root, and dropping CAP_DAC_OVERRIDE (needs CAP_SETPCAP) did not stop reads"
    return True, ""


@dataclass
class CliRun:
    returncode: int
    stdout: str
    stderr: str
    peak_mb: float  # peak RSS of the largest process of the run's tree (the CLI or one of its workers)


# Runs ARGV[2:] as a grandchild and writes its tree's peak RSS (KiB) to ARGV[1]. ru_maxrss survives fork and
# exec on Linux, so a CLI forked straight from pytest would report pytest's own peak (over 1 GB late in a
# full run); forked from this small launcher instead, it starts from the launcher's few MB.
_LAUNCHER = """
import os, sys
pid = os.fork()
if pid == 0:
    os.execv(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
open(sys.argv[1], "w").write(str(usage.ru_maxrss))
sys.exit(os.waitstatus_to_exitcode(status))
"""


def run_cli(args: list[str], log_dir: Path, *, drop_dac: bool = False, timeout: float = 300) -> CliRun:
    """`python -m rscurate ARGS` as a real subprocess, with the peak RSS of its own process tree."""
    log_dir.mkdir(parents=True, exist_ok=True)
    peak_file = log_dir / "peak_kib.txt"
    with open(log_dir / "stdout.txt", "wb") as out, open(log_dir / "stderr.txt", "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-S", "-c", _LAUNCHER, str(peak_file), sys.executable, "-m", "rscurate", *args],
            stdout=out,
            stderr=err,
            preexec_fn=_drop_dac_override if drop_dac and os.geteuid() == 0 else None,
            start_new_session=True,
            env={**os.environ, "COLUMNS": "200"},
        )
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
    return CliRun(
        proc.returncode,
        (log_dir / "stdout.txt").read_text(errors="replace"),
        (log_dir / "stderr.txt").read_text(errors="replace"),
        int(peak_file.read_text()) / 1024,  # KiB on Linux
    )


@dataclass
class Hostile:
    root: Path
    out: Path
    expected: dict[str, tuple[str, str]]
    modes_bite: bool
    why_not: str
    run: CliRun
    inputs: pd.DataFrame
    tiles: pd.DataFrame


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hostile]:
    base = tmp_path_factory.mktemp("hostile")
    root = base / "src"
    expected = write_hostile_corpus(root, base / "elsewhere")
    (base / "big").mkdir()
    write_zero_png(base / "big" / "bomb.png", BOMB_SIDE)
    recipe = {
        "name": "hostile",
        "sources": [{"name": "src", "root": "src"}, {"name": "big", "root": "big"}],
        "exclude": {"min_side": 32},
        "slice": {"max_side": 512, "tile_size": 256},
        "shard": {"max_samples": 8},
    }
    (base / "recipe.yaml").write_text(yaml.safe_dump(recipe), encoding="utf-8")
    bite, why_not = modes_bite(root / "locked.png")
    out = base / "out"
    run = run_cli(
        ["run", str(base / "recipe.yaml"), "--out", str(out), "--workers", "2"], base / "logs", drop_dac=True
    )
    try:
        assert run.returncode == 0, run.stderr[-3000:]
        yield Hostile(
            root,
            out,
            expected,
            bite,
            why_not,
            run,
            pd.read_parquet(out / "inputs.parquet"),
            pd.read_parquet(out / "tiles.parquet"),
        )
    finally:
        for p in (root / "locked.png", root / "locked_dir"):
            p.chmod(0o755)  # so the temporary folder can be removed by anyone


def test_every_file_has_a_status_and_a_reason(hostile: Hostile) -> None:
    by = hostile.inputs[hostile.inputs["source"] == "src"].set_index("relpath")
    assert by.index.is_unique
    listed = set(by.index)
    if not hostile.modes_bite:  # listed like any other file then: see test_unreadable_files_and_folders
        listed -= {"locked.png", "locked_dir/hidden.png"}
        listed |= {"locked_dir"}
    # Exactly these entries: nothing from outside the root, nothing twice through the folder loop.
    assert listed == set(hostile.expected), sorted(listed ^ set(hostile.expected))
    for relpath, (status, reason) in hostile.expected.items():
        if relpath in PERMISSION_CASES:
            continue
        row = by.loc[relpath]
        assert row["status"] == status, (relpath, row["status"], row["reason"])
        if status == "ok":
            assert pd.isna(row["reason"]), (relpath, row["reason"])
        else:
            assert row["reason"].startswith("unreadable: ") and reason in row["reason"], (
                relpath,
                row["reason"],
            )
            assert "\n" not in row["reason"] and len(row["reason"]) < 300


def test_unreadable_files_and_folders(hostile: Hostile) -> None:
    if not hostile.modes_bite:
        pytest.skip(f"cannot test mode-000 files: {hostile.why_not}")
    by = hostile.inputs.set_index("relpath")
    assert by.loc["locked.png", ["status", "reason"]].tolist() == ["error", "unreadable: permission denied"]
    assert by.loc["locked_dir", ["status", "reason"]].tolist() == [
        "error",
        "unreadable: permission denied: the folder could not be listed",
    ]


def test_ok_files_become_samples_and_no_traceback(hostile: Hostile) -> None:
    assert "Traceback" not in hostile.run.stdout and "Traceback" not in hostile.run.stderr
    ok = hostile.inputs[(hostile.inputs["status"] == "ok")]
    kept = hostile.tiles[hostile.tiles["status"] == "kept"]
    # Every readable scene of the src source (all smaller than max_side) is one kept sample.
    assert sorted(kept["relpath"]) == sorted(ok["relpath"])
    assert {"u16.tif", "float_nan.tif", "bands2.tif", "bands5.tif", "cmyk.jpg", "palette.png"} <= set(
        kept["relpath"]
    )
    rotated = kept.set_index("relpath").loc["exif_rotated.jpg"]
    assert (rotated["width"], rotated["height"]) == (64, 96)  # stored 96 x 64, EXIF orientation 6
    stats = json.loads((hostile.out / "stats.json").read_text())
    assert stats["inputs"]["by_status"] == {
        s: int((hostile.inputs["status"] == s).sum()) for s in ("ok", "excluded", "error")
    }
    assert stats["kept"] == len(kept)


def test_png_bomb_is_read_in_bounded_memory(hostile: Hostile) -> None:
    bomb = hostile.inputs.set_index("relpath").loc["bomb.png"]
    assert (bomb["width"], bomb["height"], bomb["status"], bomb["reason"]) == (
        BOMB_SIDE,
        BOMB_SIDE,
        "excluded",
        "blank",
    )
    assert (hostile.tiles["relpath"] == "bomb.png").sum() == math.ceil(BOMB_SIDE / 256) ** 2  # all looked at
    assert 0 < hostile.run.peak_mb < PEAK_LIMIT_MB, f"peak RSS {hostile.run.peak_mb:.0f} MB"


def test_odd_names_survive_into_parquet_and_sample_json(hostile: Hostile) -> None:
    """A name that is not UTF-8 is written with `\\xNN` escapes (raster.path_text) and opens again
    through raster.fs_path; unicode, spaces and quotes pass through unchanged."""
    by = hostile.inputs.set_index("relpath")
    for text, raw in ((NON_UTF8_TEXT, NON_UTF8_NAME), (NON_UTF8_TIFF_TEXT, NON_UTF8_TIFF)):
        assert by.loc[text, "status"] == "ok"
        assert os.fsencode(fs_path(by.loc[text, "path"])) == os.fsencode(hostile.root) + b"/" + raw
    metadata = {}
    for tar_path in sorted((hostile.out / "shards").glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for member in tar:
                if member.name.endswith(".json"):
                    meta = decode_metadata(tar.extractfile(member).read())
                    metadata[meta["path"]] = meta
    for name in (NON_UTF8_TEXT, NON_UTF8_TIFF_TEXT, UNICODE_NAME, QUOTED_NAME, "folder.jpg/inside.png"):
        assert name in metadata, sorted(metadata)
        assert metadata[name]["source"] == "src"


MEMBER = re.compile(r"^[A-Za-z0-9_-]+\.(jpg|png|json)$")


def test_shards_hold_only_plain_members_and_verify(hostile: Hostile) -> None:
    tars = sorted((hostile.out / "shards").glob("*.tar"))
    assert tars
    for tar_path in tars:
        with tarfile.open(tar_path) as tar:
            for member in tar.getmembers():
                assert MEMBER.match(member.name), member.name
                assert member.isreg() and member.mode == 0o644 and member.uid == member.gid == 0
    result = CliRunner().invoke(app, ["verify", str(hostile.out), "--workers", "1"])
    assert result.exit_code == 0, result.output


# Members a tampered or crafted shard may hold, and the words `rscurate verify` must say about each.
UNSAFE_MEMBERS = [
    ("../evil.json", tarfile.REGTYPE, "climbs out of the extraction folder"),
    ("..\\evil.json", tarfile.REGTYPE, "climbs out of the extraction folder"),
    ("/etc/evil.json", tarfile.REGTYPE, "has an absolute name"),
    ("C:evil.json", tarfile.REGTYPE, "has an absolute name"),
    ("sub/src_0_0_0.jpg", tarfile.REGTYPE, "is not a '{key}.{ext}' name"),
    ("[/x].jpg", tarfile.REGTYPE, "is not a '{key}.{ext}' name"),  # also rich markup: must not crash the CLI
    ("src_1_0_0.jpg", tarfile.SYMTYPE, "is a link (to '/etc/passwd')"),
    ("src_2_0_0.jpg", tarfile.LNKTYPE, "is a link (to '/etc/passwd')"),
    ("char.jpg", tarfile.CHRTYPE, "is a device or fifo"),
    ("block.jpg", tarfile.BLKTYPE, "is a device or fifo"),
    ("fifo.jpg", tarfile.FIFOTYPE, "is a device or fifo"),
    ("folder", tarfile.DIRTYPE, "is not a regular file"),
]


def test_verify_rejects_every_unsafe_member(mini_curated: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    shutil.copytree(mini_curated, out)
    victim = out / "shards" / "mini-000000.tar"
    with tarfile.open(victim) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(victim, "w", format=tarfile.USTAR_FORMAT) as tar:
        for m, data in members:
            tar.addfile(m, io.BytesIO(data))
        for name, kind, _ in UNSAFE_MEMBERS:
            info = tarfile.TarInfo(name)
            info.type = kind
            info.linkname = "/etc/passwd" if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE) else ""
            data = b"{}" if kind == tarfile.REGTYPE else b""
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data else None)
    result = CliRunner().invoke(app, ["verify", str(out), "--workers", "1", "--json"])
    assert result.exit_code == 1, result.output
    problems = json.loads(result.stdout)["problems"]
    for name, _, words in UNSAFE_MEMBERS:
        assert any(f"member {name!r} {words}" in p for p in problems), (name, problems)
    printed = CliRunner().invoke(app, ["verify", str(out), "--workers", "1"])
    assert printed.exit_code == 1 and "Traceback" not in printed.output
    assert "member '[/x].jpg'" in printed.output  # printed as text, not read as markup


# Pieces that make escapes collide if the representation were ambiguous: backslashes, 'x', hex digits.
_PIECES = [b"\\", b"x", b"e9", b"ff", b"\xe9", b"\xff", b"\xc3\xa9", b"a", b" ", b"\\xe9", b"\\\\"]


@settings(max_examples=200, deadline=None, database=None)
@given(
    name=st.one_of(
        st.binary(min_size=1, max_size=40), st.lists(st.sampled_from(_PIECES), min_size=1).map(b"".join)
    )
    .map(lambda b: b.replace(b"/", b"_").replace(b"\0", b"_"))
    .filter(lambda b: b not in (b".", b".."))
)
def test_any_file_name_round_trips_through_the_tables(name: bytes) -> None:
    """Any bytes a file name may hold: path_text gives UTF-8 text, fs_path gives the name back exactly."""
    with tempfile.TemporaryDirectory() as tmp:
        raw = os.fsencode(tmp) + b"/" + name
        Path(os.fsdecode(raw)).write_bytes(b"x")
        text = path_text(os.fsdecode(raw))
        text.encode("utf-8")  # what parquet needs
        assert os.fsencode(fs_path(text)) == raw

"""Split files: the seeded stratified writer, our `path label` files, the reference's `fname dir class_idx` lists,
the protocol table, and `rspretrain split` at the command line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from rspretrain.cli import app
from rspretrain.splits import PROTOCOLS, SplitError, load_labeled, scan_folder, write_split

runner = CliRunner()


def image_folder(root: Path, counts: dict[str, int], size: int = 8, nested: str = "") -> Path:
    """ROOT[/nested]/<class>/<class>_<i>.png: a tiny ImageFolder with `counts` images per class."""
    rng = np.random.default_rng(0)
    base = root / nested if nested else root
    for name, n in counts.items():
        (base / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(base / name / f"{name}_{i}.png")
    return root


COUNTS = {"farm": 10, "forest": 7, "river": 3, "sea": 2}


def test_writer_is_deterministic_stratified_and_disjoint(tmp_path: Path) -> None:
    data = image_folder(tmp_path / "data", COUNTS)
    a = write_split(data, tmp_path / "a", train_ratio=0.5, seed=3)
    b = write_split(data, tmp_path / "b", train_ratio=0.5, seed=3)
    assert a.train.read_bytes() == b.train.read_bytes() and a.val.read_bytes() == b.val.read_bytes()
    assert (a.train_sha256, a.val_sha256) == (b.train_sha256, b.val_sha256)
    train, val = load_labeled(a.train), load_labeled(a.val)
    # per class: round(0.5 n) to train, and at least one image on each side
    assert train.counts() == {"farm": 5, "forest": 4, "river": 2, "sea": 1}
    assert val.counts() == {"farm": 5, "forest": 3, "river": 1, "sea": 1}
    assert not set(train.paths) & set(val.paths)
    assert sorted(train.paths + val.paths) == sorted(scan_folder(data).paths)
    assert train.classes == val.classes == sorted(COUNTS)
    for path, label in zip(train.paths, train.labels, strict=True):
        assert path.parent.name == train.classes[label]
    assert train.sha256 == a.train_sha256

    other = write_split(data, tmp_path / "c", train_ratio=0.5, seed=4)
    assert other.train.read_bytes() != a.train.read_bytes()  # the seed matters
    # one class's files do not move another class's split
    image_folder(data, {"sea": 4})
    grown = load_labeled(write_split(data, tmp_path / "d", train_ratio=0.5, seed=3).train)
    farm = [p for p, label in zip(grown.paths, grown.labels, strict=True) if grown.classes[label] == "farm"]
    assert farm == [
        p for p, label in zip(train.paths, train.labels, strict=True) if train.classes[label] == "farm"
    ]


def test_max_per_class_and_protocols(tmp_path: Path) -> None:
    data = image_folder(tmp_path / "data", {"a": 9, "b": 9})
    small = write_split(data, tmp_path / "s", train_ratio=0.8, max_per_class=5)
    assert (small.train_images, small.val_images) == (8, 2)
    assert PROTOCOLS["aid-20"].train_ratio == 0.2 and PROTOCOLS["nwpu-10"].classes == 45
    assert {p.name for p in PROTOCOLS.values()} == {
        "aid-20",
        "aid-50",
        "nwpu-10",
        "nwpu-20",
        "ucm-50",
        "ucm-80",
        "eurosat-80",
    }
    with pytest.raises(SplitError, match=r"2 class folders, but AID has 30"):
        write_split(data, tmp_path / "p", protocol="aid-20")
    with pytest.raises(SplitError, match="contradicts --protocol"):
        write_split(data, tmp_path / "p", protocol="aid-20", train_ratio=0.5)
    with pytest.raises(SplitError, match="--train-ratio 1.0"):
        write_split(data, tmp_path / "p", train_ratio=1.0)
    with pytest.raises(SplitError, match="no such folder"):
        write_split(tmp_path / "nope", tmp_path / "p", train_ratio=0.5)


def test_split_file_moves_with_its_data_and_names_missing_images(tmp_path: Path) -> None:
    data = image_folder(tmp_path / "data", {"a": 4, "b": 4})
    split = write_split(data, tmp_path / "split", train_ratio=0.5)
    moved = tmp_path / "moved"
    data.rename(moved)
    with pytest.raises(SplitError, match=r"4 of 4 images not found.*--data-root"):
        load_labeled(split.train)
    train = load_labeled(split.train, data_root=moved)
    assert all(p.is_file() for p in train.paths) and train.paths[0].is_relative_to(moved)
    bad = tmp_path / "bad.txt"
    bad.write_text("# rspretrain split v1\n# classes: a b\na/a_0.png c\n")
    with pytest.raises(SplitError, match=r"bad\.txt:3: class 'c' is not in the header"):
        load_labeled(bad, data_root=moved)


def test_reference_lists_read_with_their_class_indices(tmp_path: Path) -> None:
    # AID's layout (AID/images/<Class>/...) and the reference's list lines, with the authors' absolute folders
    data = image_folder(tmp_path / "AID", {"Beach": 2, "River": 2}, nested="images")
    listing = tmp_path / "train_labels_28_0.txt"
    listing.write_text(
        "Beach_0.png /public/x/AID/images/Beach 0\nBeach_1.png /public/x/AID/images/Beach 0\n"
        "River_1.png /public/x/AID/images/River 1\n"
    )
    ref = load_labeled(listing, data_root=data)
    assert ref.layout == "reference" and ref.classes == ["Beach", "River"] and ref.labels == [0, 0, 1]
    assert ref.paths[2] == data / "images" / "River" / "River_1.png"
    with pytest.raises(SplitError, match="not found"):
        load_labeled(listing)  # without a root: the authors' folders
    # our folder scan finds the same class folders under AID/images
    assert scan_folder(data).classes == ["Beach", "River"]
    # a val list whose classes are a subset is relabelled by name into the training classes
    val = load_labeled(listing, data_root=data).relabel(["Airport", "Beach", "River"])
    assert val.labels == [1, 1, 2]
    with pytest.raises(SplitError, match=r"\['Beach', 'River'\] are not among"):
        ref.relabel(["Airport"])


def test_split_cli(tmp_path: Path) -> None:
    data = image_folder(tmp_path / "data", {"a": 5, "b": 5})
    result = runner.invoke(
        app, ["split", str(data), "--out", str(tmp_path / "s"), "--train-ratio", "0.6", "--json"]
    )
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert (info["train_images"], info["val_images"], info["classes"]) == (6, 4, 2)
    assert (tmp_path / "s" / "train.txt").is_file()
    bad = runner.invoke(app, ["split", str(data), "--out", str(tmp_path / "s"), "--protocol", "aid-99"])
    assert bad.exit_code == 2 and "use one of aid-20" in bad.output
    listing = runner.invoke(app, ["split", "--list"])
    assert listing.exit_code == 0 and "eurosat-80" in listing.output

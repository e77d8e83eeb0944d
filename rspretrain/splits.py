"""Fixed benchmark splits: seeded, stratified split files, the reference's `train_labels_*.txt` lists, and the
protocol table of the scene-classification benchmarks the paper reports.

A labelled set (`LabeledSet`) is a list of (image path, class index) with its class names. It comes from

- a folder in the ImageFolder layout (one sub-folder of images per class; classes in sorted name order), or
- a split file. Two layouts are read:
  - ours, written by `rspretrain split` (`write_split`): `#` header lines (root, seed, train ratio, part and
    the class list), then one `path label` line per image, `path` relative to the root, `label` the class name;
  - the SelectiveMAE reference's (`Classification/AID/train_labels_28_0.txt`): `fname dir class_idx` lines,
    where `dir` is the class folder on the authors' machine. With a data root, the image is read from
    ROOT/<last part of dir>/fname, so the released lists work on any copy of the dataset.

The split writer is deterministic and stratified: per class, the files (sorted by relative path) are permuted
by a generator seeded with (seed, CRC-32 of the class name), the first `max_per_class` of the permutation are
kept (all by default), and the first round(train_ratio x kept) of those go to train, the rest to val; a class
of two or more images has at least one in each part. The same folder, ratio and seed give byte-identical files
on any machine, and changing one class's files changes no other class's split.

For these benchmarks "val" is the test split: there is no separate validation set in the paper's protocol.
A split's `sha256` (of the file's bytes; of the listing as split-file lines for a folder) goes into the
result of every evaluation that reads it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from rscurate.schema import SUPPORTED_EXTENSIONS

log = logging.getLogger(__name__)

HEADER = "# rspretrain split v1"
PARTS = ("train", "val")
IMAGE_EXTENSIONS = (*SUPPORTED_EXTENSIONS, ".gif")


class SplitError(ValueError):
    """A split, data folder or protocol the user can fix; the message says what to change."""


@dataclass(frozen=True)
class Protocol:
    """One row of the benchmark table: which dataset, which train ratio, and where the paper reports it."""

    name: str
    dataset: str
    folder: str  # the dataset's folder under DATA_ROOT (as in manifests/)
    train_ratio: float
    classes: int
    images: int
    reported: str  # the paper's figure for it (its README table; RESISC-45's TR 10/20 per the released lists)
    reference_lists: str = ""  # the reference's released split files for this protocol, if any


PROTOCOLS: dict[str, Protocol] = {
    p.name: p
    for p in (
        Protocol(
            "aid-20",
            "AID",
            "AID",
            0.2,
            30,
            10_000,
            "paper: 96.90 (ViT-B, OpticalRS-4M)",
            "Classification/AID/{train,valid}_labels_28_0.txt",
        ),
        Protocol(
            "aid-50",
            "AID",
            "AID",
            0.5,
            30,
            10_000,
            "paper: 98.12 (ViT-B, OpticalRS-4M)",
            "Classification/AID/{train,valid}_labels_55_0.txt",
        ),
        Protocol(
            "nwpu-10",
            "NWPU-RESISC45",
            "NWPU-RESISC45",
            0.1,
            45,
            31_500,
            "paper: 93.35 (ViT-B, OpticalRS-4M)",
            "Classification/NWPU-RESISC45/{train,valid}_labels_19_0.txt",
        ),
        Protocol(
            "nwpu-20",
            "NWPU-RESISC45",
            "NWPU-RESISC45",
            0.2,
            45,
            31_500,
            "paper: 94.58 (ViT-B, OpticalRS-4M)",
            "Classification/NWPU-RESISC45/{train,valid}_labels_28_0.txt",
        ),
        Protocol(
            "ucm-50",
            "UC Merced",
            "UCMerced_LandUse",
            0.5,
            21,
            2_100,
            "not in the paper",
        ),
        Protocol(
            "ucm-80",
            "UC Merced",
            "UCMerced_LandUse",
            0.8,
            21,
            2_100,
            "not in the paper",
        ),
        Protocol(
            "eurosat-80",
            "EuroSAT (RGB)",
            "EuroSAT-RGB",
            0.8,
            10,
            27_000,
            "not in the paper (no official split)",
        ),
    )
}


@dataclass
class LabeledSet:
    """Images and their class indices; `classes[i]` names class i."""

    paths: list[Path]
    labels: list[int]
    classes: list[str]
    source: str  # the folder or split file it was read from
    sha256: str
    layout: str  # "folder" | "split" | "reference"
    meta: dict[str, str] = field(default_factory=dict)  # a split file's header

    def __len__(self) -> int:
        return len(self.paths)

    def counts(self) -> dict[str, int]:
        """Images per class name."""
        counts = dict.fromkeys(self.classes, 0)
        for label in self.labels:
            counts[self.classes[label]] += 1
        return counts

    def relabel(self, classes: Sequence[str]) -> LabeledSet:
        """The same images with indices into `classes` (the training set's), matched by class name."""
        if list(classes) == self.classes:
            return self
        missing = sorted(set(self.classes[label] for label in self.labels) - set(classes))
        if missing:
            raise SplitError(f"{self.source}: classes {missing} are not among the training classes")
        index = {name: i for i, name in enumerate(classes)}
        labels = [index[self.classes[label]] for label in self.labels]
        return LabeledSet(self.paths, labels, list(classes), self.source, self.sha256, self.layout, self.meta)


@dataclass
class SplitFiles:
    """What `write_split` wrote."""

    train: Path
    val: Path
    train_images: int
    val_images: int
    classes: list[str]
    train_sha256: str
    val_sha256: str
    protocol: str | None = None


# --------------------------------------------------------------------------- folders


def class_root(root: str | Path) -> Path:
    """The folder whose sub-folders are the classes: `root`, or its `images` folder when that is the only
    folder in it (AID as the reference lists it, UC Merced's `Images`)."""
    root = Path(root)
    if not root.is_dir():
        raise SplitError(f"{root}: no such folder; give the dataset folder with one sub-folder per class")
    folders = [d for d in root.iterdir() if d.is_dir()]
    if len(folders) == 1 and folders[0].name.lower() == "images" and _class_folders(folders[0]):
        return folders[0]
    if _class_folders(root):
        return root
    raise SplitError(f"{root}: no class folders with images in it; expected ROOT/<class>/<image>")


def _class_folders(root: Path) -> list[Path]:
    return sorted(d for d in root.iterdir() if d.is_dir() and _has_image(d))


def _has_image(folder: Path) -> bool:
    return any(f.lower().endswith(IMAGE_EXTENSIONS) for _, _, files in os.walk(folder) for f in files)


def _images(folder: Path) -> list[Path]:
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        found += [Path(dirpath, f) for f in filenames if f.lower().endswith(IMAGE_EXTENSIONS)]
    return sorted(found)


def scan_folder(root: str | Path) -> LabeledSet:
    """An ImageFolder-layout folder as a labelled set (classes in sorted name order, files sorted)."""
    base = class_root(root)
    folders = _class_folders(base)
    classes = [d.name for d in folders]
    for name in classes:
        _check_class_name(name, base)
    paths: list[Path] = []
    labels: list[int] = []
    for label, folder in enumerate(folders):
        images = _images(folder)
        paths += images
        labels += [label] * len(images)
    lines = _lines(base, paths, labels, classes)
    sha = hashlib.sha256("".join(lines).encode()).hexdigest()
    return LabeledSet(paths, labels, classes, str(base), sha, "folder", {"root": str(base)})


def _check_class_name(name: str, where: Path) -> None:
    if not name or any(c.isspace() for c in name):
        raise SplitError(
            f"{where / name}: a class folder name with white space cannot go into a split file; rename it"
        )


def _lines(root: Path, paths: Sequence[Path], labels: Sequence[int], classes: Sequence[str]) -> list[str]:
    return [
        f"{p.relative_to(root).as_posix()} {classes[label]}\n" for p, label in zip(paths, labels, strict=True)
    ]


# --------------------------------------------------------------------------- writing


def write_split(
    root: str | Path,
    out: str | Path,
    *,
    train_ratio: float | None = None,
    protocol: str | None = None,
    seed: int = 0,
    max_per_class: int | None = None,
) -> SplitFiles:
    """Split the ImageFolder-layout `root` per class into OUT/train.txt and OUT/val.txt (see the module doc).

    `protocol` (a name in PROTOCOLS) sets the train ratio and checks the class count; `max_per_class` keeps a
    seeded subset of each class first (for quick runs on small machines).
    """
    if protocol is not None:
        if protocol not in PROTOCOLS:
            raise SplitError(f"--protocol {protocol!r}: use one of {', '.join(PROTOCOLS)}")
        proto = PROTOCOLS[protocol]
        if train_ratio is not None and train_ratio != proto.train_ratio:
            raise SplitError(
                f"--train-ratio {train_ratio} contradicts --protocol {protocol} ({proto.train_ratio})"
            )
        train_ratio = proto.train_ratio
    if train_ratio is None:
        raise SplitError("give --train-ratio R (e.g. 0.2) or --protocol NAME")
    if not 0.0 < train_ratio < 1.0:
        raise SplitError(f"--train-ratio {train_ratio}: must be between 0 and 1")
    if max_per_class is not None and max_per_class < 2:
        raise SplitError(f"--max-per-class {max_per_class}: must be at least 2 (one train, one val image)")
    full = scan_folder(root)
    base = Path(full.source)
    if protocol is not None:
        proto = PROTOCOLS[protocol]
        if len(full.classes) != proto.classes:
            raise SplitError(
                f"{base}: {len(full.classes)} class folders, but {proto.dataset} has {proto.classes}; "
                f"point at the {proto.dataset} folder (DATA_ROOT/{proto.folder})"
            )
        if len(full) != proto.images and max_per_class is None:
            log.warning(
                "%s: %d images, %s has %d; splitting what is there",
                base,
                len(full),
                proto.dataset,
                proto.images,
            )
    parts: dict[str, tuple[list[Path], list[int]]] = {part: ([], []) for part in PARTS}
    by_class: dict[int, list[Path]] = {}
    for path, label in zip(full.paths, full.labels, strict=True):
        by_class.setdefault(label, []).append(path)
    for label, paths in sorted(by_class.items()):
        name = full.classes[label]
        rng = np.random.default_rng([seed, zlib.crc32(name.encode("utf-8"))])
        order = rng.permutation(len(paths))
        if max_per_class is not None:
            order = order[:max_per_class]
        n = len(order)
        n_train = round(train_ratio * n)
        if n >= 2:
            n_train = min(max(n_train, 1), n - 1)
        for part, chosen in (("train", order[:n_train]), ("val", order[n_train:])):
            parts[part][0].extend(paths[i] for i in sorted(chosen))
            parts[part][1].extend([label] * len(chosen))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, tuple[Path, str, int]] = {}
    for part in PARTS:
        paths, labels = parts[part]
        header = [
            HEADER,
            f"# root: {base.resolve()}",
            f"# part: {part}",
            f"# train_ratio: {train_ratio}",
            f"# seed: {seed}",
            *([f"# protocol: {protocol}"] if protocol else []),
            *([f"# max_per_class: {max_per_class}"] if max_per_class is not None else []),
            f"# classes: {' '.join(full.classes)}",
        ]
        text = "\n".join(header) + "\n" + "".join(_lines(base, paths, labels, full.classes))
        path = out / f"{part}.txt"
        _write_atomic(path, text)
        written[part] = (path, hashlib.sha256(text.encode()).hexdigest(), len(paths))
    return SplitFiles(
        train=written["train"][0],
        val=written["val"][0],
        train_images=written["train"][2],
        val_images=written["val"][2],
        classes=list(full.classes),
        train_sha256=written["train"][1],
        val_sha256=written["val"][1],
        protocol=protocol,
    )


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


# --------------------------------------------------------------------------- reading


def load_labeled(spec: str | Path, data_root: str | Path | None = None, *, check: bool = True) -> LabeledSet:
    """A folder (ImageFolder layout) or a split file (ours or the reference's) -> LabeledSet.

    `data_root` is where a split file's relative paths (ours) or class folders (the reference's) live; by
    default the root in our header, and for the reference's lists the absolute folders they name.
    `check` verifies that every image exists and names the first missing ones.
    """
    spec = Path(spec)
    if spec.is_dir():
        return scan_folder(spec)
    if not spec.is_file():
        raise SplitError(f"{spec}: no such folder or split file")
    data = spec.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise SplitError(f"{spec}: not a text split file (not UTF-8)") from None
    sha = hashlib.sha256(data).hexdigest()
    rows = [line.strip() for line in text.splitlines()]
    header = [r for r in rows if r.startswith("#")]
    body = [(i + 1, r) for i, r in enumerate(rows) if r and not r.startswith("#")]
    if not body:
        raise SplitError(
            f"{spec}: no image lines; expected 'path label' (or the reference's 'fname dir class_idx')"
        )
    meta = {}
    for line in header[1:] if header and header[0] == HEADER else header:
        key, sep, value = line[1:].partition(":")
        if sep:
            meta[key.strip()] = value.strip()
    first = body[0][1].split()
    if len(first) == 3 and first[2].lstrip("-").isdigit():
        labeled = _read_reference(spec, body, data_root, sha)
    else:
        labeled = _read_ours(spec, body, meta, data_root, sha)
    if check:
        missing = [p for p in labeled.paths if not p.is_file()]
        if missing:
            hint = "" if data_root else "; give the dataset folder with --data-root"
            raise SplitError(
                f"{spec}: {len(missing)} of {len(labeled)} images not found, e.g. {missing[0]}{hint}"
            )
    return labeled


def _read_ours(
    spec: Path, body: list[tuple[int, str]], meta: dict[str, str], data_root: str | Path | None, sha: str
) -> LabeledSet:
    if data_root is not None:
        root = class_root(data_root)
    elif meta.get("root"):
        root = Path(meta["root"])
    else:
        root = spec.parent
    rows: list[tuple[Path, str, int]] = []
    for number, row in body:
        rel, sep, name = row.rpartition(" ")
        if not sep or not rel.strip():
            raise SplitError(f"{spec}:{number}: {row!r}; expected 'path label'")
        rows.append((root / rel.strip(), name, number))
    # Without a header (a hand-written file) the classes are the sorted names the file uses.
    classes = meta["classes"].split() if meta.get("classes") else sorted({name for _, name, _ in rows})
    index = {name: i for i, name in enumerate(classes)}
    for _, name, number in rows:
        if name not in index:
            raise SplitError(f"{spec}:{number}: class {name!r} is not in the header's class list")
    paths = [path for path, _, _ in rows]
    labels = [index[name] for _, name, _ in rows]
    return LabeledSet(paths, labels, classes, str(spec), sha, "split", meta | {"root": str(root)})


def _read_reference(
    spec: Path, body: list[tuple[int, str]], data_root: str | Path | None, sha: str
) -> LabeledSet:
    root = class_root(data_root) if data_root is not None else None
    names: dict[int, str] = {}
    paths: list[Path] = []
    labels: list[int] = []
    for number, row in body:
        parts = row.split()
        if len(parts) != 3 or not parts[2].lstrip("-").isdigit():
            raise SplitError(f"{spec}:{number}: {row!r}; expected the reference's 'fname dir class_idx'")
        fname, folder, idx = parts[0], parts[1], int(parts[2])
        name = Path(folder).name
        if names.setdefault(idx, name) != name:
            raise SplitError(f"{spec}:{number}: class index {idx} is {names[idx]!r} above but {name!r} here")
        paths.append(root / name / fname if root is not None else Path(folder) / fname)
        labels.append(idx)
    if sorted(names) != list(range(len(names))):
        raise SplitError(f"{spec}: class indices {sorted(names)} are not 0..{len(names) - 1}")
    classes = [names[i] for i in range(len(names))]
    meta = {"root": str(root) if root is not None else ""}
    return LabeledSet(paths, labels, classes, str(spec), sha, "reference", meta)

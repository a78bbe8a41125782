"""Untrusted bytes in, clean catalog images out: validate, normalise, hash, store, thumbnail.

Every file is decided on its own and reported (added / duplicate / rejected with the reason);
one bad file never stops a batch, and a row is only written once its files are on disk.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import tempfile
import unicodedata
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Callable, Iterable, Iterator

from sqlite_utils import Database

from core import catalog
from core.errors import LoupeError
from core.images import ALLOWED_FORMATS, MAX_FILE_BYTES, decode_image, thumbnail_jpeg
from core.workspace import Workspace


@dataclass
class IngestOutcome:
    name: str
    status: str  # "added", "duplicate" or "rejected"
    image_id: int | None = None
    reason: str = ""


@dataclass
class ImportItem:
    """One file to import: its name as the user gave it, how to read it, and its label if known."""

    name: str
    read: Callable[[], bytes]
    label: str | None = None
    split: str | None = None


def clean_original_name(name: str) -> str:
    """A display name only: the last path component, printable, bounded. Never used as a path."""
    base = re.split(r"[\\/]", str(name))[-1]
    base = "".join(ch for ch in base if unicodedata.category(ch)[0] != "C").strip()
    return base[:200] or "unnamed"


def _write_atomically(path: Path, data: bytes) -> None:
    # Written under a temporary name and renamed, so a file is either whole or absent. No fsync per
    # file: it halves import speed, and a file lost to a power cut is re-imported from its source.
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def ingest_bytes(
    ws: Workspace,
    db: Database,
    data: bytes,
    original_name: str,
    label: str | None = None,
    split: str | None = None,
    who: str = "import",
) -> IngestOutcome:
    name = clean_original_name(original_name)
    sha256 = hashlib.sha256(data).hexdigest()
    existing = catalog.find_image_by_sha256(db, sha256)
    if existing:
        if label and catalog.get_image(db, existing["id"])["label"] is None:
            catalog.set_label(db, existing["id"], label, who)
        return IngestOutcome(name, "duplicate", existing["id"], f"duplicate of #{existing['id']}")
    try:
        decoded = decode_image(data)
    except LoupeError as exc:
        return IngestOutcome(name, "rejected", reason=str(exc))

    ext = ALLOWED_FORMATS[decoded.format]
    image_rel = Path("images") / sha256[:2] / f"{sha256}.{ext}"
    thumb_rel = Path("thumbs") / sha256[:2] / f"{sha256}.jpg"
    written: list[Path] = []
    try:
        for rel, payload in ((image_rel, data), (thumb_rel, thumbnail_jpeg(decoded.rgb))):
            _write_atomically(ws.root / rel, payload)
            written.append(ws.root / rel)
        with db.atomic():
            image_id = catalog.insert_image(
                db,
                {
                    "sha256": sha256,
                    "path": image_rel.as_posix(),
                    "thumb_path": thumb_rel.as_posix(),
                    "width": decoded.width,
                    "height": decoded.height,
                    "format": decoded.format,
                    "original_name": name,
                },
            )
            if split:
                catalog.pin_split(db, image_id, split)
            if label:
                catalog.set_label(db, image_id, label, who)
    except BaseException:
        # Files are content-addressed: another import may have stored the same bytes meanwhile.
        if catalog.find_image_by_sha256(db, sha256) is None:
            for path in written:
                path.unlink(missing_ok=True)
        raise
    return IngestOutcome(name, "added", image_id)


def ingest_items(
    ws: Workspace, db: Database, items: Iterable[ImportItem], who: str = "import",
    on_progress: Callable[[int], None] | None = None,
) -> list[IngestOutcome]:
    outcomes = []
    for done, item in enumerate(items, start=1):
        try:
            data = item.read()
        except OSError as exc:
            outcomes.append(IngestOutcome(clean_original_name(item.name), "rejected", reason=f"cannot read: {exc}"))
        else:
            outcomes.append(ingest_bytes(ws, db, data, item.name, item.label, item.split, who))
        if on_progress:
            on_progress(done)
    return outcomes


def ingest_upload(ws: Workspace, db: Database, name: str, data: bytes, who: str = "import") -> list[IngestOutcome]:
    """One file from the browser: a .zip is unpacked and each entry decided on its own."""
    if not name.lower().endswith(".zip"):
        return [ingest_bytes(ws, db, data, name, who=who)]
    try:
        items = list(items_from_zip(data))
    except LoupeError as exc:
        return [IngestOutcome(clean_original_name(name), "rejected", reason=str(exc))]
    return ingest_items(ws, db, items, who=who)


def summarise(outcomes: Iterable[IngestOutcome]) -> dict[str, int]:
    counts = {"added": 0, "duplicates": 0, "rejected": 0}
    key = {"added": "added", "duplicate": "duplicates", "rejected": "rejected"}
    for outcome in outcomes:
        counts[key[outcome.status]] += 1
    return counts


# ---------------------------------------------------------------- sources


def _label_and_split(paths: list[PurePosixPath]) -> list[tuple[str | None, str | None]]:
    """ImageFolder semantics: `<class>/<img>` or `<split>/<class>/<img>`, below one optional wrapper folder."""
    # `..`, `.` and a leading `/` are path syntax, never folder names (a hostile zip may contain them).
    parts = [tuple(part for part in p.parts if part not in ("", ".", "..", "/")) for p in paths]
    while (
        parts
        and all(len(p) >= 3 for p in parts)
        and len({p[0] for p in parts}) == 1
        and parts[0][0] not in catalog.SPLITS
    ):
        parts = [p[1:] for p in parts]
    result = []
    for p in parts:
        if len(p) >= 3 and p[0] in catalog.SPLITS:
            result.append((p[-2], p[0]))
        elif len(p) >= 2:
            result.append((p[-2], None))
        else:
            result.append((None, None))
    return result


def _is_hidden(path: PurePosixPath) -> bool:
    return any((part.startswith(".") and part not in (".", "..")) or part == "__MACOSX" for part in path.parts)


def _bounded_reader(path: Path) -> Callable[[], bytes]:
    def read() -> bytes:
        if path.stat().st_size > MAX_FILE_BYTES:
            raise OSError(f"file larger than {MAX_FILE_BYTES // 2**20} MB")
        return path.read_bytes()

    return read


def items_from_folder(root: str | Path) -> list[ImportItem]:
    root = Path(root)
    if not root.is_dir():
        raise LoupeError(f"{root} is not a folder.")
    files = sorted(
        p for p in root.rglob("*")
        if p.is_file() and not p.is_symlink() and not _is_hidden(PurePosixPath(p.relative_to(root).as_posix()))
    )
    rel = [PurePosixPath(p.relative_to(root).as_posix()) for p in files]
    return [
        ImportItem(path.name, _bounded_reader(path), label, split)
        for path, (label, split) in zip(files, _label_and_split(rel))
    ]


def items_from_zip(data: bytes) -> Iterator[ImportItem]:
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile:
        raise LoupeError("The .zip file is damaged or not a zip archive.") from None
    entries = [
        info for info in archive.infolist()
        if not info.is_dir() and not _is_hidden(PurePosixPath(info.filename))
    ]
    labels = _label_and_split([PurePosixPath(info.filename.replace("\\", "/")) for info in entries])
    for info, (label, split) in zip(entries, labels):

        def read(info: zipfile.ZipInfo = info) -> bytes:
            if info.file_size > MAX_FILE_BYTES:
                raise OSError(f"zip entry larger than {MAX_FILE_BYTES // 2**20} MB")
            try:
                with archive.open(info) as f:
                    return f.read(MAX_FILE_BYTES + 1)
            except (zipfile.BadZipFile, NotImplementedError, RuntimeError, EOFError, zlib.error) as exc:
                # Damaged, encrypted or exotically compressed entries: reject this entry, keep the batch.
                raise OSError(f"unreadable zip entry: {exc}") from None

        yield ImportItem(info.filename, read, label, split)


def items_from_list_file(list_path: str | Path) -> list[ImportItem]:
    """`path label` lines (paths relative to the list file); blank lines and # comments skipped."""
    list_path = Path(list_path)
    items = []
    try:
        text = list_path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise LoupeError(f"Cannot read the list file {list_path.name}: {exc}") from None
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.rsplit(maxsplit=1)
        if len(fields) != 2:
            raise LoupeError(f"{list_path.name} line {number}: expected `path label`, got {line!r}.")
        path = (list_path.parent / fields[0]).resolve()
        items.append(ImportItem(path.name, _bounded_reader(path), fields[1]))
    return items


def items_from_path(path: str | Path) -> list[ImportItem]:
    """A server-side source: a folder in ImageFolder layout, or a list file of `path label` lines."""
    path = Path(path).expanduser()
    if path.is_file():
        return items_from_list_file(path)
    return items_from_folder(path)

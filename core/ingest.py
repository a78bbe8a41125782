"""Untrusted bytes in, clean catalog images out: validate, normalise, hash, store, thumbnail.

Every file is decided on its own and reported (added / duplicate / conflict / rejected / skipped, with
the reason); one bad file never stops a batch. A catalog row is only committed once the files it points
to are synced to disk, so a crash leaves at worst files without rows, which the next start-up sweeps.

Importing is `upload` (labellers and admins), which covers the labels, classes and pinned splits an
import brings for the images it adds; a path on the server's own disk is also `import_server_disk`
(admins) and must lie below the folders the server imports from (`items_from_path`'s `roots`). Each
import leaves one entry in the audit log, with its counts.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
import struct
import tempfile
import threading
import unicodedata
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Callable, Iterable

from sqlite_utils import Database

from core import audit, catalog
from core.auth import Actor, authorize, check_import_path
from core.errors import LoupeError
from core.images import ALLOWED_FORMATS, MAX_FILE_BYTES, decode_image, thumbnail_jpeg
from core.perceptual_hash import thumbnail_hash_columns
from core.workspace import (
    TEMP_PREFIX,
    Workspace,
    decode_budget_bytes,
    import_lock,
    read_only_message,
    sync_to_disk,
    workspace_writes,
)

# What one archive may hold, read from its central directory before any entry is decompressed.
MAX_ZIP_MEMBERS = 100_000
MAX_ZIP_TOTAL_BYTES = 20 * 2**30
MAX_LIST_FILE_BYTES = 50 * 2**20
# Files are synced and their rows committed this many images at a time.
SYNC_BATCH = 64
ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")
_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature, then the name and extra field lengths

# outcome status -> the summary's name for it
SUMMARY_NAMES = {
    "added": "added",
    "duplicate": "duplicates",
    "conflict": "conflicts",
    "rejected": "rejected",
    "skipped": "skipped",
}


@dataclass
class IngestOutcome:
    name: str
    status: str  # a key of SUMMARY_NAMES
    image_id: int | None = None
    reason: str = ""


@dataclass
class ImportItem:
    """One file to import: its name as the user gave it, how to read it, and its label if known.

    `verdict` ("rejected" or "skipped", with `reason`) decides an item from its name alone; it is never read.
    """

    name: str
    read: Callable[[], bytes] | None = None
    label: str | None = None
    split: str | None = None
    verdict: str | None = None
    reason: str = ""


def clean_original_name(name: str) -> str:
    """A display name only: the last path component, printable, bounded. Never used as a path."""
    base = re.split(r"[\\/]", str(name))[-1]
    base = "".join(ch for ch in base if unicodedata.category(ch)[0] != "C").strip()
    return base[:200] or "unnamed"


def _write_unsynced(path: Path, data: bytes) -> None:
    # Written under a temporary name and renamed, so a file is either whole or absent; the batch
    # syncs it before any row points at it.
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=TEMP_PREFIX)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@dataclass
class _Pending:
    outcome: IngestOutcome
    row: dict
    label: str | None
    split: str | None
    files: list[Path]


class _Batch:
    """Images whose files are written but not yet synced, and the rows that will point at them.

    Syncing file by file and committing row by row halves import speed; a batch syncs its files,
    then their folders, then commits all its rows in one transaction.
    """

    def __init__(self, ws: Workspace, db: Database, actor: Actor) -> None:
        self.ws, self.db, self.actor = ws, db, actor
        self.pending: list[_Pending] = []

    def __len__(self) -> int:
        return len(self.pending)

    def __enter__(self) -> _Batch:
        return self

    def __exit__(self, kind, value, traceback) -> None:
        if kind is None:
            self.commit()
            return
        # Interrupted (Ctrl-C, a click on the page) or failed on a later file: the images already whole
        # on disk are still kept when the catalog takes them; the first error is the one reported.
        with contextlib.suppress(Exception):
            self.commit()

    def holds(self, sha256: str) -> bool:
        return any(p.row["sha256"] == sha256 for p in self.pending)

    def add(self, pending: _Pending) -> None:
        self.pending.append(pending)

    def commit(self) -> None:
        if not self.pending:
            return
        try:
            with workspace_writes(self.ws):
                sync_to_disk(path for p in self.pending for path in p.files)
                with catalog.write_transaction(self.db):
                    for p in self.pending:
                        self._insert(p)
        except BaseException:
            self.discard()
            raise
        self.pending.clear()

    def _insert(self, p: _Pending) -> None:
        image_id = catalog.insert_new_image(self.db, p.row, actor=self.actor, split=p.split)
        if image_id is None:
            # Another import stored the same bytes since this one looked: a duplicate after all.
            existing = catalog.find_image_by_sha256(self.db, p.row["sha256"])
            settled = _settle_duplicate(self.db, p.outcome.name, existing["id"], p.label, self.actor)
            p.outcome.status, p.outcome.image_id, p.outcome.reason = settled.status, settled.image_id, settled.reason
            return
        p.outcome.image_id = image_id
        if p.label:
            catalog.label_imported_image(self.db, image_id, p.label, actor=self.actor)

    def discard(self) -> None:
        for p in self.pending:
            _remove_unless_catalogued(self.db, p)
        self.pending.clear()


def _remove_unless_catalogued(db: Database, pending: _Pending) -> None:
    # Files are content-addressed: another import may have stored the same bytes meanwhile, keep those.
    if catalog.find_image_by_sha256(db, pending.row["sha256"]) is None:
        for path in pending.files:
            path.unlink(missing_ok=True)


def _settle_duplicate(db: Database, name: str, image_id: int, label: str | None, actor: Actor) -> IngestOutcome:
    """A copy of catalog image #image_id: it may label the image, or disagree with its label."""
    current = catalog.get_image(db, image_id)["label"]
    if label and current is None:
        catalog.label_imported_image(db, image_id, label, actor=actor)
    elif label and label != current:
        catalog.add_import_conflict(db, image_id, label, source_name=name, actor=actor)
        return IngestOutcome(
            name, "conflict", image_id, f"duplicate of #{image_id}, labelled {current}; this copy says {label}"
        )
    return IngestOutcome(name, "duplicate", image_id, f"duplicate of #{image_id}")


def ingest_bytes(
    ws: Workspace,
    db: Database,
    data: bytes,
    original_name: str,
    label: str | None = None,
    split: str | None = None,
    *,
    actor: Actor,
    batch: _Batch | None = None,
) -> IngestOutcome:
    """Decide one file. Without a `batch` its row is committed before this returns (one audited
    upload); with one, when the batch commits (the outcome's image_id is filled in then)."""
    authorize(actor, "upload")
    if batch is None:
        with workspace_writes(ws), import_lock(ws):
            with _Batch(ws, db, actor) as own:
                outcome = ingest_bytes(ws, db, data, original_name, label, split, actor=actor, batch=own)
            audit.record_import(db, actor, source="upload", counts=summarise([outcome]))
        return outcome
    name = clean_original_name(original_name)
    try:
        label = catalog.clean_class_name(label) if label else None
        if label:
            catalog.check_labelling_class(db, label, actor=actor)
    except LoupeError as exc:
        return IngestOutcome(name, "rejected", reason=f"its folder cannot be a class: {exc}")
    sha256 = hashlib.sha256(data).hexdigest()
    if batch.holds(sha256):
        batch.commit()
    existing = catalog.find_image_by_sha256(db, sha256)
    if existing:
        # A label is read and written at once: another import may be labelling the same image.
        with catalog.write_transaction(db) if label else contextlib.nullcontext():
            return _settle_duplicate(db, name, existing["id"], label, actor)
    try:
        decoded = decode_image(data, budget_bytes=decode_budget_bytes(db))
    except LoupeError as exc:
        return IngestOutcome(name, "rejected", reason=str(exc))

    ext = ALLOWED_FORMATS[decoded.format]
    image_rel = Path("images") / sha256[:2] / f"{sha256}.{ext}"
    thumb_rel = Path("thumbs") / sha256[:2] / f"{sha256}.jpg"
    outcome = IngestOutcome(name, "added")
    thumbnail = thumbnail_jpeg(decoded.rgb)
    pending = _Pending(
        outcome,
        {
            "sha256": sha256,
            "path": image_rel.as_posix(),
            "thumb_path": thumb_rel.as_posix(),
            "width": decoded.width,
            "height": decoded.height,
            "format": decoded.format,
            "original_name": name,
            **thumbnail_hash_columns(thumbnail),
        },
        label,
        split,
        [],
    )
    try:
        with workspace_writes(ws):
            for rel, payload in ((image_rel, data), (thumb_rel, thumbnail)):
                _write_unsynced(ws.root / rel, payload)
                pending.files.append(ws.root / rel)
    except BaseException:
        _remove_unless_catalogued(db, pending)
        raise
    batch.add(pending)
    return outcome


def ingest_items(
    ws: Workspace,
    db: Database,
    items: Iterable[ImportItem],
    *,
    actor: Actor,
    source: str,
    on_progress: Callable[[int], None] | None = None,
    cancel: threading.Event | None = None,
) -> list[IngestOutcome]:
    """Import each item in turn; `on_progress(done)` after each. Setting `cancel` stops before the next
    item: what was imported stays, and the outcomes so far are returned. `source` says where the items
    came from in the audit log ("upload", "zip", "server disk", "command line")."""
    authorize(actor, "upload")
    if ws.read_only:
        raise LoupeError(read_only_message(ws))
    outcomes = []
    with workspace_writes(ws), import_lock(ws):
        try:
            with _Batch(ws, db, actor) as batch:
                for done, item in enumerate(items, start=1):
                    if cancel is not None and cancel.is_set():
                        break
                    outcomes.append(_ingest_item(ws, db, item, actor, batch))
                    if len(batch) >= SYNC_BATCH:
                        batch.commit()
                    if on_progress:
                        on_progress(done)
        finally:
            # An interrupted import is still recorded, with what it had decided.
            audit.record_import(db, actor, source=source, counts=summarise(outcomes))
    return outcomes


def _ingest_item(ws: Workspace, db: Database, item: ImportItem, actor: Actor, batch: _Batch) -> IngestOutcome:
    name = clean_original_name(item.name)
    if item.verdict:
        return IngestOutcome(name, item.verdict, reason=item.reason)
    try:
        data = item.read()
    except OSError as exc:
        # strerror only: the full message would show the server's path to the file.
        return IngestOutcome(name, "rejected", reason=f"cannot read: {exc.strerror or exc}")
    return ingest_bytes(ws, db, data, item.name, item.label, item.split, actor=actor, batch=batch)


def is_zip(data: bytes) -> bool:
    return data[:4] in ZIP_MAGIC


def ingest_upload(ws: Workspace, db: Database, name: str, data: bytes, *, actor: Actor) -> list[IngestOutcome]:
    """One file from the browser: a zip (by its content, whatever its name) is unpacked and each entry
    decided on its own."""
    authorize(actor, "upload")
    if not is_zip(data) and not name.lower().endswith(".zip"):
        return ingest_items(ws, db, [ImportItem(name, lambda: data)], actor=actor, source="upload")
    try:
        items = items_from_zip(data)
    except LoupeError as exc:
        return [IngestOutcome(clean_original_name(name), "rejected", reason=str(exc))]
    return ingest_items(ws, db, items, actor=actor, source="zip")


def summarise(outcomes: Iterable[IngestOutcome]) -> dict[str, int]:
    counts = dict.fromkeys(SUMMARY_NAMES.values(), 0)
    for outcome in outcomes:
        counts[SUMMARY_NAMES[outcome.status]] += 1
    return counts


# ---------------------------------------------------------------- sources


def unsafe_name_reason(name: str) -> str | None:
    """Why an archive member's name cannot be taken as a relative path, or None when it can."""
    if "\\" in name:
        return "its name contains a backslash"
    if name.startswith("/"):
        return "its name is an absolute path"
    if re.match(r"[A-Za-z]:", name):
        return "its name starts with a drive letter"
    if ".." in PurePosixPath(name).parts:
        return "its name climbs out of the archive (..)"
    if any(unicodedata.category(ch) == "Cc" for ch in name):
        return "its name contains control characters"
    return None


def _label_and_split(paths: list[PurePosixPath]) -> list[tuple[str | None, str | None]]:
    """ImageFolder semantics: `<class>/<img>` or `<split>/<class>/<img>`, below one optional wrapper folder.

    A path that is absolute or climbs (`..`) names no class: its folders are not the user's folders.
    """
    usable = [not p.is_absolute() and ".." not in p.parts for p in paths]
    parts = [tuple(part for part in p.parts if part != ".") if ok else () for p, ok in zip(paths, usable)]
    while (
        any(usable)
        and all(len(p) >= 3 for p, ok in zip(parts, usable) if ok)
        and len({p[0] for p, ok in zip(parts, usable) if ok}) == 1
        and next(p for p, ok in zip(parts, usable) if ok)[0] not in catalog.SPLITS
    ):
        parts = [p[1:] if ok else p for p, ok in zip(parts, usable)]
    result = []
    for p in parts:
        if len(p) >= 3 and p[0] in catalog.SPLITS:
            result.append((p[-2], p[0]))
        elif len(p) >= 2:
            result.append((p[-2], None))
        else:
            result.append((None, None))
    return result


def _hidden_reason(path: PurePosixPath) -> str | None:
    if any(part == "__MACOSX" for part in path.parts):
        return "macOS metadata (__MACOSX), not a picture"
    if any(part.startswith(".") and part not in (".", "..") for part in path.parts):
        return "hidden file"
    return None


def _bounded_reader(path: Path) -> Callable[[], bytes]:
    def read() -> bytes:
        if path.stat().st_size > MAX_FILE_BYTES:
            raise OSError(0, f"file larger than {MAX_FILE_BYTES // 2**20} MB")
        return path.read_bytes()

    return read


def _absolute_source(path: str | Path) -> Path:
    # What a person typed: the server's working folder means nothing to someone typing in a browser,
    # and an empty path would be that folder, so only full paths are taken.
    if not str(path).strip():
        raise LoupeError("Type the full path of a folder, a .zip or a list file to import.")
    path = Path(path).expanduser()
    if not path.is_absolute():
        raise LoupeError(f"{path} is a relative path: type the full path (starting with / or ~).")
    return path


def items_from_folder(
    root: str | Path,
    *,
    on_progress: Callable[[int], None] | None = None,
    cancel: threading.Event | None = None,
) -> list[ImportItem]:
    """Every file below `root` (ImageFolder layout), hidden files and symbolic links listed as skipped.

    `on_progress(found)` reports the scan as it goes; setting `cancel` stops it with a LoupeError.
    """
    root = Path(root)
    if not root.is_dir():
        raise LoupeError(f"{root} is not a folder.")
    files: list[Path] = []
    skipped: list[ImportItem] = []
    for folder, subfolders, names in os.walk(root):
        if cancel is not None and cancel.is_set():
            raise LoupeError("The folder scan was cancelled: nothing was imported.")
        folder = Path(folder)
        for sub in list(subfolders):
            path = folder / sub
            reason = _hidden_reason(PurePosixPath(sub)) or ("symbolic link" if path.is_symlink() else None)
            if reason:
                subfolders.remove(sub)  # not walked into
                skipped.append(ImportItem(sub, verdict="skipped", reason=f"{reason} (folder)"))
        for name in names:
            path = folder / name
            reason = _hidden_reason(PurePosixPath(name)) or ("symbolic link" if path.is_symlink() else None)
            if reason:
                skipped.append(ImportItem(name, verdict="skipped", reason=reason))
            elif path.is_file():
                files.append(path)
            else:
                skipped.append(ImportItem(name, verdict="skipped", reason="not a regular file"))
        if on_progress:
            on_progress(len(files))
    files.sort()
    rel = [PurePosixPath(p.relative_to(root).as_posix()) for p in files]
    return skipped + [
        ImportItem(path.name, _bounded_reader(path), label, split)
        for path, (label, split) in zip(files, _label_and_split(rel))
    ]


def zip_members(archive: zipfile.ZipFile) -> list[zipfile.ZipInfo]:
    """The archive's entries once their count, declared sizes and byte ranges are checked, from the
    central directory and the local headers, before any entry is decompressed.

    Entries whose data overlap (many names over one compressed stream) are a zip bomb: refused whole.
    """
    infos = archive.infolist()
    if len(infos) > MAX_ZIP_MEMBERS:
        raise LoupeError(f"The .zip file has {len(infos):,} entries, more than {MAX_ZIP_MEMBERS:,}: split it.")
    if sum(info.file_size for info in infos) > MAX_ZIP_TOTAL_BYTES:
        raise LoupeError(f"The .zip file unpacks to more than {MAX_ZIP_TOTAL_BYTES // 2**30} GB: split it.")
    end_of_previous = 0
    for info in sorted(infos, key=lambda i: i.header_offset):
        if info.header_offset < end_of_previous:
            raise LoupeError("The .zip file's entries overlap each other (a zip bomb): nothing was taken from it.")
        archive.fp.seek(info.header_offset)
        header = archive.fp.read(_LOCAL_HEADER.size)
        if len(header) < _LOCAL_HEADER.size or _LOCAL_HEADER.unpack(header)[0] != ZIP_MAGIC[0]:
            raise LoupeError("The .zip file is damaged (an entry's header is missing).")
        _, name_length, extra_length = _LOCAL_HEADER.unpack(header)
        end_of_previous = info.header_offset + _LOCAL_HEADER.size + name_length + extra_length + info.compress_size
    return infos


def open_zip(source: bytes | Path | BinaryIO) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(io.BytesIO(source) if isinstance(source, bytes) else source)
    except (zipfile.BadZipFile, ValueError, EOFError):
        raise LoupeError("The .zip file is damaged or not a zip archive.") from None


def items_from_zip(source: bytes | Path) -> list[ImportItem]:
    """Each file entry of a zip, in archive order; names that cannot be taken are rejected, hidden ones skipped."""
    archive = open_zip(source)
    entries = [info for info in zip_members(archive) if not info.is_dir()]
    verdicts: list[tuple[str, str] | None] = []
    for info in entries:
        if reason := unsafe_name_reason(info.filename):
            verdicts.append(("rejected", f"unsafe name in the archive: {reason}"))
        elif reason := _hidden_reason(PurePosixPath(info.filename)):
            verdicts.append(("skipped", reason))
        elif info.file_size > MAX_FILE_BYTES:
            verdicts.append(("rejected", f"zip entry larger than {MAX_FILE_BYTES // 2**20} MB"))
        elif info.flag_bits & 0x1:
            verdicts.append(("rejected", "encrypted zip entry"))
        else:
            verdicts.append(None)
    taken = [info for info, verdict in zip(entries, verdicts) if verdict is None]
    labels = iter(_label_and_split([PurePosixPath(info.filename) for info in taken]))
    items = []
    for info, verdict in zip(entries, verdicts):
        if verdict:
            items.append(ImportItem(info.filename, verdict=verdict[0], reason=verdict[1]))
            continue

        def read(info: zipfile.ZipInfo = info) -> bytes:
            try:
                with archive.open(info) as f:
                    return f.read(MAX_FILE_BYTES + 1)
            except (zipfile.BadZipFile, NotImplementedError, RuntimeError, EOFError, zlib.error) as exc:
                # Damaged or exotically compressed entries: reject this entry, keep the batch.
                raise OSError(0, f"unreadable zip entry: {exc}") from None

        label, split = next(labels)
        items.append(ImportItem(info.filename, read, label, split))
    return items


def items_from_list_file(list_path: str | Path, *, roots: Iterable[str | Path] | None = None) -> list[ImportItem]:
    """`path label` lines (paths relative to the list file); blank lines and # comments skipped.

    With `roots`, a listed file that does not lie below one of them is rejected unread."""
    roots = None if roots is None else list(roots)
    list_path = Path(list_path)
    try:
        if list_path.stat().st_size > MAX_LIST_FILE_BYTES:
            raise LoupeError(f"The list file {list_path.name} is larger than {MAX_LIST_FILE_BYTES // 2**20} MB.")
        text = list_path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise LoupeError(f"Cannot read the list file {list_path.name}: {exc.strerror}.") from None
    except UnicodeDecodeError:
        raise LoupeError(f"Cannot read the list file {list_path.name}: it is not UTF-8 text.") from None
    items = []
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.rsplit(maxsplit=1)
        if len(fields) != 2:
            # Never quote the line: the "list file" may be any file on the server.
            raise LoupeError(f"{list_path.name}: line {number} is not `path label`.")
        path = (list_path.parent / fields[0]).resolve()
        if roots is not None:
            try:
                check_import_path(path, roots)
            except LoupeError as exc:
                items.append(ImportItem(path.name, verdict="rejected", reason=str(exc)))
                continue
        items.append(ImportItem(path.name, _bounded_reader(path), fields[1]))
    return items


def items_from_path(
    path: str | Path,
    *,
    actor: Actor,
    roots: Iterable[str | Path] | None,
    on_progress: Callable[[int], None] | None = None,
    cancel: threading.Event | None = None,
) -> list[ImportItem]:
    """A server-side source, by its full path: a folder in ImageFolder layout, a .zip (known by its
    content), or a list file of `path label` lines.

    The path is resolved and must lie below one of `roots` (the folders the server imports from, see
    `core.serve.import_roots`), and so must every file a list names. `roots=None` lifts that limit: only
    for the `loupe` command, run by the machine's own user, who can read those files anyway."""
    authorize(actor, "import_server_disk")
    roots = None if roots is None else list(roots)
    path = _absolute_source(path) if roots is None else check_import_path(_absolute_source(path), roots)
    if path.is_file():
        try:
            with open(path, "rb") as f:
                magic = f.read(4)
        except OSError as exc:
            raise LoupeError(f"Cannot read {path}: {exc.strerror}.") from None
        return items_from_zip(path) if is_zip(magic) else items_from_list_file(path, roots=roots)
    return items_from_folder(path, on_progress=on_progress, cancel=cancel)

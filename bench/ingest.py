"""Import speed on hymenoptera, the CPU cost of refusing an overlapping-entry zip bomb, and the
Label page's grid render time with a 20,000-image catalog.

    python bench/ingest.py

Prints `name: value` lines. The import figure includes syncing every image and thumbnail to disk
before its catalog row commits. Without ../shared/datasets/hymenoptera the import figure is skipped
(with a message) and the grid figures are still measured.
"""

from __future__ import annotations

import hashlib
import io
import os
import statistics
import struct
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from core import catalog, images, ingest  # noqa: E402
from core.auth import ADMIN, Actor  # noqa: E402
from core.errors import LoupeError  # noqa: E402
from core.workspace import connect, open_workspace  # noqa: E402

HYMENOPTERA = ROOT.parent / "shared" / "datasets" / "hymenoptera"
CATALOG_SIZE = 20_000
CLASSES = ["ants", "bees", "wasps", "flies"]
STEADY_RERUNS = 5
BENCH_ACTOR = Actor("bench", ADMIN)


def bench_ingest(scratch: Path) -> None:
    if not HYMENOPTERA.is_dir():
        print(f"skipped ingest: {HYMENOPTERA} is absent")
        return
    ws = open_workspace(scratch / "hymenoptera")
    db = connect(ws)
    items = ingest.items_from_folder(HYMENOPTERA)
    syncing = []
    sync_to_disk = ingest.sync_to_disk

    def timed_sync(paths) -> None:
        start = time.perf_counter()
        sync_to_disk(paths)
        syncing.append(time.perf_counter() - start)

    ingest.sync_to_disk = timed_sync  # how much of the import is spent making it durable
    start = time.perf_counter()
    try:
        outcomes = ingest.ingest_items(ws, db, items, actor=BENCH_ACTOR, source="server disk")
    finally:
        ingest.sync_to_disk = sync_to_disk
    seconds = time.perf_counter() - start
    counts = ingest.summarise(outcomes)
    print(f"ingest_files: {len(items)}")
    for name, count in counts.items():
        print(f"ingest_{name}: {count}")
    print(f"ingest_seconds: {seconds:.2f}")
    print(f"ingest_sync_seconds: {sum(syncing):.2f}")
    print(f"ingest_images_per_s: {len(items) / seconds:.1f}")
    print(f"ingest_cpu_count: {os.cpu_count()}")
    print(f"ingest_load_average_1min: {os.getloadavg()[0]:.2f}")


def overlapping_zip(records: int = 20, stream_mb: int = 199) -> bytes:
    """A small zip whose `records` central directory entries all point at one deflated stream of zeros."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("ants/0000.png", b"\0" * (stream_mb * 2**20))
    data = out.getvalue()
    end = data.rfind(b"PK\x05\x06")
    size, offset = struct.unpack("<II", data[end + 12 : end + 20])
    record = data[offset : offset + size]
    name_length = len("ants/0000.png")
    directory = b"".join(
        record[:46] + f"ants/{n:04}.png".encode() + record[46 + name_length :] for n in range(records)
    )
    tail = bytearray(data[end:])
    struct.pack_into("<HHII", tail, 8, records, records, len(directory), offset)
    return data[:offset] + directory + bytes(tail)


def bench_zip_refusal() -> None:
    data = overlapping_zip()
    start = time.process_time()
    try:
        ingest.items_from_zip(data)
    except LoupeError:
        pass
    else:
        raise SystemExit("the overlapping zip was not refused")
    print(f"overlapping_zip_bytes: {len(data)}")
    print(f"overlapping_zip_refusal_cpu_ms: {(time.process_time() - start) * 1000:.2f}")


def generated_catalog(root: Path) -> Path:
    """CATALOG_SIZE image rows sharing one small thumbnail; three quarters labelled, with splits."""
    ws = open_workspace(root)
    thumb = Path("thumbs") / "shared.jpg"
    buffer = io.BytesIO()
    Image.new("RGB", (images.THUMB_SIZE, images.THUMB_SIZE * 3 // 4), (120, 150, 90)).save(buffer, format="JPEG")
    (ws.root / thumb).write_bytes(buffer.getvalue())
    db = connect(ws)
    with db.atomic():
        class_ids = [catalog.add_class(db, name, actor=BENCH_ACTOR) for name in CLASSES]
        added = catalog.now()
        db.conn.executemany(
            "INSERT INTO images (id, sha256, path, thumb_path, width, height, format, original_name, added_at) "
            "VALUES (?, ?, ?, ?, 256, 192, 'JPEG', ?, ?)",
            [
                (n, hashlib.sha256(str(n).encode()).hexdigest(), thumb.as_posix(), thumb.as_posix(),
                 f"img_{n:05}.jpg", added)
                for n in range(1, CATALOG_SIZE + 1)
            ],
        )
        labelled = [n for n in range(1, CATALOG_SIZE + 1) if n % 4]
        db.conn.executemany(
            "INSERT INTO labels (image_id, class_id, labelled_by, labelled_at) VALUES (?, ?, 'bench', ?)",
            [(n, class_ids[n % len(class_ids)], added) for n in labelled],
        )
        db.conn.executemany(
            "INSERT INTO splits (image_id, split) VALUES (?, ?)",
            [(n, catalog.SPLITS[n % 7 // 5]) for n in labelled],
        )
    db.close()
    return ws.root


def bench_grid(scratch: Path) -> None:
    os.environ["LOUPE_WORKSPACE"] = str(generated_catalog(scratch / "grid"))
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(ROOT / "dashboard" / "app.py"), default_timeout=120).run()
    at.switch_page("../pages/label.py")
    start = time.perf_counter()
    at.run()
    first = time.perf_counter() - start
    if at.exception or not at.get("pagination"):
        raise SystemExit(f"the grid did not render: {[e.value for e in at.exception]}")

    def steady(setup=lambda: None) -> float:
        setup()
        at.run()
        timings = []
        for _ in range(STEADY_RERUNS):
            start = time.perf_counter()
            at.run()
            timings.append(time.perf_counter() - start)
        return statistics.median(timings)

    print(f"grid_first_render_s_at_{CATALOG_SIZE}: {first:.3f}")
    print(f"grid_render_s_at_{CATALOG_SIZE}: {steady():.3f}")
    print(f"grid_last_page_render_s_at_{CATALOG_SIZE}: "
          f"{steady(lambda: at.get('pagination')[0].select(CATALOG_SIZE // 48 + 1)):.3f}")
    print(f"grid_unlabelled_filter_render_s_at_{CATALOG_SIZE}: "
          f"{steady(lambda: at.selectbox(key='grid_class').select('Unlabelled')):.3f}")


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="loupe-bench-") as scratch:
        bench_ingest(Path(scratch))
        bench_zip_refusal()
        bench_grid(Path(scratch))


if __name__ == "__main__":
    main()

import io
import struct
import zipfile
import zlib
from pathlib import Path, PurePosixPath

import numpy as np
import pytest
from PIL import Image

from core import catalog, images, ingest
from core.auth import ADMIN, Actor
from core.errors import LoupeError
from tests.conftest import TESTER, image_bytes, require_dataset


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(side: int) -> bytes:
    """A 1-bit PNG claiming side x side pixels whose data compresses to almost nothing."""
    row = b"\x00" + b"\x00" * ((side + 7) // 8)
    compressor = zlib.compressobj(9)
    data = b"".join(compressor.compress(row) for _ in range(64)) + compressor.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", data) + png_chunk(b"IEND", b"")


def cmyk_jpeg() -> bytes:
    out = io.BytesIO()
    Image.new("CMYK", (32, 24), (0, 255, 255, 0)).save(out, format="JPEG")
    return out.getvalue()


def png16() -> bytes:
    values = np.zeros((16, 32), dtype=np.uint16)
    values[:, 16:] = 65535
    out = io.BytesIO()
    Image.fromarray(values).save(out, format="PNG")
    return out.getvalue()


def palette_png_with_transparency() -> bytes:
    img = Image.new("P", (20, 20), 0)
    img.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    img.paste(1, (10, 0, 20, 20))
    out = io.BytesIO()
    img.save(out, format="PNG", transparency=0)
    return out.getvalue()


def animated_gif() -> bytes:
    frames = [Image.new("RGB", (24, 16), color) for color in [(255, 0, 0), (0, 255, 0), (0, 0, 255)]]
    out = io.BytesIO()
    frames[0].save(out, format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return out.getvalue()


def saved(fmt: str, **save_args) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (30, 20), (200, 0, 0)).save(out, format=fmt, **save_args)
    return out.getvalue()


def exif_rotated_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    out = io.BytesIO()
    Image.new("RGB", (40, 20), (10, 200, 10)).save(out, format="JPEG", exif=exif)
    return out.getvalue()


HOSTILE_CORPUS = {
    # name: (bytes, expected status, words the rejection reason contains)
    "not_an_image.jpg": (b"<html>this is not a photo</html>" * 10, "rejected", "not an image"),
    "truncated.jpg": (image_bytes((9, 9, 9), size=(64, 64), fmt="JPEG")[:300], "rejected", "truncated"),
    "bomb.png": (bomb_png(20_000), "rejected", "decompression bomb"),
    # Just past the default decode budget: 16384 x 16384 one-byte pixels are exactly 256 MB.
    "bomb_just_over.png": (bomb_png(16_385), "rejected", "exceeds"),
    "cmyk.jpg": (cmyk_jpeg(), "added", ""),
    "sixteen_bit.png": (png16(), "added", ""),
    "palette_alpha.png": (palette_png_with_transparency(), "added", ""),
    "animated.gif": (animated_gif(), "added", ""),
    "rotated.jpg": (exif_rotated_jpeg(), "added", ""),
    "empty.jpg": (b"", "rejected", "empty"),
    "../../evil.jpg": (image_bytes((1, 2, 3)), "added", ""),
    "photo.pdf.jpg": (b"%PDF-1.4\n" + b"0" * 200, "rejected", "not an image"),
    "camera.jpg": (saved("MPO", save_all=True, append_images=[Image.new("RGB", (30, 20))]), "added", ""),
    "postscript.png": (saved("EPS"), "rejected", "not an image"),
    "icon.png": (saved("ICO"), "rejected", "not an image"),
}


def assert_catalog_consistent(ws, db) -> None:
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    rows = list(db.query("SELECT path, thumb_path FROM images"))
    expected = {r["path"] for r in rows} | {r["thumb_path"] for r in rows}
    on_disk = {
        p.relative_to(ws.root).as_posix()
        for folder in (ws.images_dir, ws.thumbs_dir)
        for p in folder.rglob("*")
        if p.is_file()
    }
    assert on_disk == expected


def test_hostile_corpus_each_file_gets_the_right_outcome(workspace, db, tmp_path):
    items = [ingest.ImportItem(name, lambda data=data: data) for name, (data, _, _) in HOSTILE_CORPUS.items()]
    outcomes = ingest.ingest_items(workspace, db, items, actor=TESTER, source="upload")
    for (name, (_, status, reason)), outcome in zip(HOSTILE_CORPUS.items(), outcomes):
        assert outcome.status == status, (name, outcome)
        assert reason in outcome.reason, (name, outcome)
    assert_catalog_consistent(workspace, db)
    # a hostile name is only a display name: nothing was written outside the workspace
    assert not (tmp_path / "evil.jpg").exists() and not (workspace.root.parent.parent / "evil.jpg").exists()
    names = {r["original_name"] for r in db.query("SELECT original_name FROM images")}
    assert "evil.jpg" in names and not any("/" in n or ".." in n for n in names)


def test_hostile_images_are_normalised_to_rgb(workspace, db):
    def decoded(name):
        return images.decode_image(HOSTILE_CORPUS[name][0])

    cmyk = decoded("cmyk.jpg")
    assert cmyk.rgb.mode == "RGB" and cmyk.format == "JPEG"
    assert cmyk.rgb.getpixel((5, 5))[0] > 200 and cmyk.rgb.getpixel((5, 5))[1] < 60
    sixteen = np.asarray(decoded("sixteen_bit.png").rgb)
    assert sixteen[0, 0].tolist() == [0, 0, 0] and sixteen[0, 31].tolist() == [255, 255, 255]
    palette = decoded("palette_alpha.png").rgb
    assert palette.getpixel((2, 2)) == (255, 255, 255) and palette.getpixel((15, 2)) == (0, 0, 255)
    gif = decoded("animated.gif")
    assert (gif.format, gif.width, gif.height) == ("GIF", 24, 16)
    assert gif.rgb.getpixel((1, 1))[0] > 200
    camera = decoded("camera.jpg")
    assert camera.format == "JPEG" and camera.rgb.getpixel((1, 1)) == (200, 0, 0)
    rotated = decoded("rotated.jpg")
    assert (rotated.width, rotated.height) == (20, 40)


def test_added_image_keeps_original_bytes_and_thumbnail(workspace, db):
    data = HOSTILE_CORPUS["rotated.jpg"][0]
    outcome = ingest.ingest_bytes(workspace, db, data, "rotated.jpg", actor=TESTER)
    row = catalog.get_image(db, outcome.image_id)
    assert (workspace.root / row["path"]).read_bytes() == data
    assert (row["width"], row["height"], row["format"]) == (20, 40, "JPEG")
    with Image.open(workspace.root / row["thumb_path"]) as thumb:
        assert thumb.format == "JPEG" and thumb.size == (20, 40)
    assert images.open_image_rgb(workspace.root / row["path"]).size == (20, 40)
    with Image.open(io.BytesIO(images.preview_jpeg(workspace.root / row["path"], max_side=10))) as preview:
        assert max(preview.size) == 10


def test_duplicates_are_reported_not_stored_twice(workspace, db):
    data = image_bytes((5, 5, 5))
    first = ingest.ingest_bytes(workspace, db, data, "a.png", actor=TESTER)
    second = ingest.ingest_bytes(workspace, db, data, "copy of a.png", label="ants", actor=TESTER)
    assert first.status == "added"
    assert (second.status, second.image_id) == ("duplicate", first.image_id)
    assert second.reason == f"duplicate of #{first.image_id}"
    assert catalog.count_images(db) == 1
    # a duplicate arriving with a label labels the unlabelled original
    assert catalog.get_image(db, first.image_id)["label"] == "ants"
    assert_catalog_consistent(workspace, db)


def test_failed_catalog_write_leaves_no_files(workspace, db, monkeypatch):
    def broken_insert(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(catalog, "insert_new_image", broken_insert)
    with pytest.raises(RuntimeError):
        ingest.ingest_bytes(workspace, db, image_bytes((7, 7, 7)), "a.png", actor=TESTER)
    assert_catalog_consistent(workspace, db)
    assert catalog.count_images(db) == 0


def make_zip(entries: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    return out.getvalue()


def test_zip_upload_labels_by_folder_and_pins_splits(workspace, db):
    data = make_zip(
        {
            "dataset/train/ants/a.png": image_bytes((1, 0, 0)),
            "dataset/train/bees/b.png": image_bytes((2, 0, 0)),
            "dataset/val/ants/c.png": image_bytes((3, 0, 0)),
            "dataset/test/bees/d.png": image_bytes((4, 0, 0)),
            "__MACOSX/dataset/train/ants/._a.png": b"resource fork",
            "dataset/train/ants/notes.txt": b"not an image",
        }
    )
    outcomes = ingest.ingest_upload(workspace, db, "dataset.zip", data, actor=TESTER)
    assert ingest.summarise(outcomes) == {"added": 4, "duplicates": 0, "conflicts": 0, "rejected": 1, "skipped": 1}
    rows = db.query(
        "SELECT original_name, classes.name AS label, split, pinned FROM images "
        "JOIN labels ON labels.image_id = images.id JOIN classes ON classes.id = labels.class_id "
        "JOIN splits ON splits.image_id = images.id"
    )
    assert {r["original_name"]: (r["label"], r["split"], r["pinned"]) for r in rows} == {
        "a.png": ("ants", "train", 1), "b.png": ("bees", "train", 1),
        "c.png": ("ants", "val", 1), "d.png": ("bees", "test", 1),
    }
    assert_catalog_consistent(workspace, db)


def test_zip_entries_with_names_that_cannot_be_taken_are_rejected_with_the_reason(workspace, db):
    data = make_zip({
        "../../evil.jpg": image_bytes((8, 1, 1)),
        "/abs/cats/x.png": image_bytes((8, 2, 2)),
        "C:/photos/cats/y.png": image_bytes((8, 3, 3)),
        "photos\\cats\\z.png": image_bytes((8, 4, 4)),
        "photos/dogs/fine.png": image_bytes((8, 5, 5)),
    })
    outcomes = ingest.ingest_upload(workspace, db, "evil.zip", data, actor=TESTER)
    assert [o.status for o in outcomes] == ["rejected"] * 4 + ["added"]
    reasons = [o.reason for o in outcomes[:4]]
    assert all(r.startswith("unsafe name in the archive") for r in reasons)
    for reason, words in zip(reasons, ["(..)", "absolute path", "drive letter", "backslash"]):
        assert words in reason
    assert catalog.class_names(db) == ["dogs"] and catalog.count_images(db) == 1
    assert not (workspace.root.parent / "evil.jpg").exists()
    assert_catalog_consistent(workspace, db)


def test_a_damaged_zip_is_rejected_as_one_file(workspace, db):
    [damaged] = ingest.ingest_upload(workspace, db, "broken.zip", b"PK\x03\x04 not really", actor=TESTER)
    assert damaged.status == "rejected" and "zip" in damaged.reason
    assert_catalog_consistent(workspace, db)


def test_damaged_zip_entry_is_rejected_alone(workspace, db):
    good, bad = image_bytes((3, 3, 3)), image_bytes((4, 4, 4))
    data = bytearray(make_zip({"good.png": good, "bad.png": bad}))
    start = data.find(bad)
    data[start + 20 : start + 30] = b"\x00" * 10  # CRC no longer matches
    outcomes = ingest.ingest_upload(workspace, db, "mixed.zip", bytes(data), actor=TESTER)
    assert [o.status for o in outcomes] == ["added", "rejected"]
    assert "zip entry" in outcomes[1].reason


def write_tree(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


def test_folder_import_imagefolder_layout(workspace, db, tmp_path):
    root = write_tree(
        tmp_path / "photos",
        {
            "ants/a.png": image_bytes((10, 0, 0)),
            "ants/b.jpg": image_bytes((11, 0, 0), fmt="JPEG"),
            "bees/c.png": image_bytes((12, 0, 0)),
            "bees/.hidden.png": image_bytes((13, 0, 0)),
            "loose.png": image_bytes((14, 0, 0)),
        },
    )
    outcomes = ingest.ingest_items(workspace, db, ingest.items_from_path(root, actor=TESTER, roots=[tmp_path]),
                                   actor=TESTER, source="server disk")
    assert ingest.summarise(outcomes) == {"added": 4, "duplicates": 0, "conflicts": 0, "rejected": 0, "skipped": 1}
    assert (".hidden.png", "skipped", "hidden file") in [(o.name, o.status, o.reason) for o in outcomes]
    assert catalog.count_images(db, catalog.ImageFilter(class_name="ants")) == 2
    assert catalog.count_images(db, catalog.ImageFilter(class_name="bees")) == 1
    assert catalog.count_images(db, catalog.ImageFilter(unlabelled=True)) == 1
    again = ingest.ingest_items(workspace, db, ingest.items_from_path(root, actor=TESTER, roots=[tmp_path]),
                                actor=TESTER, source="server disk")
    assert ingest.summarise(again) == {"added": 0, "duplicates": 4, "conflicts": 0, "rejected": 0, "skipped": 1}
    with pytest.raises(LoupeError, match="does not exist"):
        ingest.items_from_path(tmp_path / "missing", actor=TESTER, roots=[tmp_path])


def test_folder_import_pins_train_val_test(workspace, db, tmp_path):
    root = write_tree(
        tmp_path / "hymenoptera",
        {f"{split}/{cls}/{n}.png": image_bytes((n, i, j))
         for i, split in enumerate(catalog.SPLITS) for j, cls in enumerate(["ants", "bees"]) for n in range(2)},
    )
    ingest.ingest_items(workspace, db, ingest.items_from_folder(root), actor=TESTER, source="upload")
    for split in catalog.SPLITS:
        assert catalog.count_images(db, catalog.ImageFilter(split=split)) == 4
    assert db.execute("SELECT min(pinned) FROM splits").fetchone()[0] == 1


def test_list_file_import(workspace, db, tmp_path):
    write_tree(tmp_path / "imgs", {"one.png": image_bytes((20, 0, 0)), "two words.png": image_bytes((21, 0, 0))})
    listing = tmp_path / "labels.txt"
    listing.write_text("# path label\nimgs/one.png cat\n\nimgs/two words.png dog\nimgs/missing.png dog\n")
    outcomes = ingest.ingest_items(workspace, db, ingest.items_from_path(listing, actor=TESTER, roots=[tmp_path]),
                                   actor=TESTER, source="server disk")
    assert [o.status for o in outcomes] == ["added", "added", "rejected"]
    assert "cannot be read" in outcomes[2].reason
    assert catalog.get_image(db, outcomes[1].image_id)["label"] == "dog"
    listing.write_text("just-one-field\n")
    with pytest.raises(LoupeError, match="line 1"):
        ingest.items_from_list_file(listing)
    listing.write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(LoupeError, match="Cannot read"):
        ingest.items_from_list_file(listing)


def test_hymenoptera_imports_whole_with_its_splits_pinned(workspace, db):
    root = require_dataset("hymenoptera")
    outcomes = ingest.ingest_items(workspace, db, ingest.items_from_folder(root), actor=TESTER, source="upload")
    files = sum(1 for p in root.rglob("*") if p.is_file())
    assert ingest.summarise(outcomes) == {"added": files, "duplicates": 0, "conflicts": 0, "rejected": 0, "skipped": 0}
    summary = catalog.overview(db)
    assert {r["class"] for r in summary["per_class"]} == {"ants", "bees"}
    assert summary["per_split"]["test"] == 0 and summary["per_split"]["val"] > 100
    assert_catalog_consistent(workspace, db)


def with_header_offset(archive: bytes, member: str, offset: int) -> bytes:
    """The archive with `member`'s local header offset in the central directory changed to `offset`."""
    data = bytearray(archive)
    start = data.find(b"PK\x01\x02")
    while start != -1:
        name_length = int.from_bytes(data[start + 28 : start + 30], "little")
        if data[start + 46 : start + 46 + name_length].decode() == member:
            data[start + 42 : start + 46] = offset.to_bytes(4, "little")
            return bytes(data)
        start = data.find(b"PK\x01\x02", start + 46)
    raise AssertionError(f"{member} is not in the archive")


def test_a_zip_with_overlapping_entries_is_refused(workspace, db):
    data = with_header_offset(make_zip({"ants/a.png": image_bytes((1, 1, 1)), "ants/b.png": image_bytes((2, 2, 2))}),
                              "ants/b.png", 0)
    with pytest.raises(LoupeError, match="overlap"):
        ingest.items_from_zip(data)
    [outcome] = ingest.ingest_upload(workspace, db, "bomb.zip", data, actor=TESTER)
    assert outcome.status == "rejected" and "overlap" in outcome.reason
    assert catalog.count_images(db) == 0


def test_a_zip_over_the_member_or_size_limits_is_refused_before_reading(workspace, db, monkeypatch):
    data = make_zip({f"ants/{n}.png": image_bytes((n, 1, 1)) for n in range(4)})
    monkeypatch.setattr(ingest, "MAX_ZIP_MEMBERS", 3)
    with pytest.raises(LoupeError, match="4 entries, more than 3: split it"):
        ingest.items_from_zip(data)
    monkeypatch.setattr(ingest, "MAX_ZIP_MEMBERS", 100)
    monkeypatch.setattr(ingest, "MAX_ZIP_TOTAL_BYTES", 2**30)
    declared = bytearray(data)
    declared[declared.find(b"PK\x01\x02") + 24 : declared.find(b"PK\x01\x02") + 28] = (2**31).to_bytes(4, "little")
    with pytest.raises(LoupeError, match="unpacks to more than 1 GB"):
        ingest.items_from_zip(bytes(declared))


def test_a_zip_entry_declared_larger_than_the_file_limit_is_rejected_unread(workspace, db, monkeypatch):
    data = make_zip({"ants/big.png": image_bytes((1, 1, 1)), "ants/small.png": image_bytes((2, 2, 2))})
    monkeypatch.setattr(ingest, "MAX_FILE_BYTES", len(image_bytes((1, 1, 1))) - 1)
    items = ingest.items_from_zip(data)
    monkeypatch.setattr(ingest.zipfile.ZipFile, "open", lambda *a, **k: pytest.fail("an oversized entry was read"))
    outcome = ingest.ingest_items(workspace, db, items[:1], actor=TESTER, source="upload")[0]
    assert (outcome.status, outcome.reason) == ("rejected", "zip entry larger than 0 MB")


def test_hidden_entries_and_macos_metadata_are_listed_as_skipped(workspace, db):
    data = make_zip({
        "set/ants/a.png": image_bytes((1, 1, 1)),
        "set/ants/.DS_Store": b"\x00\x00",
        "__MACOSX/set/ants/._a.png": b"resource fork",
        "set/.git/config": b"[core]",
    })
    outcomes = ingest.ingest_upload(workspace, db, "set.zip", data, actor=TESTER)
    assert [(o.name, o.status) for o in outcomes] == [
        ("a.png", "added"), (".DS_Store", "skipped"), ("._a.png", "skipped"), ("config", "skipped"),
    ]
    assert "__MACOSX" in outcomes[2].reason and outcomes[1].reason == "hidden file"
    assert ingest.summarise(outcomes)["skipped"] == 3


def test_a_class_name_never_comes_from_a_climbing_or_absolute_path():
    paths = [PurePosixPath(p) for p in ["../../etc/x.png", "/abs/cats/y.png", "a/../dogs/z.png", "ants/ok.png"]]
    assert ingest._label_and_split(paths) == [(None, None), (None, None), (None, None), ("ants", None)]


def test_a_duplicate_with_another_label_is_kept_as_a_conflict(workspace, db):
    first = ingest.ingest_bytes(workspace, db, image_bytes((9, 9, 9)), "rose.png", "rose", actor=TESTER)
    outcome = ingest.ingest_bytes(workspace, db, image_bytes((9, 9, 9)), "tulip.png", "tulip", actor=TESTER)
    assert (outcome.status, outcome.image_id) == ("conflict", first.image_id)
    assert outcome.reason == f"duplicate of #{first.image_id}, labelled rose; this copy says tulip"
    assert catalog.get_image(db, first.image_id)["label"] == "rose"
    [conflict] = catalog.open_import_conflicts(db)
    assert (conflict["image_id"], conflict["label"], conflict["claimed_label"], conflict["source_name"]) == (
        first.image_id, "rose", "tulip", "tulip.png"
    )
    same = ingest.ingest_bytes(workspace, db, image_bytes((9, 9, 9)), "again.png", "rose", actor=TESTER)
    assert same.status == "duplicate"
    again = ingest.ingest_bytes(workspace, db, image_bytes((9, 9, 9)), "tulip.png", "tulip", actor=TESTER)
    assert again.status == "conflict" and len(catalog.open_import_conflicts(db)) == 1
    catalog.set_label(db, first.image_id, "tulip", actor=Actor("expert", ADMIN))
    assert catalog.open_import_conflicts(db) == []


def test_loupe_import_prints_conflicts_and_skipped_and_takes_a_zip_by_its_content(tmp_path, capsys):
    from core.cli import main

    (tmp_path / "first.zip").write_bytes(make_zip({"rose/a.png": image_bytes((4, 4, 4))}))
    # no .zip in its name: known by its content
    (tmp_path / "second.bin").write_bytes(make_zip({"tulip/a.png": image_bytes((4, 4, 4)), ".hidden": b"x"}))
    workspace = str(tmp_path / "ws")
    assert main(["import", "--workspace", workspace, str(tmp_path / "first.zip")]) == 0
    assert main(["import", "--workspace", workspace, str(tmp_path / "second.bin")]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines()[-5:] == ["added: 0", "duplicates: 0", "conflicts: 1", "rejected: 0", "skipped: 1"]
    assert "conflict a.png: duplicate of #1, labelled rose; this copy says tulip" in err
    assert main(["import", "--workspace", workspace, ""]) == 2
    assert "Name a folder" in capsys.readouterr().err


def test_empty_and_relative_paths_are_refused():
    for path in ["", "   ", "photos/ants", "."]:
        with pytest.raises(LoupeError, match="full path"):
            ingest.items_from_path(path, actor=TESTER, roots=None)


def test_a_folder_scan_reports_progress_and_can_be_cancelled(tmp_path):
    import threading

    files = {f"c{k}/{n}.png": image_bytes((k, n, 0)) for k in range(3) for n in range(2)}
    root = write_tree(tmp_path / "photos", files)
    found = []
    assert len(ingest.items_from_folder(root, on_progress=found.append)) == 6
    assert found[-1] == 6 and found == sorted(found)
    cancel = threading.Event()

    def cancel_after_first_folder(count):
        cancel.set()

    with pytest.raises(LoupeError, match="cancelled"):
        ingest.items_from_folder(root, on_progress=cancel_after_first_folder, cancel=cancel)


def test_an_import_stops_between_files_when_cancelled_and_keeps_what_it_took(workspace, db):
    import threading

    cancel = threading.Event()
    items = [ingest.ImportItem(f"{n}.png", lambda n=n: image_bytes((n, 5, 5))) for n in range(5)]
    outcomes = ingest.ingest_items(workspace, db, items, on_progress=lambda done: done == 2 and cancel.set(),
                                   cancel=cancel, actor=TESTER, source="upload")
    assert [o.status for o in outcomes] == ["added", "added"]
    assert catalog.count_images(db) == 2
    assert_catalog_consistent(workspace, db)


def test_symlinks_and_hidden_files_in_a_folder_are_listed_as_skipped(workspace, db, tmp_path):
    root = write_tree(tmp_path / "photos", {
        "ants/a.png": image_bytes((1, 9, 9)), ".cache/x.png": image_bytes((2, 9, 9))
    })
    (tmp_path / "secret.png").write_bytes(image_bytes((3, 9, 9)))
    (root / "ants" / "link.png").symlink_to(tmp_path / "secret.png")
    (root / "elsewhere").symlink_to(tmp_path)
    outcomes = ingest.ingest_items(workspace, db, ingest.items_from_folder(root), actor=TESTER, source="upload")
    skipped = {(o.name, o.reason) for o in outcomes if o.status == "skipped"}
    assert skipped == {
        (".cache", "hidden file (folder)"), ("elsewhere", "symbolic link (folder)"), ("link.png", "symbolic link"),
    }
    assert catalog.count_images(db) == 1


def test_list_file_errors_never_quote_the_file_or_server_paths(workspace, db, tmp_path):
    listing = tmp_path / "passwd"
    listing.write_text("root:x:0:0:root:/root:/bin/bash\n")
    with pytest.raises(LoupeError) as error:
        ingest.items_from_list_file(listing)
    assert str(error.value) == "passwd: line 1 is not `path label`."
    listing.write_text("../elsewhere/missing.png cat\n")
    [outcome] = ingest.ingest_items(workspace, db, ingest.items_from_list_file(listing), actor=TESTER, source="upload")
    assert outcome.reason == "cannot read: No such file or directory"


def test_a_full_disk_gives_one_clear_message_and_loses_nothing(workspace, db, monkeypatch):
    import errno
    import os

    from core.workspace import DISK_FULL_MESSAGE

    real_fdopen = os.fdopen
    written = []

    def fdopen_filling_the_disk(fd, *args, **kwargs):
        f = real_fdopen(fd, *args, **kwargs)
        written.append(f)
        if len(written) > 4:  # the third image's file finds the disk full
            f.close()
            raise OSError(errno.ENOSPC, "No space left on device")
        return f

    monkeypatch.setattr(os, "fdopen", fdopen_filling_the_disk)
    items = [ingest.ImportItem(f"{n}.png", lambda n=n: image_bytes((n, 6, 6))) for n in range(5)]
    with pytest.raises(LoupeError) as error:
        ingest.ingest_items(workspace, db, items, actor=TESTER, source="upload")
    assert str(error.value) == DISK_FULL_MESSAGE
    assert catalog.count_images(db) == 2  # the two whole images before it are kept
    assert_catalog_consistent(workspace, db)
    assert not [p for p in workspace.root.rglob(".tmp-*")]


def test_a_catalog_that_cannot_grow_gives_the_disk_full_message_and_leaves_no_files(workspace, db, monkeypatch):
    import sqlite3

    from core.workspace import DISK_FULL_MESSAGE

    def full(*args, **kwargs):
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(catalog, "insert_new_image", full)
    with pytest.raises(LoupeError, match="^" + DISK_FULL_MESSAGE.replace(".", r"\.") + "$"):
        ingest.ingest_bytes(workspace, db, image_bytes((7, 7, 1)), "a.png", actor=TESTER)
    assert_catalog_consistent(workspace, db)
    assert catalog.count_images(db) == 0


def test_an_import_that_loses_the_race_for_an_image_reports_a_duplicate(workspace, db):
    from core.workspace import connect

    data = image_bytes((3, 1, 4))
    batch = ingest._Batch(workspace, db, TESTER)
    mine = ingest.ingest_bytes(workspace, db, data, "mine.png", "pi", batch=batch, actor=TESTER)
    other = connect(workspace)  # another process stores the same bytes before this batch commits
    theirs = ingest.ingest_bytes(workspace, other, data, "theirs.png", "pi", actor=TESTER)
    other.close()
    batch.commit()
    assert theirs.status == "added"
    assert (mine.status, mine.image_id) == ("duplicate", theirs.image_id)
    assert mine.reason == f"duplicate of #{theirs.image_id}"
    assert catalog.count_images(db) == 1
    assert_catalog_consistent(workspace, db)


def test_two_processes_importing_overlapping_folders_both_finish_with_a_full_report(workspace, db, tmp_path):
    import subprocess
    import sys

    from tests.conftest import ROOT

    colours = {n: (n % 256, n // 256, 77) for n in range(200)}
    first = write_tree(tmp_path / "first", {f"c{n % 3}/{n}.png": image_bytes(colours[n], (24, 24)) for n in range(150)})
    second = write_tree(tmp_path / "second",
                        {f"c{n % 3}/{n}.png": image_bytes(colours[n], (24, 24)) for n in range(50, 200)})
    imports = [
        subprocess.Popen([sys.executable, "-m", "core.cli", "import", "--workspace", str(workspace.root), str(folder)],
                         cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for folder in (first, second)
    ]
    reports = []
    for process in imports:
        out, err = process.communicate(timeout=300)
        assert process.returncode == 0, err
        reports.append(dict((k, int(v)) for k, v in (line.split(": ") for line in out.splitlines())))
    for report in reports:
        assert report["added"] + report["duplicates"] == 150
        assert report["conflicts"] == report["rejected"] == report["skipped"] == 0
    assert sum(r["added"] for r in reports) == 200
    assert catalog.count_images(db) == 200
    assert_catalog_consistent(workspace, db)


def test_a_server_path_outside_the_import_roots_is_refused_after_resolving(tmp_path):
    allowed = tmp_path / "allowed"
    write_tree(tmp_path / "private", {"ants/a.png": image_bytes((30, 0, 0))})
    allowed.mkdir()
    (allowed / "escape").symlink_to(tmp_path / "private")
    for path in [tmp_path / "private", allowed / ".." / "private", allowed / "escape"]:
        with pytest.raises(LoupeError, match="outside the folders this server imports from"):
            ingest.items_from_path(path, actor=TESTER, roots=[allowed])


def test_a_list_file_cannot_name_files_outside_the_import_roots(workspace, db, tmp_path):
    allowed = tmp_path / "allowed"
    write_tree(allowed / "imgs", {"one.png": image_bytes((31, 0, 0))})
    secret = tmp_path / "secret.png"
    secret.write_bytes(image_bytes((32, 0, 0)))
    listing = allowed / "labels.txt"
    listing.write_text(f"imgs/one.png cat\n../secret.png dog\n{secret} dog\n")
    items = ingest.items_from_path(listing, actor=TESTER, roots=[allowed])
    assert [(item.verdict, item.read is None) for item in items] == [
        (None, False), ("rejected", True), ("rejected", True)]
    outcomes = ingest.ingest_items(workspace, db, items, actor=TESTER, source="server disk")
    assert [o.status for o in outcomes] == ["added", "rejected", "rejected"]
    assert catalog.count_images(db) == 1


@pytest.mark.parametrize("role", ["reviewer", "viewer", "labeller"])
def test_only_admins_import_from_the_servers_disk(tmp_path, role):
    write_tree(tmp_path / "tree", {"ants/a.png": image_bytes((33, 0, 0))})
    with pytest.raises(LoupeError, match=f"Your role, {role}, cannot import images from the server's disk"):
        ingest.items_from_path(tmp_path / "tree", actor=Actor("someone", role), roots=[tmp_path])


def test_an_import_by_a_labeller_cannot_bring_back_an_archived_class(workspace, db):
    catalog.add_class(db, "wasps", actor=TESTER)
    catalog.archive_class(db, "wasps", actor=TESTER)
    labeller = Actor("lea", "labeller")
    outcome = ingest.ingest_bytes(workspace, db, image_bytes((34, 0, 0)), "w.png", "wasps", actor=labeller)
    assert outcome.status == "rejected" and "archived" in outcome.reason
    assert catalog.class_names(db) == [] and catalog.count_images(db) == 0


def test_an_import_is_one_audit_entry_with_its_counts(workspace, db):
    from core import audit

    items = [ingest.ImportItem(f"{n}.png", lambda n=n: image_bytes((40 + n, 0, 0)), "ants") for n in range(3)]
    ingest.ingest_items(workspace, db, items, actor=TESTER, source="zip")
    [entry] = [e for e in audit.list_entries(db) if e["action"] != "class_change"]
    assert (entry["who"], entry["action"], entry["details"]["source"], entry["details"]["added"]) == (
        "tester", "import", "zip", 3)
    assert {h["who"] for image_id in (1, 2, 3) for h in catalog.label_history(db, image_id)} == {"tester"}

import json
import shutil
import warnings

import numpy as np
import pytest

from pgen_engine.data.dataset import DataError, load_dataset, load_image, parse_timestamp, write_dataset
from pgen_engine.data.validate import validate_dataset


def _copy(src, tmp_path):
    dst = tmp_path / "ds"
    shutil.copytree(src, dst)
    return dst


def _append_row(d, row):
    with open(d / "interactions.csv", "a") as f:
        f.write(row + "\n")


def test_load_synth(synth_dir):
    ds = load_dataset(synth_dir)
    assert ds.num_users == 23 and ds.num_items == 57
    for seq in ds.interactions.values():
        ts = [x.timestamp for x in seq]
        assert ts == sorted(ts)
        assert all(x.item_id in ds.items for x in seq)
    assert all(it.image_path.is_file() for it in ds.items.values())
    assert "attr_shape" in next(iter(ds.items.values())).extra


def test_parse_timestamp():
    assert parse_timestamp("964980499") == 964980499.0
    assert parse_timestamp("1970-01-02T00:00:00Z") == 86400.0
    assert parse_timestamp("1970-01-01T01:00:00+01:00") == 0.0
    for bad in ("", "yesterday", "nan", "2020-13-45"):
        with pytest.raises(ValueError):
            parse_timestamp(bad)
    # beyond datetime's years: used to crash `pgen data validate` ("year 52689 is out of range",
    # an OverflowError traceback for 1e300) when it printed the time span
    with pytest.raises(ValueError, match=r"outside the years 1\.\.9999 as unix seconds \(milliseconds\?"):
        parse_timestamp("1602369734000")
    with pytest.raises(ValueError, match=r"outside the years 1\.\.9999 as unix seconds$"):
        parse_timestamp("1e300")
    assert parse_timestamp("-86400") == -86400.0 and parse_timestamp("0") == 0.0
    # ISO-8601 inside datetime's range whose UTC time is not: `pgen data validate` printed only
    # "error: year 0 is out of range" (no file, no line) when it formatted the time span
    for edge in ("0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00"):
        with pytest.raises(ValueError, match=r"outside the years 1\.\.9999 once converted to UTC"):
            parse_timestamp(edge)
    assert parse_timestamp("0001-01-01T00:00:00Z") == -62135596800.0


def test_validate_names_the_row_of_an_iso_timestamp_outside_the_years(synth_dir, tmp_path):
    d = _copy(synth_dir, tmp_path)
    _append_row(d, "u_new,i0000,0001-01-01T00:00:00+01:00")
    nlines = len((d / "interactions.csv").read_text().splitlines())
    rep = validate_dataset(d)
    assert not rep.usable and rep.skipped == {"bad_timestamp": 1}
    assert f"interactions.csv:{nlines}: unparsable timestamp" in rep.summary()


@pytest.mark.parametrize("row,needle", [
    ("u0000,i0000", "expected 3 fields"),
    ("u0000,nope,1700000000", "not in items.jsonl"),
    ("u0000,i0000,notatime", "unparsable timestamp"),
    ("u0000,i0000,5", "earlier than"),
    (",i0000,1700000000", "empty user_id"),
    # the csv module keeps a NUL byte: this row used to load as a new user 'u0000\0'
    ("u0000\0,i0000,1700000000", "NUL byte in a field"),
])
def test_bad_interaction_rows(synth_dir, tmp_path, row, needle):
    d = _copy(synth_dir, tmp_path)
    _append_row(d, row)
    nlines = len((d / "interactions.csv").read_text().splitlines())
    with pytest.raises(DataError, match=needle) as e:
        load_dataset(d)
    assert f"interactions.csv:{nlines}" in str(e.value)
    with pytest.warns(UserWarning, match="skipped bad input"):
        ds = load_dataset(d, on_error="skip")
    assert sum(ds.skipped.values()) == 1
    assert ds.num_interactions == load_dataset(synth_dir).num_interactions


@pytest.mark.parametrize("line,needle", [
    ("{not json", "malformed JSON"),
    ('{"title": "x"}', "item_id"),
    ('{"item_id": "i0001", "title": "dup", "image": null}', "duplicate item_id"),
    ('{"item_id": "zz", "title": "x", "image": "images/none.png"}', "does not exist"),
    # the common slips name themselves (the messages used to be "malformed JSON (Extra data)" etc.)
    ('{"item_id": "zz", "title": "x", "image": null},', r"Extra data at column \d+\); a trailing comma\?"),
    ('[{"item_id": "zz", "title": "x", "image": null}', "JSON Lines: one object per line, not a JSON array"),
    ('{"item_id": "zz", "title": "x", "image": "images\\\\i0000.png"}', "does not exist; use '/' as the path separator"),
])
def test_bad_item_lines(synth_dir, tmp_path, line, needle):
    d = _copy(synth_dir, tmp_path)
    with open(d / "items.jsonl", "a") as f:
        f.write(line + "\n")
    with pytest.raises(DataError, match=needle) as e:
        load_dataset(d)
    assert "items.jsonl:58" in str(e.value)
    with pytest.warns(UserWarning):
        ds = load_dataset(d, on_error="skip")
    assert ds.num_items == 57


def test_missing_files_and_header(tmp_path, synth_dir):
    with pytest.raises(DataError, match="not a directory"):
        load_dataset(tmp_path / "nope")
    d = _copy(synth_dir, tmp_path)
    (d / "interactions.csv").write_text("user,item,timestamp\n")
    with pytest.raises(DataError, match="lacks column.*; expected user_id,item_id,timestamp"):
        load_dataset(d)
    (d / "interactions.csv").write_text("User_ID,item_id,Timestamp\n")
    with pytest.raises(DataError, match="column names are case-sensitive: found 'User_ID', 'Timestamp'"):
        load_dataset(d)
    (d / "interactions.csv").write_text("user_id;item_id;timestamp\n")
    with pytest.raises(DataError, match="must be comma-separated; this header is separated by ';'"):
        load_dataset(d)
    with pytest.raises(ValueError, match="on_error"):
        load_dataset(synth_dir, on_error="ignore")


def test_ties_keep_file_order_and_iso(tmp_path):
    src = tmp_path / "src.png"
    from PIL import Image
    Image.new("RGB", (5, 7), (1, 2, 3)).save(src)
    items = [{"item_id": f"a{j}", "title": f"t{j}", "image": "images/a.png", "genre": "x"} for j in range(3)]
    rows = [("u", "a2", "2020-01-01T00:00:00"), ("u", "a0", "2020-01-01T00:00:00"), ("u", "a1", "2020-01-02T00:00:00")]
    d = write_dataset(tmp_path / "ds", items, rows, image_files={"images/a.png": ("copy", src)})
    ds = load_dataset(d)
    assert ds.item_sequence("u") == ["a2", "a0", "a1"]
    assert ds.items["a1"].extra == {"genre": "x"}
    img = load_image(ds.items["a0"].image_path, 4)
    assert img.shape == (4, 4, 3) and img.dtype == np.uint8 and (img == [1, 2, 3]).all()


def test_validate_reports_corrupt_and_missing(synth_dir, tmp_path):
    d = _copy(synth_dir, tmp_path)
    rep = validate_dataset(d)
    assert rep.usable and rep.images_found == 57 and rep.users == 23
    first = json.loads((d / "items.jsonl").read_text().splitlines()[0])
    (d / first["image"]).write_bytes(b"not an image")
    second = json.loads((d / "items.jsonl").read_text().splitlines()[1])
    (d / second["image"]).unlink()
    rep = validate_dataset(d)
    assert not rep.usable
    assert (rep.images_corrupt, rep.images_missing, rep.images_found) == (1, 1, 55)
    assert "UNUSABLE" in rep.summary()
    with pytest.raises(DataError, match="corrupt"):
        load_image(d / first["image"], 32)


def test_image_with_a_malformed_exif_block_loads_upright(synth_dir, tmp_path):
    # ImageOps.exif_transpose re-serialises the EXIF block after rotating, and this malformed tag
    # made it raise struct.error: a traceback from `pgen data tokenize` for an image that decodes
    # (`pgen data validate` said OK); the orientation tag itself is readable and still applied
    import io

    from PIL import Image

    im = Image.fromarray(np.arange(6 * 8 * 3, dtype=np.uint8).reshape(6, 8, 3))
    exif = Image.Exif()
    exif[0x0112], exif[0x010F] = 6, "Canon"  # orientation: rotate 90 degrees clockwise to show upright
    buf = io.BytesIO()
    im.save(buf, "JPEG", exif=exif)
    data = bytearray(buf.getvalue())
    o = data.find(b"Exif\0\0")
    data[o + 14], data[o + 17] = 0xA2, 0x40  # the first entry's tag id and type: unpackable on re-serialising
    d = _copy(synth_dir, tmp_path)
    first = json.loads((d / "items.jsonl").read_text().splitlines()[0])
    (d / first["image"]).write_bytes(bytes(data))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PIL: "Corrupt EXIF data"
        assert load_image(d / first["image"]).shape == (8, 6, 3)
        assert load_image(d / first["image"], 4).shape == (4, 4, 3)
        rep = validate_dataset(d)
    assert rep.usable and rep.images_corrupt == 0


def test_validate_says_why_an_image_is_corrupt(synth_dir, tmp_path):
    # validate printed only the exception's type ("(OSError)"); it now decodes each image as
    # tokenizing does and prints load_image's reason
    d = _copy(synth_dir, tmp_path)
    first = json.loads((d / "items.jsonl").read_text().splitlines()[0])
    path = d / first["image"]
    path.write_bytes(path.read_bytes()[:-40])  # the end of the pixel data and IEND cut off
    rep = validate_dataset(d)
    assert rep.images_corrupt == 1 and not rep.usable
    assert f"{path}: corrupt or unreadable image (" in rep.summary()
    assert f"of item {first['item_id']!r}" in rep.summary()


def test_validate_hints_at_windows_path_separators(synth_dir, tmp_path):
    d = _copy(synth_dir, tmp_path)
    lines = [json.loads(x) for x in (d / "items.jsonl").read_text().splitlines()]
    lines[0]["image"] = lines[0]["image"].replace("/", "\\")
    (d / "items.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    rep = validate_dataset(d)
    assert rep.images_missing == 1 and "missing image of item 'i0000'; use '/' as the path separator" in rep.summary()


def test_validate_reports_items_without_an_image(synth_dir, tmp_path):
    # "image": null loads, but tokenizing / training / evaluation refuse such items: validate used
    # to say "status: OK" (exit 0) for a dataset `pgen data tokenize` then failed on
    d = _copy(synth_dir, tmp_path)
    lines = [json.loads(x) for x in (d / "items.jsonl").read_text().splitlines()]
    lines[4]["image"] = None
    (d / "items.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    rep = validate_dataset(d)
    assert rep.items_without_image == 1 and not rep.usable
    assert (f"problem:       {d / 'items.jsonl'}: 1 item(s) have no image (first: {lines[4]['item_id']!r}); "
            "tokenizing, training and evaluation need an image for every item") in rep.summary()


def test_validate_reports_users_too_short_for_the_splits(synth_dir, tmp_path):
    # every user with 2 interactions: validate said OK, then training failed with "no training
    # windows" and evaluation with "no test examples"
    d = _copy(synth_dir, tmp_path)
    path = d / "interactions.csv"
    lines = path.read_text().splitlines()
    kept, rest, count = [lines[0]], [], {}
    for x in lines[1:]:
        u = x.split(",")[0]
        count[u] = count.get(u, 0) + 1
        (kept if count[u] <= 2 else rest).append(x)
    path.write_text("\n".join(kept) + "\n")
    rep = validate_dataset(d)
    assert rep.interactions == 2 * rep.users and not rep.usable
    assert f"problem:       {path}: no user has 3 or more interactions" in rep.summary()
    n, first = rep.flags["short_user_history"]
    assert n == rep.users and "has 2 interaction(s); users with fewer than 5" in first
    # one long enough user: usable, the short ones only flagged
    first_user = kept[1].split(",")[0]
    path.write_text("\n".join(kept + [x for x in rest if x.split(",")[0] == first_user]) + "\n")
    rep = validate_dataset(d)
    assert rep.usable and rep.flags["short_user_history"][0] == rep.users - 1


def test_validate_flags_timestamps_that_are_compact_dates(synth_dir, tmp_path):
    d = _copy(synth_dir, tmp_path)
    path = d / "interactions.csv"
    lines = path.read_text().splitlines()
    assert validate_dataset(d).flags == {}  # unix seconds of 2020: nothing to flag
    # the same events with YYYYMMDD dates, increasing per user as the originals are
    out, per_user = [lines[0]], {}
    for line in lines[1:]:
        u, i, *rest = line.split(",")
        per_user[u] = per_user.get(u, 0) + 1
        out.append(",".join([u, i, f"202001{per_user[u]:02d}", *rest[1:]]))
    path.write_text("\n".join(out) + "\n")
    rep = validate_dataset(d)
    n, first = rep.flags["timestamp_looks_like_yyyymmdd"]
    assert n == rep.interactions and first.startswith(f"{path}:2: 20200101 was read as unix seconds")
    assert rep.usable  # a flag, not a problem: the order within each user is still right
    # one value that is no date (month 13) and nothing is flagged
    out[1] = out[1].replace(",20200101", ",20201301", 1)
    path.write_text("\n".join(out) + "\n")
    assert "timestamp_looks_like_yyyymmdd" not in validate_dataset(d).flags


def test_movielens_load_and_stats(movielens):
    ds = load_dataset(movielens)
    assert (ds.num_users, ds.num_items, ds.num_interactions) == (597, 2943, 58461)
    lo, hi = ds.time_span()
    assert lo < hi
    assert min(len(s) for s in ds.interactions.values()) >= 5
    img = load_image(next(iter(ds.items.values())).image_path, 64)
    assert img.shape == (64, 64, 3)


def test_validate_prints_first_file_line_per_problem_kind_and_ties(synth_dir, tmp_path):
    d = _copy(synth_dir, tmp_path)
    lines = (d / "interactions.csv").read_text().splitlines()
    u, i, ts = lines[1].split(",")[:3]
    lines.insert(2, f"{u},{i},{ts}")             # line 3: ties line 2's timestamp
    lines.insert(5, "onlytwo,fields")             # line 6: malformed
    lines.insert(7, f"{u},no_such_item,{ts}")     # line 8: unknown item
    lines.insert(9, "x,y")                        # line 10: second malformed (not the first)
    (d / "interactions.csv").write_text("\n".join(lines) + "\n")
    out = validate_dataset(d).summary()
    path = d / "interactions.csv"
    assert f"malformed_interaction_line: 2 (first: {path}:6:" in out
    assert f"unknown_item_id: 1 (first: {path}:8:" in out
    assert f"flag:          tied_timestamp: 1 (first: {path}:3:" in out


def test_rating_threshold_keeps_positives(tmp_path):
    from pgen_engine.data.dataset import filter_by_rating, write_dataset

    src = tmp_path / "a.png"
    from PIL import Image

    Image.new("RGB", (4, 4)).save(src)
    items = [{"item_id": f"a{j}", "title": "t", "image": "images/a.png"} for j in range(3)]
    d = write_dataset(tmp_path / "ds", items, [("u", "a0", 1), ("u", "a1", 2), ("u", "a2", 3)],
                      image_files={"images/a.png": ("copy", src)})
    csv = d / "interactions.csv"
    csv.write_text("user_id,item_id,timestamp,rating\nu,a0,1,5\nu,a1,2,2.5\nu,a2,3,4\n")
    ds = filter_by_rating(load_dataset(d), 4.0)
    assert ds.item_sequence("u") == ["a0", "a2"]
    csv.write_text("user_id,item_id,timestamp,rating\nu,a0,1,5\nu,a1,2,good\n")
    with pytest.raises(DataError, match=r"interactions.csv:3: rating 'good'"):
        filter_by_rating(load_dataset(d), 4.0)
    csv.write_text("user_id,item_id,timestamp,rating\nu,a0,1,5\nu,a1,2,nan\n")  # used to drop the row silently
    with pytest.raises(DataError, match=r"interactions.csv:3: rating 'nan' is not a finite number"):
        filter_by_rating(load_dataset(d), 4.0)


def test_load_image_scales_16bit_grayscale_and_rejects_decompression_bombs(tmp_path, monkeypatch):
    from PIL import Image
    ramp = np.linspace(0, 65535, 16 * 16).reshape(16, 16).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "g16.png")  # opens as mode "I;16"
    img = load_image(tmp_path / "g16.png")
    assert img.shape == (16, 16, 3) and img.dtype == np.uint8
    # scaled, not clipped at 255 (PIL's plain convert("RGB") makes this ramp nearly all white)
    np.testing.assert_array_equal(img[..., 0], (ramp.astype(np.int64) // 257).astype(np.uint8))
    assert load_image(tmp_path / "g16.png", 8).mean() < 200
    Image.new("RGB", (32, 32)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 1024 px > 2x the limit: PIL raises
    with pytest.raises(DataError, match=r"big\.png: corrupt or unreadable image"):
        load_image(tmp_path / "big.png", 8)


def test_load_image_composites_transparency_onto_white(tmp_path):
    from PIL import Image
    rgba = np.zeros((4, 6, 4), np.uint8)
    rgba[..., :3] = (10, 20, 30)  # colour stored under fully transparent pixels
    rgba[:, :3, 3] = 255  # left half opaque
    rgba[:, 3:, 3] = 0
    rgba[0, 0, 3] = 128  # one half-transparent pixel
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "a.png")
    img = load_image(tmp_path / "a.png").astype(int)
    assert (img[1:, :3] == (10, 20, 30)).all()  # opaque pixels keep their colour
    assert (img[:, 3:] == 255).all()  # transparent ones are white, not the stored (10, 20, 30)
    assert 125 < img[0, 0, 0] < 140  # half of 10 and half of 255
    la = np.stack([np.full((4, 4), 50, np.uint8), np.zeros((4, 4), np.uint8)], -1)
    Image.fromarray(la, mode="LA").save(tmp_path / "la.png")
    assert (load_image(tmp_path / "la.png") == 255).all()
    pal = Image.new("P", (4, 4), 0)
    pal.putpalette([0, 0, 0, 200, 0, 0] + [0] * 762)
    pal.putpixel((0, 0), 1)
    pal.save(tmp_path / "p.png", transparency=0)  # palette index 0 (black) is transparent
    img = load_image(tmp_path / "p.png")
    assert tuple(img[0, 0]) == (200, 0, 0) and (img[1:] == 255).all()


def test_load_image_applies_exif_orientation(tmp_path):
    from PIL import Image
    a = np.zeros((2, 4, 3), np.uint8)  # stored landscape 4 wide x 2 high, red left column
    a[:, 0] = (255, 0, 0)
    im = Image.fromarray(a)
    exif = im.getexif()
    exif[0x0112] = 6  # Orientation: rotate 90 CW to display
    im.save(tmp_path / "o.png", exif=exif)
    img = load_image(tmp_path / "o.png")
    assert img.shape == (4, 2, 3)  # shown upright: portrait
    assert (img[0] == (255, 0, 0)).all()  # the red column is now the top row
    assert (img[1:, :, 0] == 0).all()


def test_images_signature_changes_with_the_decode_rule(synth_dir, monkeypatch):
    from pgen_engine.data import token_cache
    ds = load_dataset(synth_dir)
    ids = sorted(ds.items)[:3]
    before = token_cache.images_signature(ds, ids)
    monkeypatch.setattr(token_cache, "IMAGE_DECODE_RULE", token_cache.IMAGE_DECODE_RULE + 1)
    assert token_cache.images_signature(ds, ids) != before


def test_non_utf8_and_unparsable_csv_name_the_file(synth_dir, tmp_path):
    d = _copy(synth_dir, tmp_path)
    with open(d / "items.jsonl", "ab") as f:
        f.write(b'{"item_id": "caf\xe9", "title": "", "image": null}\n')
    with pytest.raises(DataError, match=r"items\.jsonl: not UTF-8 text .*byte 0xe9"):
        load_dataset(d)
    rep = validate_dataset(d)  # validate reports it instead of raising
    assert not rep.usable and "items.jsonl: not UTF-8 text" in rep.problems[0]
    shutil.rmtree(d)
    d = _copy(synth_dir, tmp_path)
    _append_row(d, 'u0,i0,"' + "x" * 200_000 + '"')  # over the csv module's field limit
    n = len((d / "interactions.csv").read_text().splitlines())
    with pytest.raises(DataError, match=rf"interactions\.csv:{n}: malformed CSV \(field larger"):
        load_dataset(d, on_error="skip")


def test_byte_order_mark_is_accepted(synth_dir, tmp_path):
    # an Excel-style UTF-8 BOM used to make the header lack 'user_id' ('\ufeffuser_id')
    # and items.jsonl's first line malformed JSON
    d = _copy(synth_dir, tmp_path)
    for name in ("interactions.csv", "items.jsonl"):
        (d / name).write_bytes(b"\xef\xbb\xbf" + (d / name).read_bytes())
    ds = load_dataset(d)
    assert ds.num_users == 23 and ds.num_items == 57
    assert validate_dataset(d).usable


def test_write_dataset_never_replaces_a_folder_that_is_not_a_dataset(tmp_path):
    # `pgen data synth/convert --out SOME_FOLDER` used to replace any folder with the dataset
    keep = tmp_path / "docs"
    keep.mkdir()
    (keep / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match=r"docs: exists and is not a dataset \(no items\.jsonl\)"):
        write_dataset(keep, [{"item_id": "a", "title": "", "image": None}], [("u", "a", 1)])
    assert (keep / "notes.txt").read_text() == "keep me"
    d = write_dataset(tmp_path / "ds", [{"item_id": "a", "title": "", "image": None}], [("u", "a", 1)])
    write_dataset(d, [{"item_id": "b", "title": "", "image": None}], [("u", "b", 1)])  # a dataset: replaced
    assert list(load_dataset(d).items) == ["b"]

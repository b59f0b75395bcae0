import json

import pytest
from PIL import Image

from pgen_engine.data.convert import convert_amazon2023, convert_microlens
from pgen_engine.data.dataset import DataError, load_dataset


def _img(path, color):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (6, 9), color).save(path)


def test_amazon2023(tmp_path):
    imgs = tmp_path / "imgs"
    for a in ("A1", "A2"):
        _img(imgs / f"{a}.jpg", (10, 20, 30))
    meta = [{"parent_asin": "A1", "title": "Mug", "images": [{"large": "x"}], "store": "s"},
            {"parent_asin": "A2", "title": None, "images": []},
            {"parent_asin": "A3", "title": "no image", "images": []}]
    reviews = [{"user_id": "U1", "parent_asin": "A2", "timestamp": 3000},
               {"user_id": "U1", "parent_asin": "A1", "timestamp": 1000},
               {"user_id": "U2", "parent_asin": "A3", "timestamp": 2000},
               {"user_id": "U2", "parent_asin": "A1", "timestamp": 1500}]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(m) + "\n" for m in meta))
    (tmp_path / "r.jsonl").write_text("".join(json.dumps(r) + "\n" for r in reviews))
    stats = convert_amazon2023(tmp_path / "r.jsonl", tmp_path / "m.jsonl", imgs, tmp_path / "out")
    assert stats == {"users": 2, "items": 2, "interactions": 3, "dropped_items": 1, "dropped_interactions": 1}
    ds = load_dataset(tmp_path / "out")
    assert ds.item_sequence("U1") == ["A1", "A2"]
    assert ds.interactions["U1"][0].timestamp == 1.0
    assert ds.items["A1"].title == "Mug" and ds.items["A1"].extra["store"] == "s"
    (tmp_path / "r.jsonl").write_text('{"user_id": "U1"}\n')
    with pytest.raises(DataError, match="r.jsonl:1"):
        convert_amazon2023(tmp_path / "r.jsonl", tmp_path / "m.jsonl", imgs, tmp_path / "out")
    assert load_dataset(tmp_path / "out").num_interactions == 3  # failed run left the old output intact


def test_microlens(tmp_path):
    covers = tmp_path / "covers"
    for i in ("10", "11"):
        _img(covers / f"{i}.jpg", (200, 0, 0))
    (tmp_path / "i.csv").write_text("user,item,timestamp\n1,11,1700000000500\n1,10,1600000000000\n2,99,5\n2,10,7\n")
    stats = convert_microlens(tmp_path / "i.csv", covers, tmp_path / "out")
    assert stats["interactions"] == 3 and stats["dropped_items"] == 1
    ds = load_dataset(tmp_path / "out")
    assert ds.item_sequence("1") == ["10", "11"] and ds.interactions["1"][0].timestamp == 1600000000.0
    # an upper-case extension (.JPG, as cameras write) is the item's cover too: it used to be
    # missed, and the item and its interactions dropped
    (covers / "10.jpg").rename(covers / "10.JPG")
    stats = convert_microlens(tmp_path / "i.csv", covers, tmp_path / "out")
    assert stats["interactions"] == 3 and stats["dropped_items"] == 1
    assert load_dataset(tmp_path / "out").items["10"].image_path.name == "10.JPG"
    (tmp_path / "j.csv").write_text("uid,iid,ts\n")
    with pytest.raises(DataError, match="header"):
        convert_microlens(tmp_path / "j.csv", covers, tmp_path / "o2")


@pytest.mark.parametrize("review,needle", [
    # a NaN timestamp and a null user_id used to be written out ("nan", "None") and the run exited 0
    ({"user_id": "U1", "parent_asin": "A1", "timestamp": "NaN"}, r"r\.jsonl:1: timestamp 'NaN' is not milliseconds"),
    ({"user_id": None, "parent_asin": "A1", "timestamp": 1000}, r"r\.jsonl:1: 'user_id' must be a non-empty string"),
    ({"user_id": " ", "parent_asin": "A1", "timestamp": 1000}, r"r\.jsonl:1: 'user_id' must be a non-empty string"),
    ({"user_id": "U1", "parent_asin": "A1", "timestamp": 1e300}, r"r\.jsonl:1: timestamp 1e\+300 is not milliseconds"),
])
def test_amazon2023_bad_review_fields(tmp_path, review, needle):
    _img(tmp_path / "imgs" / "A1.jpg", (1, 2, 3))
    (tmp_path / "m.jsonl").write_text(json.dumps({"parent_asin": "A1", "title": "x"}) + "\n")
    (tmp_path / "r.jsonl").write_text(json.dumps(review) + "\n")
    with pytest.raises(DataError, match=needle):
        convert_amazon2023(tmp_path / "r.jsonl", tmp_path / "m.jsonl", tmp_path / "imgs", tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("data,needle", [
    (b"user,item,timestamp\n,A1,5\n", r"i\.csv:2: empty user id"),  # used to be written out as-is
    (b"user,item,timestamp\nu,A1,caf\xe9\n", r"i\.csv: not UTF-8 text"),  # used to be a bare UnicodeDecodeError
    (b'user,item,timestamp\nu,A1,"' + b"x" * 200_000 + b'"\n', r"i\.csv:2: malformed CSV"),  # a _csv.Error traceback
])
def test_microlens_bad_input(tmp_path, data, needle):
    _img(tmp_path / "covers" / "A1.jpg", (1, 2, 3))
    (tmp_path / "i.csv").write_bytes(data)
    with pytest.raises(DataError, match=needle):
        convert_microlens(tmp_path / "i.csv", tmp_path / "covers", tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("bad", ["../secret", "a/b", "..", "x\\y", "z" * 300])
def test_ids_that_are_not_plain_file_names_are_refused(tmp_path, bad):
    # an id names its image file: "../secret" would read tmp_path/secret.jpg outside the image
    # folder and write images/../secret.jpg outside the output's images/
    _img(tmp_path / "secret.jpg", (9, 9, 9))
    _img(tmp_path / "imgs" / "A1.jpg", (1, 2, 3))
    (tmp_path / "m.jsonl").write_text(json.dumps({"parent_asin": bad, "title": "x"}) + "\n")
    (tmp_path / "r.jsonl").write_text(json.dumps({"user_id": "U", "parent_asin": bad, "timestamp": 10**12}) + "\n")
    with pytest.raises(DataError, match=r"m\.jsonl:1: parent_asin .* cannot name an image file"):
        convert_amazon2023(tmp_path / "r.jsonl", tmp_path / "m.jsonl", tmp_path / "imgs", tmp_path / "out")
    (tmp_path / "i.csv").write_text(f"user,item,timestamp\nu,A1,5\nu,\"{bad}\",6\n")
    with pytest.raises(DataError, match=r"i\.csv:3: item .* cannot name an image file"):
        convert_microlens(tmp_path / "i.csv", tmp_path / "imgs", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_conversion_with_no_interaction_left_writes_nothing(tmp_path):
    # every item without an image (or no rows at all): an empty dataset used to be written, exit 0
    _img(tmp_path / "imgs" / "other.jpg", (1, 2, 3))
    (tmp_path / "i.csv").write_text("user,item,timestamp\nu,A1,5\nu,A2,6\n")
    with pytest.raises(DataError, match=r"i\.csv: no interaction is of an item with a cover in .*imgs "
                                        r"\(looked for <id>\.jpg\|\.jpeg\|\.png\|\.webp\); nothing written"):
        convert_microlens(tmp_path / "i.csv", tmp_path / "imgs", tmp_path / "out")
    (tmp_path / "m.jsonl").write_text(json.dumps({"parent_asin": "A1", "title": "x"}) + "\n")
    (tmp_path / "r.jsonl").write_text(json.dumps({"user_id": "U", "parent_asin": "A1", "timestamp": 10**12}) + "\n")
    with pytest.raises(DataError, match=r"r\.jsonl: no review is of an item of .*m\.jsonl with an image in"):
        convert_amazon2023(tmp_path / "r.jsonl", tmp_path / "m.jsonl", tmp_path / "imgs", tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("source,data,needle", [
    # the csv module keeps NUL bytes: "u\0" was written out as a user, and the dataset loader then refused the line
    ("microlens", b"user,item,timestamp\nu,A1,5\nu\0,A1,6\n", r"i\.csv:3: NUL byte in a field"),
    ("microlens", b"user,item,timestamp\nu,A1,5\x00\n", r"i\.csv:2: NUL byte in a field"),
    ("microlens", b"user\0,item,timestamp\nu,A1,5\n", r"i\.csv:1: NUL byte in a field"),
    ("amazon", b'{"user_id": "U", "parent_asin": "A1", "timestamp": 1000000000000}\n{"user_id": "U\0"}\n',
     r"r\.jsonl:2: NUL byte in the line"),
    ("amazon", b'{"user_id": "U\\u0000", "parent_asin": "A1", "timestamp": 1000000000000}\n',
     r"r\.jsonl:1: 'user_id' .*: NUL byte in a field"),
])
def test_nul_bytes_are_refused_naming_file_and_line(tmp_path, source, data, needle):
    _img(tmp_path / "imgs" / "A1.jpg", (1, 2, 3))
    if source == "microlens":
        (tmp_path / "i.csv").write_bytes(data)
        with pytest.raises(DataError, match=needle):
            convert_microlens(tmp_path / "i.csv", tmp_path / "imgs", tmp_path / "out")
    else:
        (tmp_path / "m.jsonl").write_text(json.dumps({"parent_asin": "A1", "title": "x"}) + "\n")
        (tmp_path / "r.jsonl").write_bytes(data)
        with pytest.raises(DataError, match=needle):
            convert_amazon2023(tmp_path / "r.jsonl", tmp_path / "m.jsonl", tmp_path / "imgs", tmp_path / "out")
    assert not (tmp_path / "out").exists()

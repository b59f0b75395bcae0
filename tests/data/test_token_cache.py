import json
import shutil

import numpy as np
import pytest
import torch

from pgen_engine.data.dataset import DataError, load_dataset, load_image
from pgen_engine.data.token_cache import TokenCache, build_token_cache
from pgen_engine.models.patch_kmeans import PatchKMeansTokenizer
from tests.fs_faults import file_size_limit


def _tok(ds, size=32, k=23, seed=0):
    imgs = torch.from_numpy(np.stack([load_image(it.image_path, size) for it in list(ds.items.values())[:20]]))
    return PatchKMeansTokenizer.fit(imgs, patch_size=8, codebook_size=k, iters=3, seed=seed)


def test_build_lookup_and_refuse_other_tokenizer(synth_dir, tmp_path):
    ds = load_dataset(synth_dir)
    tok = _tok(ds)
    cache = build_token_cache(ds, tok, tmp_path / "c", batch_size=7, progress=False)
    ids = list(ds.items)[::-1][:13]
    want = tok.encode(torch.from_numpy(np.stack([load_image(ds.items[i].image_path, 32) for i in ids])))
    got = cache.codes(ids)
    assert got.dtype == torch.int64 and torch.equal(got, want)
    assert len(cache) == 57 and ids[0] in cache
    other = _tok(ds, k=19)
    with pytest.raises(DataError, match="built by tokenizer"):
        TokenCache.open(tmp_path / "c", other.fingerprint())
    with pytest.raises(KeyError, match="nope"):
        cache.codes(["nope"])
    assert TokenCache.open(tmp_path / "c", tok.fingerprint()).codes(ids).equal(want)


def test_resume_after_crash_and_existing_cache_untouched(synth_dir, tmp_path):
    ds = load_dataset(synth_dir)
    tok = _tok(ds)
    good = build_token_cache(ds, tok, tmp_path / "c", batch_size=10, progress=False)
    before = (tmp_path / "c" / "codes.bin").read_bytes()
    tok2 = _tok(ds, k=31, seed=1)
    calls = []
    orig = tok2.encode

    def counting(x):
        calls.append(x.shape[0])
        return orig(x)

    tok2.encode = counting
    with pytest.raises(KeyboardInterrupt):
        build_token_cache(ds, tok2, tmp_path / "c", batch_size=10, progress=False, _stop_after_batches=3)
    # the old cache is intact and still opens with its own tokenizer
    assert (tmp_path / "c" / "codes.bin").read_bytes() == before
    assert TokenCache.open(tmp_path / "c", tok.fingerprint()).codes(["i0000"]).equal(good.codes(["i0000"]))
    done_before = sum(calls)
    assert done_before == 30
    cache = build_token_cache(ds, tok2, tmp_path / "c", batch_size=10, progress=False)
    assert sum(calls) == 57  # resumed: only the remaining 27 images were encoded
    ids = list(ds.items)
    full = orig(torch.from_numpy(np.stack([load_image(ds.items[i].image_path, 32) for i in ids])))
    assert torch.equal(cache.codes(ids), full)
    assert cache.fingerprint == tok2.fingerprint()
    # unchanged inputs -> reused without encoding
    build_token_cache(ds, tok2, tmp_path / "c", batch_size=10, progress=False)
    assert sum(calls) == 57


def test_corrupt_image_raise_and_skip(synth_dir, tmp_path):
    d = tmp_path / "ds"
    shutil.copytree(synth_dir, d)
    ds = load_dataset(d)
    tok = _tok(ds)
    bad = ds.items["i0003"].image_path
    bad.write_bytes(b"\x89PNG broken")
    with pytest.raises(DataError, match="i0003.png"):
        build_token_cache(ds, tok, tmp_path / "c", progress=False)
    assert not (tmp_path / "c").exists()
    with pytest.warns(UserWarning, match="skipped 1"):
        cache = build_token_cache(ds, tok, tmp_path / "c", progress=False, on_error="skip")
    assert "i0003" not in cache and len(cache) == 56
    with pytest.raises(KeyError, match="i0003"):
        cache.codes(["i0003"])
    assert json.loads((tmp_path / "c" / "index.json").read_text())["complete"]


def test_item_without_an_image_names_items_jsonl(synth_dir, tmp_path):
    # used to say only "item 'i0003' has no image", without the file to fix
    d = tmp_path / "ds"
    shutil.copytree(synth_dir, d)
    lines = [json.loads(x) for x in (d / "items.jsonl").read_text().splitlines()]
    tok = _tok(load_dataset(d))
    lines[3]["image"] = None
    (d / "items.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    ds = load_dataset(d)
    iid, path = lines[3]["item_id"], d / "items.jsonl"
    with pytest.raises(DataError, match=rf"{path}: item '{iid}' has no image "
                                        r'\("image": null\); every item needs one to be tokenized'):
        build_token_cache(ds, tok, tmp_path / "c", progress=False)
    assert not (tmp_path / "c").exists()


def test_movielens_subset(movielens, tmp_path):
    ds = load_dataset(movielens)
    ids = list(ds.items)[:200]
    imgs = torch.from_numpy(np.stack([load_image(ds.items[i].image_path, 32) for i in ids[:30]]))
    tok = PatchKMeansTokenizer.fit(imgs, patch_size=4, codebook_size=64, iters=3, seed=0)
    cache = build_token_cache(ds, tok, tmp_path / "ml", item_ids=ids, batch_size=64, progress=False)
    c = cache.codes(ids[:5])
    assert c.shape == (5, 64) and len(cache) == 200
    assert torch.equal(c, tok.encode(imgs[:5]))


def test_cache_features(synth_dir, tmp_path):
    from safetensors import safe_open

    from pgen_engine.data.token_cache import cache_features

    ds = load_dataset(synth_dir)
    ids = list(ds.items)[:9]
    cache_features(ds, lambda x: x.float().mean((1, 2)), tmp_path / "f.safetensors", image_size=32,
                   batch_size=4, item_ids=ids)
    with safe_open(str(tmp_path / "f.safetensors"), framework="pt") as f:
        feats = f.get_tensor("features")
        assert json.loads(f.metadata()["item_ids"]) == ids
    want = torch.from_numpy(load_image(ds.items[ids[5]].image_path, 32)).float().mean((0, 1))
    assert feats.shape == (9, 3) and torch.allclose(feats[5], want)


def test_cache_of_other_images_with_the_same_ids_is_rebuilt_not_reused(synth_dir, tmp_path):
    # two datasets sharing item ids (synthetic ones with other seeds, or an image replaced in
    # place) used to get the first one's codes back from the cache
    from pgen_engine.data.synth import SynthConfig, generate_synthetic

    ds = load_dataset(synth_dir)
    tok = _tok(ds)
    build_token_cache(ds, tok, tmp_path / "c", progress=False)
    other = load_dataset(generate_synthetic(tmp_path / "other", SynthConfig(num_users=23, num_items=57, seed=6)))
    assert list(other.items) == list(ds.items)
    ids = list(other.items)
    want = tok.encode(torch.from_numpy(np.stack([load_image(other.items[i].image_path, 32) for i in ids])))
    assert not torch.equal(want, TokenCache.open(tmp_path / "c", tok.fingerprint()).codes(ids))
    assert torch.equal(build_token_cache(other, tok, tmp_path / "c", progress=False).codes(ids), want)
    # the same dataset again: reused (nothing re-encoded)
    tok.encode = lambda x: (_ for _ in ()).throw(AssertionError("re-encoded an unchanged dataset"))
    assert torch.equal(build_token_cache(other, tok, tmp_path / "c", progress=False).codes(ids), want)


def test_cache_never_replaces_a_folder_that_is_not_a_cache(synth_dir, tmp_path):
    # `pgen data tokenize DS --out DS` (or DS/images) used to replace the dataset with the cache
    import shutil

    d = tmp_path / "ds"
    shutil.copytree(synth_dir, d)
    ds = load_dataset(d)
    tok = _tok(ds)
    for target in (d, d / "images"):
        with pytest.raises(DataError, match=rf"{target}: exists and is not a token cache"):
            build_token_cache(ds, tok, target, progress=False)
    assert load_dataset(d).num_items == 57 and len(list((d / "images").iterdir())) == 57
    (tmp_path / "empty").mkdir()
    assert len(build_token_cache(ds, tok, tmp_path / "empty", progress=False)) == 57
    assert len(build_token_cache(ds, _tok(ds, k=19), tmp_path / "empty", progress=False)) == 57  # a cache: replaced


@pytest.mark.parametrize("damage", ["truncate_done", "truncate_codes", "codes_out_of_range", "done_zeroed",
                                    "staging_truncated"])
def test_damaged_cache_is_rebuilt_by_build_and_refused_by_open(synth_dir, tmp_path, damage):
    # a truncated done.bin used to end in numpy's "mmap length is greater than file size";
    # out-of-range codes or cleared done-bits reached the model (IndexError / KeyError mid-training)
    ds = load_dataset(synth_dir)
    tok = _tok(ds)
    c = tmp_path / "c"
    want = build_token_cache(ds, tok, c, progress=False).codes(list(ds.items))
    if damage == "staging_truncated":  # a crashed build whose staged files were cut short
        stage = tmp_path / ".s.partial"
        with pytest.raises(KeyboardInterrupt):
            build_token_cache(ds, tok, tmp_path / "s", batch_size=10, progress=False, _stop_after_batches=1)
        with open(stage / "done.bin", "r+b") as f:
            f.truncate(3)
        assert torch.equal(build_token_cache(ds, tok, tmp_path / "s", progress=False).codes(list(ds.items)), want)
        return
    if damage == "truncate_done":
        with open(c / "done.bin", "r+b") as f:
            f.truncate(5)
    elif damage == "truncate_codes":
        with open(c / "codes.bin", "r+b") as f:
            f.truncate(100)
    elif damage == "codes_out_of_range":
        raw = np.fromfile(c / "codes.bin", dtype=np.int16)
        raw[3] = 30000
        raw.tofile(c / "codes.bin")
    else:
        (c / "done.bin").write_bytes(bytes((c / "done.bin").stat().st_size))
    with pytest.raises(DataError, match=rf"{c}.*(corrupt|not marked done).*delete"):
        TokenCache.open(c, tok.fingerprint())
    with pytest.warns(UserWarning, match="rebuilding the token cache"):
        got = build_token_cache(ds, tok, c, progress=False).codes(list(ds.items))
    assert torch.equal(got, want)


def test_crash_between_a_skip_and_its_index_entry_is_retried_not_a_broken_cache(synth_dir, tmp_path, monkeypatch):
    # a crash after a skipped item's done-bit but before index.json listed it: the rerun marked
    # the cache complete with an unlisted skip, replaced the good old cache and then refused it
    import pgen_engine.data.token_cache as tc
    d = tmp_path / "ds"
    shutil.copytree(synth_dir, d)
    ds = load_dataset(d)
    tok = _tok(ds)
    build_token_cache(ds, tok, tmp_path / "c", progress=False)
    ds.items["i0003"].image_path.write_bytes(b"\x89PNG broken")
    ds = load_dataset(d)
    orig = tc.atomic_write_json

    def crash_on_skip(path, obj, **kw):
        if obj.get("skipped"):
            raise KeyboardInterrupt("simulated crash before the skip is recorded")
        return orig(path, obj, **kw)

    monkeypatch.setattr(tc, "atomic_write_json", crash_on_skip)
    with pytest.raises(KeyboardInterrupt):
        build_token_cache(ds, tok, tmp_path / "c", progress=False, on_error="skip")
    monkeypatch.setattr(tc, "atomic_write_json", orig)
    with pytest.warns(UserWarning, match="skipped 1"):
        cache = build_token_cache(ds, tok, tmp_path / "c", progress=False, on_error="skip")
    assert "i0003" in cache.skipped and "i0003" not in cache and len(cache) == 56
    assert TokenCache.open(tmp_path / "c", tok.fingerprint()).skipped == cache.skipped


def test_full_disk_while_creating_the_cache_names_the_file_and_keeps_the_old_cache(synth_dir, tmp_path, monkeypatch):
    # numpy's sparse codes.bin failed with a bare "[Errno 27] File too large" (no file named) and, on a
    # disk that filled up later, a write through the memory map was a SIGBUS; the blocks are now
    # reserved up front, and a failure removes the staging folder (nothing to resume)
    import errno
    import os

    ds = load_dataset(synth_dir)
    tok = _tok(ds)
    build_token_cache(ds, tok, tmp_path / "c", batch_size=10, progress=False)
    before = {f.name: f.read_bytes() for f in (tmp_path / "c").iterdir()}
    other = _tok(ds, k=31, seed=1)
    with file_size_limit(1024), pytest.raises(OSError) as info:  # EFBIG past 1 KiB, as on a full disk
        build_token_cache(ds, other, tmp_path / "c", batch_size=10, progress=False)
    assert info.value.errno == errno.EFBIG and info.value.filename == str(tmp_path / ".c.partial" / "codes.bin")
    assert {f.name: f.read_bytes() for f in (tmp_path / "c").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]

    def no_space(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", no_space)
    with pytest.raises(OSError, match="No space left on device: .*codes.bin"):
        build_token_cache(ds, other, tmp_path / "c", batch_size=10, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]
    monkeypatch.undo()
    cache = build_token_cache(ds, other, tmp_path / "c", batch_size=10, progress=False)
    assert cache.fingerprint == other.fingerprint() and len(cache) == 57
    assert (tmp_path / "c" / "codes.bin").stat().st_blocks * 512 >= (tmp_path / "c" / "codes.bin").stat().st_size


def test_a_cache_path_that_is_a_file_is_refused_before_any_image_is_encoded(synth_dir, tmp_path):
    # --out notes.txt: every image was encoded, then replace_dir refused the file and the complete
    # staging folder .notes.txt.partial stayed behind; notes.txt/sub: "[Errno 20] Not a directory"
    ds = load_dataset(synth_dir)
    tok = _tok(ds)
    calls = []
    orig = tok.encode
    tok.encode = lambda x: calls.append(len(x)) or orig(x)
    f = tmp_path / "notes.txt"
    f.write_text("keep me")
    with pytest.raises(DataError, match=r"notes\.txt: exists and is not a folder \(expected the token cache folder\)"):
        build_token_cache(ds, tok, f, progress=False)
    with pytest.raises(DataError, match=r"notes\.txt/sub: cannot be created: .*notes\.txt is a file, not a folder"):
        build_token_cache(ds, tok, f / "sub", progress=False)
    assert calls == [] and f.read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]

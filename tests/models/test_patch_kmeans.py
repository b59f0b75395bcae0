import pytest
import torch

from pgen_engine.models.patch_kmeans import PatchKMeansTokenizer


def _images(n, size, seed):
    g = torch.Generator().manual_seed(seed)
    # smooth-ish random images: upsampled noise so patches cluster
    small = torch.randint(0, 256, (n, 3, size // 4, size // 4), generator=g).float()
    return torch.nn.functional.interpolate(small, size=(size, size), mode="nearest").permute(0, 2, 3, 1).to(torch.uint8)


@pytest.mark.parametrize("size,p,k", [(12, 3, 17), (16, 4, 40), (20, 2, 7)])
def test_encode_decode_stable(size, p, k):
    imgs = _images(9, size, seed=size)
    tok = PatchKMeansTokenizer.fit(imgs, patch_size=p, codebook_size=k, iters=5, seed=1)
    assert (tok.num_tokens, tok.codebook_size, tok.image_size) == ((size // p) ** 2, k, size)
    codes = tok.encode(imgs)
    assert codes.dtype == torch.int64 and codes.shape == (9, (size // p) ** 2)
    assert int(codes.min()) >= 0 and int(codes.max()) < k
    rand = torch.randint(0, k, (5, tok.num_tokens), generator=torch.Generator().manual_seed(size))
    dec = tok.decode(rand)
    assert dec.dtype == torch.uint8 and dec.shape == (5, size, size, 3)
    assert torch.equal(tok.encode(dec), rand)
    # reconstruction is closer than the mean image
    err = (tok.decode(codes).float() - imgs.float()).pow(2).mean()
    base = (imgs.float() - imgs.float().mean((0, 1, 2))).pow(2).mean()
    assert err < base


def test_row_major_layout():
    book = torch.stack([torch.full((2, 2, 3), v, dtype=torch.uint8) for v in (0, 100, 200)])
    tok = PatchKMeansTokenizer(book, 4)
    img = tok.decode(torch.tensor([[0, 1, 2, 0]]))
    assert img[0, 0, 2, 0] == 100 and img[0, 2, 0, 0] == 200 and img[0, 3, 3, 0] == 0


def test_fewer_distinct_patches_than_k_still_distinct():
    imgs = torch.zeros(2, 8, 8, 3, dtype=torch.uint8)
    tok = PatchKMeansTokenizer.fit(imgs, patch_size=4, codebook_size=6, iters=3, seed=0)
    r = torch.arange(6).repeat(1, 1)[:, :4]
    assert torch.equal(tok.encode(tok.decode(r)), r)
    assert torch.equal(tok.encode(imgs), torch.zeros(2, 4, dtype=torch.long))


def test_deterministic_save_load_fingerprint(tmp_path):
    imgs = _images(6, 16, seed=3)
    a = PatchKMeansTokenizer.fit(imgs, patch_size=4, codebook_size=11, iters=4, seed=7)
    b = PatchKMeansTokenizer.fit(imgs, patch_size=4, codebook_size=11, iters=4, seed=7)
    assert a.fingerprint() == b.fingerprint()
    c = PatchKMeansTokenizer.fit(imgs, patch_size=4, codebook_size=12, iters=4, seed=7)
    assert c.fingerprint() != a.fingerprint()
    a.save(tmp_path / "t.safetensors")
    l = PatchKMeansTokenizer.load(tmp_path / "t.safetensors")
    assert l.fingerprint() == a.fingerprint() and torch.equal(l.encode(imgs), a.encode(imgs))
    (tmp_path / "bad.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="bad.safetensors"):
        PatchKMeansTokenizer.load(tmp_path / "bad.safetensors")
    with pytest.raises(FileNotFoundError):
        PatchKMeansTokenizer.load(tmp_path / "none.safetensors")


def test_bad_inputs():
    imgs = _images(2, 16, seed=0)
    tok = PatchKMeansTokenizer.fit(imgs, patch_size=4, codebook_size=5, iters=2, seed=0)
    with pytest.raises(TypeError):
        tok.encode(imgs.float())
    with pytest.raises(ValueError):
        tok.encode(_images(1, 12, seed=0))
    with pytest.raises(ValueError):
        tok.decode(torch.zeros(1, 15, dtype=torch.long))
    with pytest.raises(ValueError):
        tok.decode(torch.full((1, 16), 5, dtype=torch.long))
    with pytest.raises(ValueError):
        PatchKMeansTokenizer.fit(imgs, patch_size=5, codebook_size=4)
    with pytest.raises(ValueError):
        PatchKMeansTokenizer(torch.zeros(2, 4, 4, 3, dtype=torch.uint8), 16)  # duplicate codewords


def test_load_of_an_edited_file_names_the_file(tmp_path):
    # a codebook of the wrong dtype/shape or an image_size the patches do not divide used to be
    # reported without the file ("codebook must be a uint8 tensor ...")
    from safetensors import safe_open
    from safetensors.torch import save_file

    tok = PatchKMeansTokenizer.fit(_images(4, 16, seed=1), patch_size=4, codebook_size=6, iters=2, seed=0)
    tok.save(tmp_path / "t.safetensors")
    with safe_open(str(tmp_path / "t.safetensors"), "pt") as f:
        meta, book = f.metadata(), f.get_tensor("codebook")
    cases = {"float": ({"codebook": book.float()}, meta, "uint8"),
             "img": ({"codebook": book}, {**meta, "image_size": "18"}, "multiple of patch_size"),
             "nosize": ({"codebook": book}, {k: v for k, v in meta.items() if k != "image_size"}, "image_size")}
    for name, (tensors, md, needle) in cases.items():
        save_file(tensors, tmp_path / f"{name}.safetensors", metadata=md)
        with pytest.raises(ValueError, match=rf"{name}\.safetensors: invalid PatchKMeans tokenizer \(.*{needle}"):
            PatchKMeansTokenizer.load(tmp_path / f"{name}.safetensors")

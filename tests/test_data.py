"""Data loaders of zoneout_fused.train: tiny files in the real formats, never the network."""
import gzip
import os
import struct

import pytest
import torch

os.environ["ZONEOUT_FUSED_OFFLINE"] = "1"  # no code path here may download

from zoneout_fused.train import data as D  # noqa: E402


pytestmark = pytest.mark.usefixtures("offline_data")


def write_idx(path, array: torch.Tensor):
    header = struct.pack(">HBB", 0, 0x08, array.dim()) + struct.pack(f">{array.dim()}I", *array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.to(torch.uint8).numpy().tobytes())


def test_downloads_allowed_reads_env_and_flag(monkeypatch):
    assert not D.downloads_allowed()
    monkeypatch.setenv(D.OFFLINE_ENV, "0")
    assert D.downloads_allowed()
    assert not D.downloads_allowed(no_download=True)


def test_ptb_missing_says_where_and_how(tmp_path):
    with pytest.raises(D.DataError) as info:
        D.load_ptb(tmp_path, "word", download=D.downloads_allowed())
    message = str(info.value)
    assert str(tmp_path) in message and "ptb.train.txt" in message
    assert "simple-examples" in message and "http" in message


def test_ptb_checksum_mismatch_is_reported(tmp_path):
    for f in D.ptb_filenames("char"):
        (tmp_path / f).write_text("a b _ c\n")
    with pytest.raises(D.DataError, match="md5"):
        D.load_ptb(tmp_path, "char", download=False)


def test_ptb_word_and_char_tokenisation(tmp_path, monkeypatch):
    monkeypatch.setattr(D, "md5_of", lambda path, uncompressed=False: D.PTB_MD5[path.name])
    sub = tmp_path / "ptb"
    sub.mkdir()
    (sub / "ptb.train.txt").write_text(" the cat <unk> \n a cat \n")
    (sub / "ptb.valid.txt").write_text(" the cat \n")
    (sub / "ptb.test.txt").write_text(" a \n")
    corpus = D.load_ptb(tmp_path, "word", download=False)
    assert corpus.vocab == sorted(["the", "cat", "<unk>", "<eos>", "a"])
    words = [corpus.vocab[i] for i in corpus.train]
    assert words == ["the", "cat", "<unk>", "<eos>", "a", "cat", "<eos>"]
    assert corpus.valid.numel() == 3 and corpus.test.numel() == 2

    (sub / "ptb.char.train.txt").write_text("a b _ c a\nb a\n")
    (sub / "ptb.char.valid.txt").write_text("a _ b\n")
    (sub / "ptb.char.test.txt").write_text("c\n")
    chars = D.load_ptb(tmp_path, "char", download=False)
    assert chars.vocab == sorted(["a", "b", "_", "c", "\n"])
    assert "".join(chars.vocab[i] for i in chars.train) == "ab_ca\nba\n"


def test_ptb_unknown_token_in_valid(tmp_path, monkeypatch):
    monkeypatch.setattr(D, "md5_of", lambda path, uncompressed=False: D.PTB_MD5[path.name])
    (tmp_path / "ptb.train.txt").write_text("a b\n")
    (tmp_path / "ptb.valid.txt").write_text("zzz\n")
    (tmp_path / "ptb.test.txt").write_text("a\n")
    with pytest.raises(D.DataError, match="zzz"):
        D.load_ptb(tmp_path, "word", download=False)


def test_text8_prefix_splits_proportionally_and_warns(tmp_path):
    text = ("anarchism originated as a term " * 40)[:1000]
    (tmp_path / "text8.prefix").write_text(text)
    with pytest.warns(UserWarning, match="90/5/5"):
        corpus = D.load_text8(tmp_path, download=False)
    assert (corpus.train.numel(), corpus.valid.numel(), corpus.test.numel()) == (900, 50, 50)
    assert corpus.vocab_size == 27
    assert "".join(corpus.vocab[i] for i in corpus.train[:9]) == "anarchism"


def test_text8_rejects_other_characters(tmp_path):
    (tmp_path / "text8").write_text("Hello, World\n")
    with pytest.raises(D.DataError, match="a-z"):
        D.load_text8(tmp_path, download=False)


def test_text8_missing(tmp_path):
    with pytest.raises(D.DataError, match="mattmahoney.net"):
        D.load_text8(tmp_path, download=False)


def write_mnist(directory, n_train=12, n_test=6):
    g = torch.Generator().manual_seed(0)
    directory.mkdir(parents=True, exist_ok=True)
    write_idx(directory / "train-images-idx3-ubyte.gz", torch.randint(0, 256, (n_train, 28, 28), generator=g))
    write_idx(directory / "train-labels-idx1-ubyte.gz", torch.randint(0, 10, (n_train,), generator=g))
    write_idx(directory / "t10k-images-idx3-ubyte.gz", torch.randint(0, 256, (n_test, 28, 28), generator=g))
    write_idx(directory / "t10k-labels-idx1-ubyte.gz", torch.randint(0, 10, (n_test,), generator=g))


def test_mnist_idx_and_fixed_permutation(tmp_path):
    write_mnist(tmp_path / "mnist")
    plain = D.load_mnist(tmp_path, download=False, valid_size=2, permute=False, verify=False)
    permuted = D.load_mnist(tmp_path, download=False, valid_size=2, permute=True, verify=False)
    assert plain.train[0].shape == (10, 784) and plain.valid[0].shape == (2, 784)
    assert plain.test[0].shape == (6, 784)
    assert 0.0 <= plain.train[0].min() and plain.train[0].max() <= 1.0
    perm = D.pixel_permutation()
    assert torch.equal(perm, D.pixel_permutation())  # fixed, whatever the global seed
    torch.manual_seed(123)
    assert torch.equal(perm, D.pixel_permutation())
    assert torch.equal(permuted.train[0], plain.train[0][:, perm])
    assert torch.equal(permuted.train[1], plain.train[1])


def test_mnist_checksum_and_truncation_errors(tmp_path):
    write_mnist(tmp_path)
    with pytest.raises(D.DataError, match="md5"):
        D.load_mnist(tmp_path, download=False)  # tiny files are not the real MNIST
    # A truncated idx body.
    raw = gzip.decompress((tmp_path / "t10k-labels-idx1-ubyte.gz").read_bytes())
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(raw[:-2]))
    with pytest.raises(D.DataError, match="truncated"):
        D.load_mnist(tmp_path, download=False, verify=False)


def test_mnist_missing_names_paths_and_url(tmp_path):
    with pytest.raises(D.DataError) as info:
        D.load_mnist(tmp_path / "nowhere", download=False)
    assert "train-images-idx3-ubyte.gz" in str(info.value) and "nowhere" in str(info.value)
    assert "https://" in str(info.value)


def test_batchify_and_windows():
    ids = torch.arange(23)
    stream = D.batchify(ids, 4)  # 5 rows of 4 columns, 3 tokens dropped
    assert stream.shape == (5, 4)
    assert stream[:, 1].tolist() == [5, 6, 7, 8, 9]  # each column is contiguous
    windows = list(D.lm_batches(stream, 3))
    assert D.lm_num_batches(stream, 3) == len(windows) == 2
    _, x, y = windows[1]
    assert x.shape == (1, 4) and torch.equal(y, stream[4:5])
    assert [w[0] for w in D.lm_batches(stream, 3, start=1)] == [1]
    with pytest.raises(D.DataError):
        D.batchify(torch.arange(3), 4)


def test_shared_copies_verify_if_present():
    """The project's real data (../shared/data) passes the checksums; skipped where absent."""
    shared = D.REPO_ROOT.parent / "shared" / "data"
    if not (shared / "ptb" / "ptb.char.valid.txt").is_file():
        pytest.skip("no shared data here")
    for name, md5 in D.PTB_MD5.items():
        assert D.md5_of(shared / "ptb" / name) == md5
    d = D.mnist_dir(shared, download=False)  # either archive or content md5
    assert (d / "train-images-idx3-ubyte.gz").is_file()

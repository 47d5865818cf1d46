"""Data for the training programs: Penn Treebank (word and character), text8, MNIST.

Where files are looked for (first hit wins), for a data set `name` in {"ptb", "text8", "mnist"}:
  1. `--data-dir` itself, then `--data-dir/<name>`  (default --data-dir: ./data)
  2. `../shared/data/<name>` relative to the working directory and to the repository root
     (the project's read-only copies, see shared/README.md)
If nothing is found and downloads are allowed, the files are fetched into `--data-dir/<name>` from
their public sources and their checksums verified. Downloads are off when ZONEOUT_FUSED_OFFLINE=1
or `--no-download` is given (the tests always set the former).

Every problem (missing, truncated or corrupt file) raises DataError (a RuntimeError) whose message
says where it looked and how to get the file.
"""
from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import struct
import tarfile
import tempfile
import urllib.request
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

OFFLINE_ENV = "ZONEOUT_FUSED_OFFLINE"
REPO_ROOT = Path(__file__).resolve().parents[2]

# --- sources and checksums --------------------------------------------------------------------
PTB_TARBALL = "http://www.fit.vutbr.cz/~imikolov/rnnlm/simple-examples.tgz"
PTB_RAW = "https://raw.githubusercontent.com/tomsercu/lstm/master/data/"
PTB_MD5 = {
    "ptb.train.txt": "f26c4b92c5fdc7b3f8c7cdcb991d8420",
    "ptb.valid.txt": "aa0affc06ff7c36e977d7cd49e3839bf",
    "ptb.test.txt": "8b80168b89c18661a38ef683c0dc3721",
    "ptb.char.train.txt": "874909f99060142f6b88cc74c34baaa2",
    "ptb.char.valid.txt": "9e0fe5bec2a8bf43fd686dc23d5ab8bb",
    "ptb.char.test.txt": "1f9a2d1afe00f76e8bfbe09a65439681",
}
TEXT8_URL = "http://mattmahoney.net/dc/text8.zip"
TEXT8_LENGTH = 100_000_000
MNIST_URLS = ("https://ossci-datasets.s3.amazonaws.com/mnist/", "https://yann.lecun.com/exdb/mnist/")
# Either the md5 of the original .gz archive or that of its uncompressed content is accepted
# (shared/data/mnist/train-images-idx3-ubyte.gz was recompressed: only its content md5 matches).
MNIST_MD5 = {
    "train-images-idx3-ubyte.gz": ("f68b3c2dcbeaaa9fbdd348bbdeb94873", "6bbc9ace898e44ae57da46a324031adb"),
    "train-labels-idx1-ubyte.gz": ("d53e105ee54ea40749a09fcbcd1e9432", "a25bea736e30d166cdddb491f175f624"),
    "t10k-images-idx3-ubyte.gz": ("9fb629c4189551a2d022fa330f9573f3", "2646ac647ad5339dbf082846283269ea"),
    "t10k-labels-idx1-ubyte.gz": ("ec29112dd5afa0611ce80d1b7f02629c", "27ae3e4e09519cfbb04c329615203637"),
}


class DataError(RuntimeError):
    """A data file is missing, truncated or corrupt; the message says where we looked and how to get it."""


def downloads_allowed(no_download: bool = False) -> bool:
    return not no_download and os.environ.get(OFFLINE_ENV, "0").lower() not in ("1", "true", "yes", "on")


def md5_of(path: Path, *, uncompressed: bool = False) -> str:
    digest = hashlib.md5()
    opener = gzip.open if uncompressed else open
    with opener(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def candidate_dirs(data_dir, name: str) -> list[Path]:
    """Directories searched for data set `name`, in order (see the module docstring)."""
    data_dir = Path(data_dir)
    dirs = [data_dir, data_dir / name]
    for base in (Path.cwd(), REPO_ROOT):
        dirs.append((base / ".." / "shared" / "data" / name).resolve())
    unique = []
    for d in dirs:
        if d not in unique:
            unique.append(d)
    return unique


def _find(data_dir, name: str, filenames: Sequence[str]) -> Optional[Path]:
    """The first candidate directory holding every one of `filenames`."""
    for d in candidate_dirs(data_dir, name):
        if all((d / f).is_file() for f in filenames):
            return d
    return None


def _missing_message(data_dir, name: str, filenames: Sequence[str], how: str, reason: str = "") -> str:
    looked = ", ".join(str(d) for d in candidate_dirs(data_dir, name))
    return (f"{name}: could not find {', '.join(filenames)}{(' (' + reason + ')') if reason else ''}. "
            f"Looked in: {looked}. {how} Put the files in --data-dir (or --data-dir/{name}), "
            f"or allow the automatic download (unset {OFFLINE_ENV}, drop --no-download).")


def _download(url: str, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    print(f"downloading {url} -> {dest}", flush=True)
    # Download to a temporary name first: an interrupted transfer must not look like a valid file.
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".partial-")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
            shutil.copyfileobj(response, out)
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# --- Penn Treebank ----------------------------------------------------------------------------
def ptb_filenames(level: str) -> list[str]:
    prefix = "ptb.char." if level == "char" else "ptb."
    return [f"{prefix}{split}.txt" for split in ("train", "valid", "test")]


def _fetch_ptb(target: Path, filenames: Sequence[str]) -> None:
    errors = []
    word_level = all(not f.startswith("ptb.char.") for f in filenames)
    if word_level:
        try:  # small raw files first: no 34 MB tarball for the word-level set
            for f in filenames:
                _download(PTB_RAW + f, target / f)
            return
        except OSError as exc:
            errors.append(f"{PTB_RAW}: {exc}")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            archive = Path(tmp) / "simple-examples.tgz"
            _download(PTB_TARBALL, archive)
            with tarfile.open(archive) as tar:
                for f in filenames:
                    member = tar.extractfile(f"./simple-examples/data/{f}")
                    if member is None:
                        raise OSError(f"{f} not in the archive")
                    (target / f).write_bytes(member.read())
    except (OSError, tarfile.TarError, KeyError) as exc:
        errors.append(f"{PTB_TARBALL}: {exc}")
        raise DataError("ptb: download failed: " + "; ".join(errors)) from exc


def ptb_paths(data_dir, level: str = "word", download: bool = True) -> list[Path]:
    """Paths of the three PTB splits (train, valid, test), verified by md5."""
    if level not in ("word", "char"):
        raise ValueError(f"level must be 'word' or 'char', got {level!r}")
    filenames = ptb_filenames(level)
    how = (f"Get them from {PTB_RAW}<file> (word level) or the simple-examples archive {PTB_TARBALL} "
           f"(data/ptb.*.txt, word and char level).")
    found = _find(data_dir, "ptb", filenames)
    if found is None:
        if not download:
            raise DataError(_missing_message(data_dir, "ptb", filenames, how, "downloads are off"))
        found = Path(data_dir) / "ptb"
        _fetch_ptb(found, filenames)
    paths = [found / f for f in filenames]
    for p in paths:
        actual = md5_of(p)
        if actual != PTB_MD5[p.name]:
            raise DataError(f"ptb: {p} is corrupt or not the standard file (md5 {actual}, expected "
                            f"{PTB_MD5[p.name]}). {how} Delete it and rerun to download it again.")
    return paths


@dataclass
class Corpus:
    """Token ids of the three splits and the vocabulary (index -> token)."""
    train: torch.Tensor
    valid: torch.Tensor
    test: torch.Tensor
    vocab: list

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)


def _tokens(path: Path, level: str) -> list[str]:
    tokens = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            words = line.split()
            if not words:
                continue
            # One end-of-sentence token per line, as Zaremba et al. / Mikolov count it.
            tokens.extend(words + (["<eos>"] if level == "word" else ["\n"]))
    return tokens


def tokens_to_corpus(splits: Sequence[Sequence[str]]) -> Corpus:
    vocab = sorted(set(splits[0]))
    index = {t: i for i, t in enumerate(vocab)}
    tensors = []
    for name, toks in zip(("train", "valid", "test"), splits):
        try:
            tensors.append(torch.tensor([index[t] for t in toks], dtype=torch.long))
        except KeyError as exc:
            raise DataError(f"token {exc.args[0]!r} of the {name} split is not in the training vocabulary") from exc
    return Corpus(*tensors, vocab=vocab)


def load_ptb(data_dir, level: str = "word", download: bool = True) -> Corpus:
    paths = ptb_paths(data_dir, level, download)
    return tokens_to_corpus([_tokens(p, level) for p in paths])


# --- text8 --------------------------------------------------------------------------------------
def text8_path(data_dir, download: bool = True) -> Path:
    how = f"Get it from {TEXT8_URL} (unzip to a file named text8)."
    for name in ("text8", "text8.prefix"):
        found = _find(data_dir, "text8", [name])
        if found is not None:
            return found / name
    if not download:
        raise DataError(_missing_message(data_dir, "text8", ["text8 (or text8.prefix)"], how, "downloads are off"))
    target = Path(data_dir) / "text8"
    try:
        with tempfile.TemporaryDirectory() as tmp:
            archive = Path(tmp) / "text8.zip"
            _download(TEXT8_URL, archive)
            with zipfile.ZipFile(archive) as z:
                z.extract("text8", target)
    except (OSError, zipfile.BadZipFile, KeyError) as exc:
        raise DataError(f"text8: download of {TEXT8_URL} failed: {exc}. {how}") from exc
    return target / "text8"


def load_text8(data_dir, download: bool = True) -> Corpus:
    """text8 as characters: the standard 90M/5M/5M split, proportional (90/5/5 %) for a shorter file."""
    path = text8_path(data_dir, download)
    text = path.read_bytes()
    if not text or any(b not in b"abcdefghijklmnopqrstuvwxyz " for b in set(text)):
        raise DataError(f"text8: {path} is empty or has characters other than a-z and space: not text8. "
                        f"Get it from {TEXT8_URL}.")
    n = len(text)
    if n == TEXT8_LENGTH:
        a, b = 90_000_000, 95_000_000
    else:
        if n > TEXT8_LENGTH or path.name != "text8.prefix":
            warnings.warn(f"text8: {path} has {n:,} characters, not {TEXT8_LENGTH:,}: "
                          f"splitting it 90/5/5 % (results are not comparable to the paper's)")
        else:
            warnings.warn(f"text8: using {path} ({n:,} of {TEXT8_LENGTH:,} characters): splitting it 90/5/5 %; "
                          f"results are not comparable to the paper's (get the full corpus from {TEXT8_URL})")
        a, b = int(n * 0.9), int(n * 0.95)
    vocab = list(" abcdefghijklmnopqrstuvwxyz")
    lut = torch.full((256,), -1, dtype=torch.long)
    for i, ch in enumerate(vocab):
        lut[ord(ch)] = i
    ids = lut[torch.frombuffer(bytearray(text), dtype=torch.uint8).long()]
    return Corpus(ids[:a].clone(), ids[a:b].clone(), ids[b:].clone(), vocab=vocab)


# --- MNIST --------------------------------------------------------------------------------------
MNIST_FILES = list(MNIST_MD5)


def mnist_dir(data_dir, download: bool = True, verify: bool = True) -> Path:
    how = f"Get the four idx .gz files from {MNIST_URLS[0]} (or {MNIST_URLS[1]})."
    found = _find(data_dir, "mnist", MNIST_FILES)
    if found is None:
        if not download:
            raise DataError(_missing_message(data_dir, "mnist", MNIST_FILES, how, "downloads are off"))
        found = Path(data_dir) / "mnist"
        for f in MNIST_FILES:
            if (found / f).is_file():
                continue
            errors = []
            for base in MNIST_URLS:
                try:
                    _download(base + f, found / f)
                    break
                except OSError as exc:
                    errors.append(f"{base + f}: {exc}")
            else:
                raise DataError(f"mnist: download failed: {'; '.join(errors)}. {how}")
    if verify:
        for f in MNIST_FILES:
            p = found / f
            try:
                ok = md5_of(p) in MNIST_MD5[f] or md5_of(p, uncompressed=True) in MNIST_MD5[f]
            except (OSError, EOFError, gzip.BadGzipFile) as exc:
                raise DataError(f"mnist: {p} is not a readable gzip file ({exc}). {how}") from exc
            if not ok:
                raise DataError(f"mnist: {p} does not match the known md5s {MNIST_MD5[f]} (archive or content). "
                                f"{how} Delete it and rerun to download it again.")
    return found


def read_idx(path: Path) -> torch.Tensor:
    """An idx file (gzip or not) as a uint8 tensor of its shape."""
    opener = gzip.open if str(path).endswith(".gz") else open
    try:
        with opener(path, "rb") as handle:
            raw = handle.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"{path}: cannot read ({exc})") from exc
    if len(raw) < 4:
        raise DataError(f"{path}: too short for an idx file")
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08:
        raise DataError(f"{path}: not an unsigned-byte idx file (magic {raw[:4].hex()})")
    dims = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    count = 1
    for d in dims:
        count *= d
    body = raw[4 + 4 * ndim:]
    if len(body) != count:
        raise DataError(f"{path}: truncated or corrupt ({len(body)} bytes of data, header says {count})")
    return torch.frombuffer(bytearray(body), dtype=torch.uint8).reshape(dims)


@dataclass
class ImageData:
    """Flattened images (float in [0, 1], [N, 784]) and labels for train / valid / test."""
    train: tuple
    valid: tuple
    test: tuple


PMNIST_PERMUTATION_SEED = 1234


def pixel_permutation(num_pixels: int = 784, seed: int = PMNIST_PERMUTATION_SEED) -> torch.Tensor:
    """The fixed pixel order of permuted MNIST (a private generator: independent of --seed)."""
    return torch.randperm(num_pixels, generator=torch.Generator().manual_seed(seed))


def load_mnist(data_dir, download: bool = True, valid_size: int = 5000, permute: bool = True,
               verify: bool = True) -> ImageData:
    """MNIST with the last `valid_size` training images held out for validation."""
    d = mnist_dir(data_dir, download, verify)
    x_train = read_idx(d / "train-images-idx3-ubyte.gz")
    y_train = read_idx(d / "train-labels-idx1-ubyte.gz")
    x_test = read_idx(d / "t10k-images-idx3-ubyte.gz")
    y_test = read_idx(d / "t10k-labels-idx1-ubyte.gz")
    if x_train.shape[0] != y_train.shape[0] or x_test.shape[0] != y_test.shape[0]:
        raise DataError(f"mnist: image and label counts differ in {d}")
    if not 0 <= valid_size < x_train.shape[0]:
        raise ValueError(f"valid_size must be in [0, {x_train.shape[0]}), got {valid_size}")

    def prep(x):
        x = x.reshape(x.shape[0], -1).float() / 255.0
        return x[:, pixel_permutation(x.shape[1])] if permute else x

    x_train, x_test = prep(x_train), prep(x_test)
    y_train, y_test = y_train.long(), y_test.long()
    n = x_train.shape[0] - valid_size
    return ImageData((x_train[:n], y_train[:n]), (x_train[n:], y_train[n:]), (x_test, y_test))


# --- batching -----------------------------------------------------------------------------------
def batchify(ids: torch.Tensor, batch_size: int) -> torch.Tensor:
    """[N] token ids -> [N // B, B] columns (each column a contiguous stream), as Zaremba et al."""
    steps = ids.numel() // batch_size
    if steps < 2:
        raise DataError(f"a split of {ids.numel()} tokens is too short for batch size {batch_size}")
    return ids[: steps * batch_size].reshape(batch_size, steps).t().contiguous()


def lm_batches(stream: torch.Tensor, seq_len: int, start: int = 0):
    """(index, input [T, B], target [T, B]) windows of a batchified stream for truncated BPTT."""
    index = 0
    for i in range(0, stream.shape[0] - 1, seq_len):
        t = min(seq_len, stream.shape[0] - 1 - i)
        if index >= start:
            yield index, stream[i:i + t], stream[i + 1:i + 1 + t]
        index += 1


def lm_num_batches(stream: torch.Tensor, seq_len: int) -> int:
    return (stream.shape[0] - 1 + seq_len - 1) // seq_len

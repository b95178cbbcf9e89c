"""Bundled text: calibration and held-out evaluation splits, tokenization, seeded sampling.

Source, in order of preference:
1. **Austen** — Jane Austen's six novels from Debian's ``r-cran-janeaustenr`` package, fetched once with
   ``apt-get download`` into the cache (the .deb is read in Python; no R needed). Calibration uses
   *Sense and Sensibility* + *Emma*; evaluation uses *Pride and Prejudice*; *Persuasion* is kept unseen.
2. **pydoc** — the standard library's ``pydoc_data.topics`` (technical English, always present): the
   first 80 % of topics calibrate, the last 20 % evaluate.
``LLMCOMP_TEXT=pydoc`` forces the fallback. The source used is recorded in every manifest.
"""
from __future__ import annotations

import io
import os
import shutil
import struct
import subprocess
import tarfile
import tempfile
import zlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from llmcomp.core.paths import cache_dir
from llmcomp.core.rdata import read_rdb_strings
from llmcomp.errors import UserError

AUSTEN_DEB = "r-cran-janeaustenr"
CALIB_NOVELS = ("sensesensibility", "emma")
EVAL_NOVELS = ("prideprejudice",)
SOURCES = ("auto", "austen", "pydoc")


@dataclass(frozen=True)
class Corpus:
    name: str  # "austen" or "pydoc"
    calib: str
    eval: str


def _plain_tar(deb: Path, body: bytes) -> bytes:
    """The package's data archive as tarfile can read it: as stored, or unpacked by dpkg-deb where it is compressed
    with a codec tarfile lacks (Ubuntu's packages use zstd)."""
    try:
        with tarfile.open(fileobj=io.BytesIO(body)):
            return body
    except tarfile.ReadError:
        if shutil.which("dpkg-deb") is None:
            raise ValueError(f"{deb}'s data archive is compressed with a codec Python cannot read, and there is no "
                             "dpkg-deb to unpack it") from None
        return subprocess.run(["dpkg-deb", "--fsys-tarfile", str(deb)], check=True, timeout=120,
                              capture_output=True).stdout


def _read_deb_member(deb: Path, suffixes: tuple[str, ...], dest: Path) -> None:
    """Extract members ending in ``suffixes`` from a .deb (an ``ar`` archive holding data.tar.*)."""
    data = deb.read_bytes()
    if not data.startswith(b"!<arch>\n"):
        raise ValueError(f"{deb} is not a Debian package")
    pos = 8
    while pos < len(data):
        header = data[pos : pos + 60]
        name = header[:16].decode().strip().rstrip("/")
        size = int(header[48:58].decode().strip())
        body = data[pos + 60 : pos + 60 + size]
        pos += 60 + size + (size & 1)
        if name.startswith("data.tar"):
            with tarfile.open(fileobj=io.BytesIO(_plain_tar(deb, body))) as tar:
                for member in tar.getmembers():
                    if member.isfile() and member.name.endswith(suffixes):
                        (dest / Path(member.name).name).write_bytes(tar.extractfile(member).read())
            return
    raise ValueError(f"{deb} has no data archive")


def _fetch_austen(root: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["apt-get", "download", AUSTEN_DEB], cwd=tmp, check=True, timeout=120,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deb = next(Path(tmp).glob(f"{AUSTEN_DEB}_*.deb"))
        _read_deb_member(deb, ("Rdata.rdb", "Rdata.rdx"), Path(tmp))
        novels = read_rdb_strings(os.path.join(tmp, "Rdata.rdx"), os.path.join(tmp, "Rdata.rdb"))
        staging = Path(tempfile.mkdtemp(prefix=".austen.tmp-", dir=root.parent))
        for name, lines in novels.items():
            (staging / f"{name}.txt").write_text("\n".join(line or "" for line in lines), encoding="utf-8")
        shutil.rmtree(root, ignore_errors=True)
        os.rename(staging, root)


_FETCH_ERRORS = (OSError, subprocess.SubprocessError, ValueError, StopIteration, tarfile.TarError, zlib.error,
                 struct.error, KeyError, IndexError, EOFError)


def _austen() -> Corpus | None:
    root = cache_dir() / "text" / "austen"
    if not (root / "prideprejudice.txt").exists():
        root.parent.mkdir(parents=True, exist_ok=True)
        try:
            _fetch_austen(root)
        except _FETCH_ERRORS:  # (a damaged download or an unreadable package: the caller falls back, or says so)
            return None
    read = lambda names: "\n\n".join((root / f"{n}.txt").read_text(encoding="utf-8") for n in names)  # noqa: E731
    try:
        return Corpus("austen", read(CALIB_NOVELS), read(EVAL_NOVELS))
    except (OSError, UnicodeDecodeError) as exc:  # (the cache edited or damaged since it was written)
        raise UserError(f"The cached Austen text in {root} is damaged ({type(exc).__name__}); delete that folder "
                        "and it is fetched again.") from None


def _pydoc() -> Corpus:
    from pydoc_data.topics import topics

    texts = [topics[k] for k in sorted(topics)]
    cut = int(len(texts) * 0.8)
    return Corpus("pydoc", "\n\n".join(texts[:cut]), "\n\n".join(texts[cut:]))


@lru_cache(maxsize=None)
def corpus(source: str | None = None) -> Corpus:
    """The text ``source`` names, else ``LLMCOMP_TEXT``'s; an empty variable is unset, as for other variables
    (``LLMCOMP_TEXT= llmcomp eval`` was refused as an unknown text source ''). A bad variable's error names it
    (``Unknown text source 'x'`` did not say where the value came from: no command takes a text source)."""
    given, env = source, os.environ.get("LLMCOMP_TEXT", "").strip()
    source = given or env or "auto"
    if source not in SOURCES:
        raise UserError(f"Unknown text source {given!r}; use auto, austen or pydoc." if given else
                        f"LLMCOMP_TEXT={env!r} is not a text source; use auto, austen or pydoc (or unset it).")
    if source in ("auto", "austen"):
        found = _austen()
        if found is not None:
            return found
        if source == "austen":
            raise UserError("Could not fetch the Austen text (apt-get download r-cran-janeaustenr failed); "
                            "set LLMCOMP_TEXT=pydoc to use the standard-library text.")
    return _pydoc()


def tokenize(tokenizer, text: str, max_tokens: int | None = None) -> torch.Tensor:
    """Token ids of ``text`` (no BOS/special tokens) as int64 [n]; stops early past ``max_tokens``."""
    if max_tokens is not None:
        text = text[: max_tokens * 8]  # ~4 chars/token: tokenize only what can be used
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    ids = torch.tensor(ids, dtype=torch.long)
    return ids[:max_tokens] if max_tokens is not None else ids


def check_vocab(ids: torch.Tensor, model) -> None:
    """UserError where the tokenizer gave ids past the model's embedding rows (a tokenizer of another model: an
    IndexError on the CPU, a device-side assert on a GPU)."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    rows = getattr(emb, "num_embeddings", None)
    if rows and ids.numel() and int(ids.max()) >= rows:
        raise UserError(f"The tokenizer gives token id {int(ids.max())}, past the model's {rows} embeddings: it "
                        "is not this model's tokenizer.")


def eval_windows(tokenizer, seq_len: int, n_windows: int, source: str | None = None) -> torch.Tensor:
    """Consecutive non-overlapping windows from the start of the held-out split: [n, seq_len].

    No BOS token is prepended: every window is plain text, scored on all positions but the first.
    """
    ids = tokenize(tokenizer, corpus(source).eval, max_tokens=seq_len * n_windows)
    n = min(n_windows, ids.numel() // seq_len)
    if n == 0:
        raise UserError(f"The evaluation text is shorter than one window of {seq_len} tokens.")
    return ids[: n * seq_len].view(n, seq_len)


def check_calib(n_samples: int, seq_len: int, seed: int = 0) -> None:
    """At least one calibration window of at least 2 tokens (whole numbers: 4.0 reached torch.randint), and a
    seed torch takes."""
    from llmcomp.core.config import check_seed

    check_seed(seed)
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (n_samples, seq_len)):
        raise UserError(f"--calib-samples and --seq-len must be integers, got {n_samples!r} and {seq_len!r}.")
    if n_samples < 1 or seq_len < 2:
        raise UserError(f"Calibration needs at least 1 window of at least 2 tokens (--calib-samples {n_samples}, "
                        f"--seq-len {seq_len}).")


def calib_windows(tokenizer, seq_len: int, n_samples: int, seed: int = 0,
                  source: str | None = None) -> torch.Tensor:
    """``n_samples`` windows of ``seq_len`` tokens at seeded random offsets in the calibration split."""
    check_calib(n_samples, seq_len)
    ids = tokenize(tokenizer, corpus(source).calib)
    if ids.numel() <= seq_len:
        raise UserError(f"The calibration text is shorter than one window of {seq_len} tokens.")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len, (n_samples,), generator=gen)
    return torch.stack([ids[s : s + seq_len] for s in starts.tolist()])

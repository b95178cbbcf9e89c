"""A small reader for R's XDR serialization — enough for character vectors in an R data package.

Used to read the Jane Austen novels shipped by Debian's ``r-cran-janeaustenr`` (``Rdata.rdx`` index +
``Rdata.rdb`` payload). Supports the SEXP types those files use; anything else raises ``ValueError``.
"""
from __future__ import annotations

import gzip
import struct
import zlib

NILVALUE, GLOBALENV, EMPTYENV, BASEENV, MISSINGARG, UNBOUND, BASENAMESPACE = 254, 253, 242, 241, 251, 252, 247
REFSXP, SYMSXP, LISTSXP, CHARSXP, LGLSXP, INTSXP, REALSXP, STRSXP, VECSXP = 255, 1, 2, 9, 10, 13, 14, 16, 19


class _Reader:
    def __init__(self, data: bytes):
        self.b, self.i, self.refs = data, 0, []

    def int(self) -> int:
        (v,) = struct.unpack_from(">i", self.b, self.i)
        self.i += 4
        return v

    def bytes(self, n: int) -> bytes:
        out = self.b[self.i : self.i + n]
        self.i += n
        return out

    def header(self) -> None:
        if self.bytes(2) != b"X\n":
            raise ValueError("not an XDR R serialization")
        version = self.int()
        self.int(), self.int()  # writer version, min reader version
        if version == 3:
            self.bytes(self.int())  # native encoding name

    def item(self):
        flags = self.int()
        t, has_attr, has_tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
        if t in (NILVALUE, GLOBALENV, EMPTYENV, BASEENV, MISSINGARG, UNBOUND, BASENAMESPACE):
            return None
        if t == REFSXP:
            idx = flags >> 8 or self.int()
            return self.refs[idx - 1]
        if t == SYMSXP:
            sym = self.item()
            self.refs.append(sym)
            return sym
        if t == CHARSXP:
            n = self.int()
            return None if n == -1 else self.bytes(n).decode("utf-8", "replace")
        if t == LISTSXP:
            if has_attr:  # (read past it: pairlist attributes are not kept)
                self.item()
            tag = self.item() if has_tag else None
            car = self.item()
            cdr = self.item()
            pairs = [(tag, car)] + (cdr if isinstance(cdr, list) else [])
            return pairs
        if t in (STRSXP, VECSXP, INTSXP, LGLSXP, REALSXP):
            n = self.int()
            if t == STRSXP or t == VECSXP:
                value = [self.item() for _ in range(n)]
            elif t == REALSXP:
                value = list(struct.unpack_from(f">{n}d", self.b, self.i))
                self.i += 8 * n
            else:
                value = list(struct.unpack_from(f">{n}i", self.b, self.i))
                self.i += 4 * n
            if has_attr:
                attrs = dict(self.item())
                names = attrs.get("names")
                if names is not None:
                    return dict(zip(names, value))
            return value
        raise ValueError(f"unsupported R SEXP type {t}")


def unserialize(data: bytes):
    r = _Reader(data)
    r.header()
    return r.item()


def read_rdb_strings(rdx_path: str, rdb_path: str) -> dict[str, list[str]]:
    """Return ``{object name: character vector}`` for every object in an R lazy-load database."""
    index = unserialize(gzip.decompress(open(rdx_path, "rb").read()) if _is_gzip(rdx_path)
                        else zlib.decompress(open(rdx_path, "rb").read()[4:]))
    payload = open(rdb_path, "rb").read()
    out = {}
    for name, (offset, length) in index["variables"].items():
        blob = payload[offset : offset + length]
        out[name] = unserialize(zlib.decompress(blob[4:]))
    return out


def _is_gzip(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == b"\x1f\x8b"

"""The bridge (ssh) sink: an MD5 asked for late is asked once every byte is read."""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import pytest
from onemarket.errors import ChecksumError
from onemarket.transfer.remote import write_remote_atomically
from onemarket.transfer.sources import CHUNK_BYTES

from tests.servers.sshd import Sshd

DATA = os.urandom(3 * CHUNK_BYTES) + bytes(2 * CHUNK_BYTES)  # a trailing hole too


class Stream:
    """A sequential source (no descriptor: not read as a local file)."""

    description = "test image"
    size_bytes = len(DATA)

    def __init__(self) -> None:
        self.bytes = io.BytesIO(DATA)

    def read(self, n: int = CHUNK_BYTES) -> bytes:
        return self.bytes.read(n)


def test_a_late_md5_is_asked_at_verify_time(sshd: Sshd, tmp_path: Path) -> None:
    pub = tmp_path / "pub"  # tmp_path holds the sshd's files
    pub.mkdir()
    src = Stream()
    read_when_asked: list[int] = []

    def md5() -> str:
        read_when_asked.append(src.bytes.tell())
        return hashlib.md5(DATA).hexdigest()

    digests = write_remote_atomically("bridge1", str(pub), "img", src, expected_md5=md5)
    assert read_when_asked == [len(DATA)]
    assert digests.md5 == hashlib.md5(DATA).hexdigest()
    assert (pub / "img").read_bytes() == DATA
    assert [p.name for p in pub.iterdir()] == ["img"]


def test_a_late_md5_that_differs_leaves_nothing(sshd: Sshd, tmp_path: Path) -> None:
    pub = tmp_path / "pub"
    pub.mkdir()
    with pytest.raises(ChecksumError, match="MD5 mismatch"):
        write_remote_atomically("bridge1", str(pub), "img", Stream(), expected_md5=lambda: "0" * 32)
    assert list(pub.iterdir()) == []

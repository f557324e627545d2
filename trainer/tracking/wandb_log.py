"""Reader of wandb's offline transaction log (``run-<id>.wandb``): the one parser of the format,
used by the logger (to know a run is on disk) and by the tests (to read runs back).

wandb (>= 0.18, "wandb-core") has no public reader for offline runs. The format, as written by
wandb-core (``core/internal/transactionlog`` + ``core/pkg/leveldb/record.go``, golang/leveldb's
record format; the same as the old Python ``wandb/sdk/internal/datastore.py``):

* File header, 7 bytes: ``b":W&B"``, uint16 LE magic ``0xBEE1``, uint8 version 0.
* 32 KiB blocks counted from the start of the file; chunks never cross a block boundary, and
  fewer than 7 bytes left in a block are zero padding.
* Chunk: ``checksum`` uint32 LE, ``length`` uint16 LE, ``type`` uint8, then ``length`` payload
  bytes. The checksum is the IEEE CRC-32 (zlib.crc32) of ``type byte + payload``.
* Types: 1 FULL, 2 FIRST, 3 MIDDLE, 4 LAST. A record is FULL, or FIRST (MIDDLE)* LAST.
* Each record payload is a serialized ``wandb.proto.wandb_internal_pb2.Record``.
"""

from __future__ import annotations

import struct
import zlib
from collections import deque
from pathlib import Path
from typing import Iterator

HEADER = struct.Struct("<4sHB")
HEADER_IDENT = b":W&B"
HEADER_MAGIC = 0xBEE1
HEADER_VERSION = 0
BLOCK_SIZE = 32 * 1024
CHUNK_HEADER = struct.Struct("<IHB")
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


class WandbFileError(ValueError):
    pass


def iter_record_bytes(path: str | Path, chunk_types: list[int] | None = None, *,
                      strict: bool = True) -> Iterator[bytes]:
    """Yield each record's payload bytes, verifying CRCs.

    ``strict=False`` reads a log that is still being written: it stops quietly at the first
    incomplete or damaged chunk instead of raising. ``chunk_types``, if given, gets the type of
    every chunk read appended to it.
    """
    data = Path(path).read_bytes()

    def fail(msg: str):
        if strict:
            raise WandbFileError(f"{path}: {msg}")

    if len(data) < HEADER.size:
        fail("too short for a header")
        return
    ident, magic, version = HEADER.unpack_from(data, 0)
    if ident != HEADER_IDENT or magic != HEADER_MAGIC or version != HEADER_VERSION:
        fail(f"bad header {ident!r} {magic:#x} {version}")
        return

    pos = HEADER.size
    pending: bytearray | None = None
    n = len(data)
    while pos < n:
        left_in_block = BLOCK_SIZE - pos % BLOCK_SIZE
        if left_in_block < CHUNK_HEADER.size:
            if any(data[pos : pos + left_in_block]):
                return fail(f"non-zero block trailer at {pos}")
            pos += left_in_block
            continue
        if pos + CHUNK_HEADER.size > n:
            return  # truncated tail (a run still being written)
        checksum, length, ctype = CHUNK_HEADER.unpack_from(data, pos)
        if checksum == 0 and length == 0 and ctype == 0:
            pos += left_in_block  # zeroed rest of block (preallocated / padded)
            continue
        start = pos + CHUNK_HEADER.size
        end = start + length
        if length > left_in_block - CHUNK_HEADER.size or end > n:
            return fail(f"chunk at {pos} overflows its block / file")
        payload = data[start:end]
        if zlib.crc32(bytes([ctype]) + payload) & 0xFFFFFFFF != checksum:
            return fail(f"checksum mismatch in chunk at {pos}")
        pos = end
        if chunk_types is not None:
            chunk_types.append(ctype)
        if ctype == FULL:
            if pending is not None:
                return fail("FULL chunk inside a multi-chunk record")
            yield bytes(payload)
        elif ctype == FIRST:
            if pending is not None:
                return fail("FIRST chunk inside a multi-chunk record")
            pending = bytearray(payload)
        elif ctype in (MIDDLE, LAST):
            if pending is None:
                return fail(f"{ctype=} chunk without FIRST")
            pending += payload
            if ctype == LAST:
                yield bytes(pending)
                pending = None
        else:
            return fail(f"unknown chunk type {ctype} at {pos}")


def iter_records(path: str | Path, *, strict: bool = True):
    """Yield ``wandb_internal_pb2.Record`` messages from a ``.wandb`` file."""
    from wandb.proto import wandb_internal_pb2 as pb

    for raw in iter_record_bytes(path, strict=strict):
        rec = pb.Record()
        rec.ParseFromString(raw)
        yield rec


def has_exit_record(path: str | Path, last: int = 4) -> bool:
    """True once the run's exit record is on disk (it is among the log's ``last`` records)."""
    from wandb.proto import wandb_internal_pb2 as pb

    try:
        for raw in deque(iter_record_bytes(path, strict=False), maxlen=last):
            rec = pb.Record()
            rec.ParseFromString(raw)
            if rec.WhichOneof("record_type") == "exit":
                return True
    except (OSError, ValueError):
        pass
    return False

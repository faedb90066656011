"""Shards as corpora ship them, for the shard tests: SA-1B-style tars and HF-style Parquet files."""
from __future__ import annotations

import io
import json
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq

from tests.pipeline.bad_inputs import jpeg, photo


def sa1b_annotation(key: str) -> dict:
    """What an SA-1B sidecar looks like (trimmed): the image record and its masks."""
    return {"image": {"image_id": int(key.split("_")[-1]), "file_name": f"{key}.jpg"}, "annotations": []}


def tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def sa1b_members(first: int, count: int, seed: int = 0) -> list[tuple[str, bytes]]:
    """``sa_<n>.jpg`` + ``sa_<n>.json`` pairs, as SA-1B's tars hold them."""
    members = []
    for n in range(first, first + count):
        members.append((f"sa_{n}.jpg", jpeg(photo(20 + n % 7, 28 + n % 5, seed=seed + n))))
        members.append((f"sa_{n}.json", json.dumps(sa1b_annotation(f"sa_{n}")).encode()))
    return members


def damaged_shard(first: int) -> tuple[bytes, list[str]]:
    """A shard with a non-image member and a truncated JPEG, then cut off in the middle of a member.

    Returns the bytes and the keys of the images that lie wholly before the cut.
    """
    members = sa1b_members(first, 3)
    members.insert(2, ("README.txt", b"not an image, no row"))
    members.append((f"sa_{first + 3}.jpg", jpeg(photo(30, 30, seed=99))[:200]))  # a truncated member
    members += sa1b_members(first + 4, 2)
    whole = tar_bytes(members)
    # A member is a 512-byte header and its data padded to 512 bytes: cut into the last image's data.
    offset = sum(512 + -(-len(data) // 512) * 512 for _, data in members[:-2])
    return whole[: offset + 512 + 40], [f"sa_{n}" for n in range(first, first + 5)]


def hf_parquet(path, count: int, garbage_row: int | None = None, row_group_size: int = 3) -> list[bytes]:
    """A Parquet file like an HF dataset's: ``image`` struct<bytes, path>, ``id``, ``caption``."""
    images = [jpeg(photo(16 + k % 4, 24, seed=50 + k)) for k in range(count)]
    cells = [{"bytes": data, "path": f"img_{k}.jpg"} for k, data in enumerate(images)]
    if garbage_row is not None:
        cells[garbage_row] = {"bytes": b"\x00garbage, not an image", "path": "broken.jpg"}
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table({"image": pa.array(cells, image_type), "id": [f"id-{k:03d}" for k in range(count)],
                      "caption": [f"caption {k}" for k in range(count)]})
    buffer = io.BytesIO()
    pq.write_table(table, buffer, row_group_size=row_group_size)
    data = buffer.getvalue()
    if hasattr(path, "write_bytes"):
        path.write_bytes(data)
    return [data, *images]

"""Reading from tar shards against the same images as loose objects, on a real S3 server (SeaweedFS).

    python bench/shards_bench.py --images 512 --shards 4 --size 640x480

The same JPEGs (photos from scikit-image, resized and varied, so they compress like photos) are
stored twice in one bucket: as loose objects listed in a `.txt` manifest, and as WebDataset /
SA-1B-style tar shards (each image with a `.json` sidecar). Both are read by the job's own read
stage (``pipeline.inputs.read.read_units``: loose objects fetched by its thread pool, a shard streamed
front to back) and decoded by its decode stage (``pipeline.inputs.decode.decode_batch``), in this
process, one unit after the other, so the figure is the I/O pattern and not Ray. Each layout is
read ``--repeats`` times, alternating; the best run counts. Decoded pixels are checked equal.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
from fault_injection import SeaweedFS  # noqa: E402  (the bench's own loopback S3 server)
from report import cpu_model, emit  # noqa: E402


def make_jpegs(count: int, size: tuple) -> list:
    import numpy as np
    from PIL import Image

    from tests.sam_factory import real_photos

    photos = real_photos()
    images = []
    for index in range(count):
        photo = Image.fromarray(photos[index % len(photos)]).resize(size)
        if (index // len(photos)) % 2:
            photo = photo.transpose(Image.FLIP_LEFT_RIGHT)
        array = np.asarray(photo).astype(np.int16) + (index % 17) - 8  # no two files alike
        buffer = io.BytesIO()
        Image.fromarray(np.clip(array, 0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=90)
        images.append(buffer.getvalue())
    return images


def upload(fs, images: list, shards: int) -> dict:
    from tests.pipeline.shard_corpus import tar_bytes

    loose = [f"s3://bench/loose/img_{i:06d}.jpg" for i in range(len(images))]
    for uri, data in zip(loose, images):
        fs.pipe(uri, data)
    fs.pipe("s3://bench/loose.txt", ("\n".join(loose) + "\n").encode())
    per_shard = -(-len(images) // shards)
    shard_uris = []
    for s in range(shards):
        members = []
        for i in range(s * per_shard, min(len(images), (s + 1) * per_shard)):
            members += [(f"sa_{i}.jpg", images[i]), (f"sa_{i}.json", json.dumps({"image_id": i}).encode())]
        shard_uris.append(f"s3://bench/shards/sa_{s:06d}.tar")
        fs.pipe(shard_uris[-1], tar_bytes(members))
    return {"manifest": "s3://bench/loose.txt", "shards": f"s3://bench/shards/sa_{{000000..{shards - 1:06d}}}.tar"}


def read_and_decode(input_uri: str, storage_options: dict) -> tuple:
    """(seconds reading, seconds decoding, images, decoded arrays in order) for one pass over the input."""
    import numpy as np

    from pipeline.inputs.decode import decode_batch
    from pipeline.inputs.read import read_units
    from pipeline.inputs.units import plan_units

    planned = plan_units(input_uri, storage_options, set(), unit_size=10**9, limit=None, output=None,
                         run_index=1).units
    read_s = decode_s = 0.0
    decoded = []
    for unit in planned:
        row = unit.to_row()
        batch = {name: np.array([value], dtype=object) for name, value in row.items()}
        blocks = read_units(batch, storage_options=storage_options)
        while True:
            started = time.perf_counter()
            block = next(blocks, None)
            read_s += time.perf_counter() - started
            if block is None:
                break
            started = time.perf_counter()
            out = decode_batch(block)
            decode_s += time.perf_counter() - started
            assert all(status == "ok" for status in out["status"]), list(out["error"])
            decoded += list(out["image"])
    return read_s, decode_s, len(decoded), decoded


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--size", default="640x480", help="WIDTHxHEIGHT of each JPEG")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json")
    args = parser.parse_args()
    import numpy as np

    width, height = (int(v) for v in args.size.split("x"))
    work = Path(tempfile.mkdtemp(prefix="shards-bench-"))
    server = SeaweedFS(work / "seaweed")
    server.start()
    options = server.storage_options()
    try:
        images = make_jpegs(args.images, (width, height))
        inputs = upload(server.filesystem(), images, args.shards)
        best = {}
        reference = None
        for _ in range(args.repeats):
            for layout in ("loose", "shards"):
                uri = inputs["manifest"] if layout == "loose" else inputs["shards"]
                read_s, decode_s, count, decoded = read_and_decode(uri, options)
                assert count == args.images, (layout, count)
                if reference is None:
                    reference = decoded
                assert all(np.array_equal(a, b) for a, b in zip(reference, decoded)), f"{layout} decoded other pixels"
                total = read_s + decode_s
                if layout not in best or total < best[layout]["read_decode_s"]:
                    best[layout] = {"read_s": round(read_s, 3), "decode_s": round(decode_s, 3),
                                    "read_decode_s": round(total, 3), "read_img_per_s": round(count / read_s, 1),
                                    "read_decode_img_per_s": round(count / total, 1)}
        figures = {
            "cpu": cpu_model(), "images": args.images, "shard_files": args.shards, "jpeg_size": args.size,
            "mean_jpeg_kib": round(sum(map(len, images)) / len(images) / 1024, 1), **best,
            "shards_over_loose_read": round(best["loose"]["read_s"] / best["shards"]["read_s"], 2),
            "shards_over_loose_read_decode": round(best["loose"]["read_decode_s"] / best["shards"]["read_decode_s"], 2),
            "pixels_equal": True,
        }
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    emit(figures, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())

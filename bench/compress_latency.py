"""CPU latency of the files `kdpipe compress` wrote (DIR/models/<row>.pt: TorchScript with the input
normalization inside, fed uint8 images), re-measured at given thread counts, e.g. on an unshared machine.

    python bench/compress_latency.py runs/default/compress --threads 1,4 [--repeats 50] [--out FILE.json]

Prints one line per model and thread count: median ms per image at batch 1 and batch 64. Asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import emit, header  # noqa: E402

from kdpipe.evaluate import cpu_latency_ms, cpu_name  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dir", help="The output folder of kdpipe compress (compress.json, models/).")
    p.add_argument("--threads", default="1", help="Comma-separated torch thread counts.")
    p.add_argument("--repeats", type=int, default=50, help="Timed passes per batch size (the median is kept).")
    p.add_argument("--out", default=None, help="Also write the figures to this JSON file.")
    args = p.parse_args(argv)
    header("compress latency", argv)
    emit(f"cpu: {cpu_name()}")  # the header names the GPU where there is one; the figures are the CPU's
    d = Path(args.dir)
    doc = json.loads((d / "compress.json").read_text())
    torch.backends.quantized.engine = doc["backend"]
    results = []

    def teacher_shape():
        from kdpipe.export import load_model
        return load_model(doc["teacher"]).image_shape
    for threads in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(threads)
        emit(f"threads {threads}")
        for row in doc["rows"]:
            if not row.get("file"):
                continue
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                m = torch.jit.load(str(d / "models" / row["file"]), map_location="cpu")
            if "input_shape" in row:
                shape, dtype = tuple(row["input_shape"]), row["input_dtype"]
            else:  # a compress.json of before the rows recorded it: the teacher's input
                shape, dtype = tuple(teacher_shape()), "uint8" if len(teacher_shape()) == 3 else "float32"
            x_dtype = torch.uint8 if dtype == "uint8" else torch.float32
            lat = {b: cpu_latency_ms(m, shape, repeats=args.repeats, warmup=5, batch=b, dtype=x_dtype)
                   for b in (1, 64)}
            results.append({"name": row["name"], "threads": threads, "latency_ms_b1": lat[1], "latency_ms_b64": lat[64]})
            emit(f"  {row['name']:<36} batch 1 {lat[1]:8.3f} ms/image   batch 64 {lat[64]:8.3f} ms/image")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

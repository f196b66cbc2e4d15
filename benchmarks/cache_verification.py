"""Load time of smollm2-135m from the conversion cache with and without verifying the entry.

Loads alternate (off/on, then on/off) so that a busy machine slows both alike; prints the min
and median of each, and the time of hashing the entry alone (sequentially).

    OMP_NUM_THREADS=1 python benchmarks/cache_verification.py [REPS]
"""

from __future__ import annotations

import gc
import statistics
import sys
import time

import torch

import mechkit as mk
from mechkit.models import conversion, weight_cache

REAL = (conversion.check_entry, conversion.verify_entry)


def verification(on: bool) -> None:
    """Switch the checks load_gguf runs on a cached entry on or off."""
    if on:
        conversion.check_entry, conversion.verify_entry = REAL
    else:
        conversion.check_entry = lambda folder: {}
        conversion.verify_entry = lambda folder, meta: None


def main() -> None:
    torch.set_num_threads(1)
    reps = int(sys.argv[1]) if len(sys.argv) > 1 else 10
    start = time.perf_counter()
    mk.load_model("smollm2-135m", device="cpu")  # converts if the cache has no entry yet
    print(f"first load {time.perf_counter() - start:.1f} s", flush=True)
    times: dict[str, list[float]] = {"off": [], "on": []}
    for rep in range(reps):
        for name in ("off", "on") if rep % 2 == 0 else ("on", "off"):
            gc.collect()
            verification(name == "on")
            start = time.perf_counter()
            model = mk.load_model("smollm2-135m", device="cpu")
            times[name].append(time.perf_counter() - start)
            assert model.mechkit_info.from_cache
            del model
    verification(True)
    folder = next((weight_cache.cache_root() / "models").glob("SmolLM2*"))
    meta = weight_cache.check_entry(folder)
    hashing = []
    for _ in range(5):
        start = time.perf_counter()
        weight_cache.verify_entry(folder, meta)
        hashing.append(time.perf_counter() - start)
    for name, values in times.items():
        median = statistics.median(values)
        print(f"verification {name}: min {min(values):.3f} s, median {median:.3f} s")
    for stat in (min, statistics.median):
        off, on = stat(times["off"]), stat(times["on"])
        print(f"{stat.__name__}: +{(on - off) * 1e3:.0f} ms ({(on - off) / off:+.1%})")
    megabytes = sum(r["size"] for r in meta["files"].values()) >> 20
    print(f"hashing alone: median {statistics.median(hashing):.3f} s for {megabytes} MB")


if __name__ == "__main__":
    main()

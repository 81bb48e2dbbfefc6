"""CPU training keeps freed memory (rlkit.allocator): a freed block is reused without new page faults."""

import subprocess
import sys

PROBE = """
import resource, sys, torch
from rlkit.allocator import keep_freed_memory
applied = keep_freed_memory()

def churn():
    for _ in range(20):
        x = torch.ones(16 * 2**20); del x  # 64 MiB, over glibc's largest mmap threshold

churn()  # the heap grows to hold the block once
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
churn()
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _probe(env_extra):
    import os

    env = {**os.environ, "OMP_NUM_THREADS": "1", **env_extra}
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    applied, faults = out.stdout.split()
    return applied == "True", int(faults)


def test_freed_blocks_are_reused_without_page_faults():
    applied, faults = _probe({})
    assert applied and faults < 16_384, faults  # fewer than one block's pages
    # the default allocator maps and faults every block in again (20 x 16k pages)
    applied, faults = _probe({"RLKIT_MALLOC": "system"})
    assert not applied and faults > 300_000, faults

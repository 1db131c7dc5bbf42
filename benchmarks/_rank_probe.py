"""``pocketlm`` as one rank of a torchrun launch, writing what the rank used to ``OUT/rank-N.json``:
its resident memory before training and at its peak, and on CUDA the allocator's peak.

    torchrun --nproc-per-node 2 benchmarks/_rank_probe.py OUT train ...

(benchmarks/scaling.py runs it; the probe changes nothing in the run.)
"""

from __future__ import annotations

import json
import os
import resource
import sys
from pathlib import Path


def resident_bytes() -> int:
    """This process's resident memory now (Linux)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE")


def main() -> int:
    out, args = Path(sys.argv[1]), sys.argv[2:]
    import torch

    from pocketlm import cli

    before = resident_bytes()  # torch, pocketlm and their libraries loaded; no model yet
    code = cli.main(args)
    record = {"rank": int(os.environ.get("RANK", "0")), "exit_code": code, "rss_before_bytes": before,
              "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
              "cuda_peak_allocated_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None}
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank-{record['rank']}.json").write_text(json.dumps(record) + "\n", encoding="utf-8")
    return code


if __name__ == "__main__":
    sys.exit(main())

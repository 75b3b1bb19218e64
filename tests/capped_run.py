"""Run one `mixprec` command under a hard cap on the memory it may add.

    python -m tests.capped_run BYTES MODEL ARGS...    (MODEL: the model folder whose code is imported first)

Why RLIMIT_DATA (setrlimit) and not a cgroup: it needs no root and no cgroup delegation (CI containers often
have neither), it is per process, and since Linux 4.7 it counts every private writable mapping, i.e. all
anonymous memory (heap, tensors, thread stacks), while the page cache and the memory-mapped safetensors files,
which the kernel can drop at any time, are not charged. Address-space caps (RLIMIT_AS) would charge those
mappings and the large virtual reservations of the runtime instead of what the run really holds.

The cap is set after importing everything the command uses (including the model's transformers code, by
building its skeleton on the meta device), at the interpreter's own data size plus BYTES, so BYTES is what the
command may add: the model, the layers, the caches and hidden states. RLIMIT_DATA counts address space, so heap
fragmentation counts too: the cap is stricter than resident memory.
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path

__all__ = ["data_bytes", "main"]


def data_bytes() -> int:
    """This process's current data size (VmData of /proc/self/status), in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmData:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmData in /proc/self/status (Linux only)")


def main(argv: list[str]) -> int:
    allowance, model, args = int(argv[0]), argv[1], argv[2:]
    import accelerate  # noqa: F401  (imported before the cap, so only the run's own memory counts)
    import optuna  # noqa: F401
    import pandas  # noqa: F401
    import torch
    import transformers

    import mixprec.cli
    import mixprec.measure.run  # noqa: F401

    with torch.device("meta"):
        transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.from_pretrained(model))
    torch.ones(64, 64) @ torch.ones(64, 64)  # starts the thread pool outside the cap
    cap = data_bytes() + allowance
    resource.setrlimit(resource.RLIMIT_DATA, (cap, cap))
    return mixprec.cli.main(args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

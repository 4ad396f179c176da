"""Test-only rank entry: run a training module under FSDP on a CPU-only machine.

    accelerate launch --config_file <fsdp config, 2 processes> -m fsdp_cpu_rank train.guard --recipe R ...

accelerate 1.15 turns FSDP on only for accelerator distributed types (``MULTI_GPU`` ...), never
on CPU, so moodguard refuses an FSDP launch there (``train.distributed.check_engine_available``).
torch's FSDP2 (``fully_shard``) itself runs on CPU over gloo; this shim makes accelerate report
``MULTI_GPU`` with the gloo backend and the CPU as device, so the real FSDP code path (wrapping
by transformer layer, the full-state-dict save, checkpoint + resume) runs in the test suite.
Nothing else is changed; the module named on the command line then runs as ``__main__``.
"""
from __future__ import annotations

import os
import runpy
import sys


def _patch_accelerate() -> None:
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    def prepare_backend(self, cpu=False, sagemaker_dp=False, backend=None):
        return "gloo", DistributedType.MULTI_GPU

    PartialState._prepare_backend = prepare_backend
    os.environ["ACCELERATE_TORCH_DEVICE"] = "cpu"  # PartialState.set_device keeps it


if __name__ == "__main__":
    _patch_accelerate()
    target = sys.argv[1]
    sys.argv = [target, *sys.argv[2:]]
    runpy.run_module(target, run_name="__main__", alter_sys=True)

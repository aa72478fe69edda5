"""Run a stage script under FSDP2 on CPU processes (gloo), for tests/test_distributed.py:
    accelerate launch --config_file accelerate_configs/fsdp.yaml --num_processes 2 --mixed_precision no \
        tests/fsdp2_on_cpu.py train_ppo.py --NAME=value ...

Why a wrapper: accelerate 1.15 sets up FSDP only on accelerators. On a machine without CUDA the
stages ask for CPU processes (rlhf.common.start_stage: PartialState(cpu=True)), and accelerate
then keeps DistributedType.MULTI_CPU and ignores the FSDP settings that `accelerate launch` put
in the environment (AcceleratorState.__init__ considers FSDP for MULTI_GPU-like types only).
torch itself shards on CPU over gloo (fully_shard builds a CPU device mesh). So, after the
stage's Accelerator is built, this switches it to FSDP with the plugin that accelerate builds
from those same settings, and the stage runs unchanged: accelerator.prepare calls fully_shard,
and every FSDP branch of the stage (rlhf/engines.py) runs for real. Test-only: nothing else in
the project uses it."""

import runpy
import sys

import accelerate
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

_accelerator_init = accelerate.Accelerator.__init__
_accelerator_prepare = accelerate.Accelerator.prepare


def accelerator_init_with_fsdp(self, *args, **kwargs):
    _accelerator_init(self, *args, **kwargs)
    self.state.fsdp_plugin = FullyShardedDataParallelPlugin()  # reads FSDP_* set by accelerate launch
    # both shared states: a later AcceleratorState() copies PartialState's distributed_type back
    self.state.distributed_type = DistributedType.FSDP
    accelerate.PartialState().distributed_type = DistributedType.FSDP


def prepare_and_show_the_shards(self, *args):
    """accelerator.prepare, then one line naming the FSDP2 units (what the test checks: the
    model really went through fully_shard)."""
    from torch.distributed.fsdp import FSDPModule

    prepared = _accelerator_prepare(self, *args)
    for obj in prepared if isinstance(prepared, (tuple, list)) else (prepared,):
        if isinstance(obj, FSDPModule) and self.is_main_process:
            units = [name or "<root>" for name, m in obj.named_modules() if isinstance(m, FSDPModule)]
            print(f"fsdp2 units: {', '.join(units)}", flush=True)
    return prepared


if __name__ == "__main__":
    accelerate.Accelerator.__init__ = accelerator_init_with_fsdp
    accelerate.Accelerator.prepare = prepare_and_show_the_shards
    script, sys.argv = sys.argv[1], sys.argv[1:]
    runpy.run_path(script, run_name="__main__")

"""Run a stage script under FSDP2 or DeepSpeed on CPU processes (gloo), for tests/test_distributed.py:
    accelerate launch --config_file accelerate_configs/fsdp.yaml --num_processes 2 --mixed_precision no \
        tests/sharded_on_cpu.py train_ppo.py --NAME=value ...
(or deepspeed_zero3.yaml, with deepspeed installed).

Why a wrapper: accelerate 1.15 sets up FSDP and DeepSpeed only on accelerators. On a machine
without CUDA the stages ask for CPU processes (rlhf.common.start_stage: PartialState(cpu=True)),
and accelerate then keeps DistributedType.MULTI_CPU and ignores the FSDP or DeepSpeed settings
that `accelerate launch` put in the environment (AcceleratorState.__init__). torch shards on CPU
over gloo (fully_shard builds a CPU device mesh), and so does DeepSpeed's ZeRO-3 (its CPU
accelerator). So, once the stage's Accelerator is built, this switches it to the engine the
launch asked for, with the plugin accelerate builds from those same settings (as
AcceleratorState does on a GPU), and the stage runs unchanged: accelerator.prepare calls
fully_shard or deepspeed.initialize, and every sharded branch of the stage (rlhf/engines.py) runs
for real. Test-only: nothing else in the project uses it."""

import os
import runpy
import sys

import accelerate
from accelerate.utils import DeepSpeedPlugin, DistributedType, FullyShardedDataParallelPlugin

_accelerator_init = accelerate.Accelerator.__init__
_accelerator_prepare = accelerate.Accelerator.prepare


def accelerator_init_with_engine(self, *args, **kwargs):
    _accelerator_init(self, *args, **kwargs)
    if os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true":
        plugin = DeepSpeedPlugin()  # reads ACCELERATE_DEEPSPEED_* set by accelerate launch
        plugin.set_mixed_precision("no")
        self.state.deepspeed_plugins = plugin
        kind = DistributedType.DEEPSPEED
    else:
        self.state.fsdp_plugin = FullyShardedDataParallelPlugin()  # reads FSDP_*
        kind = DistributedType.FSDP
    # both shared states: a later AcceleratorState() copies PartialState's distributed_type back
    self.state.distributed_type = kind
    accelerate.PartialState().distributed_type = kind
    if kind == DistributedType.DEEPSPEED:
        plugin.select(_from_accelerator_state=True)  # as AcceleratorState: registers it with transformers


def prepare_and_show_the_shards(self, *args):
    """accelerator.prepare, then one line saying how the model was sharded (what the tests check:
    the model really went through fully_shard or DeepSpeed)."""
    from torch.distributed.fsdp import FSDPModule

    prepared = _accelerator_prepare(self, *args)
    for obj in prepared if isinstance(prepared, (tuple, list)) else (prepared,):
        if isinstance(obj, FSDPModule) and self.is_main_process:
            units = [name or "<root>" for name, m in obj.named_modules() if isinstance(m, FSDPModule)]
            print(f"fsdp2 units: {', '.join(units)}", flush=True)
        if type(obj).__name__ == "DeepSpeedEngine" and self.is_main_process:
            print(f"deepspeed engine: zero stage {obj.zero_optimization_stage()}", flush=True)
    return prepared


if __name__ == "__main__":
    accelerate.Accelerator.__init__ = accelerator_init_with_engine
    accelerate.Accelerator.prepare = prepare_and_show_the_shards
    script, sys.argv = sys.argv[1], sys.argv[1:]
    runpy.run_path(script, run_name="__main__")

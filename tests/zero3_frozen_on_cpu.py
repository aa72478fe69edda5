"""Worker of tests/test_distributed.py::test_shard_frozen_model_under_zero3_on_cpu, run by torchrun
on 2 CPU processes (gloo): a frozen model through rlhf.engines.shard_frozen_model with a ZeRO-3
training config, as PPO_SHARD_FROZEN_MODELS does for the reference and reward model. Prints, on
each rank, the share of the weights it holds and how far its logits are from the plain model's.
Needs deepspeed (an extra: pip install -e ".[deepspeed]")."""

import sys
from types import SimpleNamespace

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM

from rlhf.engines import shard_frozen_model


def main(model_dir):
    dist.init_process_group("gloo")  # what accelerate does; DeepSpeed then reuses the group
    frozen = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval().requires_grad_(False)
    plain = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    train_config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
                    "optimizer": {"type": "AdamW", "params": {"lr": 1e-5}},
                    "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}}
    accelerator = SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(deepspeed_config=train_config)))
    sharded = shard_frozen_model(accelerator, frozen)
    assert sharded.config.model_type == plain.config.model_type  # still the model, with its attributes
    held = sum(p.ds_tensor.numel() for p in sharded.parameters())  # this rank's partition
    total = sum(p.ds_numel for p in sharded.parameters())
    ids = torch.randint(0, plain.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (sharded(input_ids=ids).logits - plain(input_ids=ids).logits).abs().max().item()
    print(f"rank {dist.get_rank()}: holds {held} of {total} weights, max |logits - plain| {diff}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])

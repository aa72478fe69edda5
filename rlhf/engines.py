"""What the distributed engines need around PPO's generation and its final save.

Under DDP (and one process, and ZeRO-1/2) every process holds whole weights and none of this does
anything; under DeepSpeed ZeRO-3 and FSDP each process holds a shard, so generation needs the
weights gathered and the trained policy must be gathered before it is saved. Kept out of
train_ppo.py so that the algorithm reads top to bottom there; used only by it.
"""

import contextlib


def sharded(accelerator):
    """True under DeepSpeed ZeRO-3 and FSDP: each process holds a shard of the weights, so every
    forward is a collective that all processes must run together."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.FSDP:
        return True
    plugin = accelerator.state.deepspeed_plugin if accelerator.distributed_type == DistributedType.DEEPSPEED else None
    return plugin is not None and plugin.zero_stage == 3


@contextlib.contextmanager
def full_weights_for_generation(accelerator, model, with_critic=False):
    """The policy of the prepared PolicyAndCritic, ready for `generate` under every engine.
    Every process must enter it together (it gathers weights). with_critic: the critic is used
    inside too (with LoRA it is the reward model, adapter disabled): gather it as well.

    - DDP, ZeRO-1/2, one process: the weights are whole already; nothing to do.
    - ZeRO-3: gather the policy's weights once for the whole generation
      (deepspeed.zero.GatheredParameters) and take ZeRO-3's per-layer fetch/release hooks off
      meanwhile, instead of one all-gather per layer per generated token. TRL's
      unwrap_model_for_generation does the same (and we call its remove_hooks/add_hooks);
      OpenRLHF and verl mostly avoid the problem by generating with vLLM.
    - FSDP2: the decoder blocks gather their weights in their own forward, but the top-level
      weights (embeddings, final norm, lm_head) belong to the root module, PolicyAndCritic, whose
      forward generate never calls: unshard the root for the generation (after its forward hooks
      have run once: fsdp2_root_forward_hooks). FSDP1: the same with
      summon_full_params(recurse=False) (pytorch/pytorch#100069), as verl's HF rollout and the DPO
      reference code (eric-mitchell/direct-preference-optimization) do. Every forward is then still a
      collective, so generate must keep all processes stepping until the last one has finished
      (synced_gpus): transformers turns it on for modules marked FSDP-managed.
    Memory: ZeRO-3 holds one full copy of the policy (and critic) per GPU inside.
    """
    from accelerate.utils import DistributedType

    unwrapped = accelerator.unwrap_model(model)
    policy = unwrapped.policy
    if accelerator.distributed_type == DistributedType.FSDP:
        from torch.distributed.fsdp import FullyShardedDataParallel

        policy._is_fsdp_managed_module = True  # read by transformers' generate: synced_gpus=True
        if isinstance(model, FullyShardedDataParallel):  # FSDP1
            with FullyShardedDataParallel.summon_full_params(model, recurse=False, writeback=False):
                yield policy
        else:  # FSDP2: fully_shard made the root an FSDPModule in place
            fsdp2_root_forward_hooks(model)
            model.unshard()
            try:
                yield policy
            finally:
                model.reshard()
    elif sharded(accelerator):  # ZeRO-3
        import deepspeed
        from trl.models.utils import add_hooks, remove_hooks

        gathered = unwrapped if with_critic else policy  # without hooks, what is not gathered is unusable
        with deepspeed.zero.GatheredParameters(list(gathered.parameters())):
            remove_hooks(model)
            try:
                yield policy
            finally:
                add_hooks(model)
    else:
        yield policy


def fsdp2_root_forward_hooks(model):
    """Run the FSDP2 root's forward hooks once, around a no-op. FSDP2 decides which module is the
    root (and initialises itself) in the first forward; when that first forward is the policy's,
    inside generate, a decoder block runs before the root and FSDP2 stops with "FSDP requires
    running forward through the root module first" (seen on the first rollout of train_ppo.py under
    fully_shard, tests/test_multinode.py). register_fsdp_forward_method is torch's public way to
    give a method other than forward the root's hooks."""
    from torch.distributed.fsdp import register_fsdp_forward_method

    if "_fsdp_root_noop" not in vars(model):
        model._fsdp_root_noop = lambda: None
        register_fsdp_forward_method(model, "_fsdp_root_noop")
    model._fsdp_root_noop()


@contextlib.contextmanager
def whole_models_loaded(accelerator):
    """from_pretrained loading whole models, also under ZeRO-3. accelerate (1.15) registers its
    DeepSpeed config with transformers whenever ZeRO-3 is on, whatever zero3_init_flag says, and
    transformers then builds every model it loads inside deepspeed.zero.Init: partitioned across
    the processes, and a collective that all of them must run. A model loaded on one process
    (the final save) waits forever for the others; seen running train_ppo.py under ZeRO-3 on CPU
    processes. Unregistered meanwhile, registered again after."""
    plugin = accelerator.state.deepspeed_plugin
    registered = getattr(plugin, "dschf", None) if plugin is not None else None
    if registered is None:
        yield
        return
    from transformers.integrations.deepspeed import set_hf_deepspeed_config, unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        set_hf_deepspeed_config(registered)


def plain_policy(accelerator, model, dtype, sft_dir, lora):
    """The trained policy as a plain causal LM on the main process (None on the others), its LoRA
    adapter merged (`lora`: its LoraConfig, None without LoRA). Every process must call it: under
    ZeRO-3 and FSDP the full state dict is gathered first (accelerator.get_state_dict; ZeRO-3 needs
    zero3_save_16bit_model), then loaded into a fresh copy of the SFT model (`sft_dir`). One more copy of the policy in CPU memory, at the
    end only."""
    from transformers import AutoModelForCausalLM

    from rlhf.common import merge_lora_weights

    state = accelerator.get_state_dict(model)  # names prefixed "policy." / "critic."
    if not accelerator.is_main_process:
        return None
    state = {k[len("policy."):]: v for k, v in state.items() if k.startswith("policy.")}
    with whole_models_loaded(accelerator):  # on this process only: no ZeRO-3 partitioning
        if lora is not None:
            return merge_lora_weights(sft_dir, state, lora, dtype)
        policy = AutoModelForCausalLM.from_pretrained(sft_dir, dtype=dtype)
    policy.load_state_dict(state)
    return policy


def frozen_model_deepspeed_config(train_config, hidden_size):
    """The DeepSpeed config of an inference-only engine for a frozen model (PPO's reference policy
    and reward model), built from the training engine's config after accelerator.prepare (which
    has filled in its "auto" values). The recipe of TRL's prepare_deepspeed (trl/models/utils.py),
    written out here as nested keys:
    - ZeRO-3: the same stage, so the frozen model is sharded like the policy (1/N of its weights
      per GPU, each layer gathered for its forward), with DeepSpeed's bucket sizes scaled to the
      model as transformers' HfDeepSpeedConfig does for "auto": reduce bucket h^2, prefetch 0.9 h^2,
      parameters under 10 h elements kept whole (biases, norms).
    - ZeRO-0/1/2: stage 0, a plain whole copy per GPU (stages 1-2 shard optimizer states and
      gradients, which a frozen model has none of).
    - no optimizer, scheduler or optimizer offload: there is nothing to optimise, and DeepSpeed
      would build them (a CPU Adam for an offloaded optimizer) and fail without an optimizer.
      Parameter offload (offload_param) is kept: a frozen model can live in CPU memory too.
    - batch sizes and clipping still "auto" (accelerate fills them in only when it prepares the
      training engine) are dropped, the micro-batch set to 1: DeepSpeed rejects "auto", and an
      engine that only runs forwards uses none of them.
    Pure: needs no deepspeed, returns a new dict."""
    import copy

    config = copy.deepcopy(train_config)
    for key in ("optimizer", "scheduler"):
        config.pop(key, None)
    for key in ("train_batch_size", "gradient_accumulation_steps", "gradient_clipping"):
        if config.get(key) == "auto":
            config.pop(key)
    if config.get("train_micro_batch_size_per_gpu", "auto") == "auto":
        config["train_micro_batch_size_per_gpu"] = 1
    zero = config.setdefault("zero_optimization", {})
    zero.pop("offload_optimizer", None)
    if zero.get("stage", 0) == 3:
        zero.update({"reduce_bucket_size": hidden_size * hidden_size,
                     "stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
                     "stage3_param_persistence_threshold": 10 * hidden_size})
    else:
        zero["stage"] = 0
    return config


def shard_frozen_model(accelerator, model):
    """Under DeepSpeed: `model` (frozen, eval) wrapped in an inference-only DeepSpeed engine with
    frozen_model_deepspeed_config, i.e. sharded under ZeRO-3 instead of whole on every GPU
    (docs/SCALING.md's memory table: 4P per GPU for the reference and reward model becomes 4P/N).
    Every process must call it (best after accelerator.prepare, when the training config is complete),
    and then run every forward of the model together (PPO's rollout loop does: the same number of
    equally shaped mini-batches on all ranks, and its evaluation runs on all ranks when sharded).
    Returns the model (the engine's module), sharded, with ZeRO-3's hooks that gather each
    layer's weights for its forward. Anything else (DDP, FSDP, one process): the model unchanged."""
    if accelerator.state.deepspeed_plugin is None:
        return model
    import deepspeed

    hidden = max(getattr(model.config, "hidden_sizes", None) or [model.config.hidden_size])
    config = frozen_model_deepspeed_config(accelerator.state.deepspeed_plugin.deepspeed_config, hidden)
    engine, *_ = deepspeed.initialize(model=model, config=config)
    engine.eval()
    # the model itself, not the engine: ZeRO-3's gather hooks sit on the model's own modules, and
    # callers read model attributes (rm.config is the model's config, engine.config DeepSpeed's)
    return engine.module

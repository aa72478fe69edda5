"""The README.md model card of a stage output (what it was made from, with which data and
settings, its metrics, how to load it with plain transformers) and the upload of the folder to
the Hugging Face Hub (PUSH_TO_HUB, HUB_MODEL_ID). rlhf/handoff.py writes the card into every
stage output and calls the upload at the end of a stage."""

import os

from rlhf.settings import UserError

STAGE_TITLES = {"sft": "supervised fine-tuning (SFT)", "rm": "reward model", "ppo": "PPO",
                "dpo": "direct preference optimisation (DPO)"}
STAGE_SCRIPTS = {"sft": "train_sft.py", "rm": "train_rm.py", "ppo": "train_ppo.py", "dpo": "train_dpo.py"}
# per stage: (data settings, the settings a reader of the card wants first); all of them are in rlhf_stage.json
CARD_SETTINGS = {
    "sft": (("SFT_TRAIN_FILE", "SFT_EVAL_FILE", "EVAL_TASKS_FILE"),
            ("EPOCHS", "LR", "BATCH_SIZE", "GRAD_ACCUM", "MAX_LEN", "WARMUP_RATIO", "USE_LORA", "LORA_R", "LORA_ALPHA",
             "CHAT_TEMPLATE", "PRECISION", "SEED")),
    "rm": (("RM_TRAIN_FILE", "RM_EVAL_FILE"),
           ("RM_EPOCHS", "RM_LR", "RM_BATCH_SIZE", "RM_GRAD_ACCUM", "RM_MAX_LEN", "RM_ONPOLICY_SAMPLES", "USE_LORA",
            "LORA_R", "LORA_ALPHA", "PRECISION", "SEED")),
    "ppo": (("PPO_PROMPTS_FILE", "EVAL_TASKS_FILE"),
            ("PPO_STEPS", "PPO_ADVANTAGE", "PPO_LR", "PPO_BATCH_SIZE", "PPO_MINI_BATCH_SIZE", "PPO_EPOCHS",
             "PPO_SAMPLES_PER_PROMPT", "PPO_TEMPERATURE", "PPO_RESPONSE_LEN", "MAX_LEN", "PPO_KL_COEF", "PPO_EXEC_WEIGHT",
             "PPO_RM_WEIGHT", "PPO_SIL_COEF", "USE_LORA", "PRECISION", "SEED")),
    "dpo": (("DPO_TRAIN_FILE", "DPO_EVAL_FILE", "RM_TRAIN_FILE", "RM_EVAL_FILE", "PPO_PROMPTS_FILE", "EVAL_TASKS_FILE"),
            ("DPO_LOSS_TYPE", "DPO_BETA", "DPO_LR", "DPO_EPOCHS", "DPO_BATCH_SIZE", "DPO_GRAD_ACCUM", "DPO_ROUNDS",
             "DPO_ONLINE_SAMPLES", "MAX_LEN", "USE_LORA", "LORA_R", "LORA_ALPHA", "PRECISION", "SEED")),
}
DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".gz")


def hub_repo(hub_model_id, stage):
    """The Hub repository a stage uploads to: HUB_MODEL_ID-<stage>."""
    return f"{hub_model_id}-{stage}"


def hub_dataset(value):
    """The Hub dataset id a data setting names (`name[:split]`), or None for a local file."""
    name = value.split(":")[0]
    return name if name.count("/") == 1 and not name.endswith(DATA_SUFFIXES) and not os.path.exists(name) else None


def usage_snippet(stage, where):
    """Python that loads the stage output `where` (a folder or a Hub id) with transformers and uses it."""
    if stage == "rm":
        return f'''import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained("{where}")
model = AutoModelForSequenceClassification.from_pretrained("{where}")  # one output: the reward
conversation = [{{"role": "user", "content": "Write a Python function add(a, b) that returns a + b."}},
                {{"role": "assistant", "content": "```python\\ndef add(a, b):\\n    return a + b\\n```"}}]
inputs = tokenizer.apply_chat_template(conversation, return_tensors="pt", return_dict=True)
with torch.no_grad():
    score = model(**inputs).logits[0, 0].item()
print((score - model.config.reward_mean) / model.config.reward_std)  # normalised as PPO reads it
'''
    return f'''from transformers import AutoModelForCausalLM, AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained("{where}")
model = AutoModelForCausalLM.from_pretrained("{where}")
messages = [{{"role": "user", "content": "Write a Python function that reverses a string."}}]
inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
output = model.generate(**inputs, max_new_tokens=256)
print(tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
'''


def model_card(stage, path, info):
    """README.md of the stage output `path` from its metadata `info` (what rlhf_stage.json holds)."""
    from huggingface_hub import ModelCardData

    settings, metrics = info.get("settings", {}), info.get("metrics", {})
    data, shown = CARD_SETTINGS[stage]
    base = info.get("base_model") or settings.get("MODEL_NAME", "")
    local_base = os.path.exists(os.path.expanduser(base)) or base.startswith((".", "/", "~"))
    datasets = sorted({d for d in (hub_dataset(str(settings.get(k, ""))) for k in data) if d})
    meta = ModelCardData(library_name="transformers", base_model=None if local_base else base, datasets=datasets or None,
                         pipeline_tag="text-classification" if stage == "rm" else "text-generation",
                         tags=["rlhf", "code", "trl", {"sft": "sft", "rm": "reward-model", "ppo": "ppo", "dpo": "dpo"}[stage]])
    where = hub_repo(settings["HUB_MODEL_ID"], stage) if settings.get("PUSH_TO_HUB") else path
    machine = info.get("machine", {})
    hardware = ", ".join(machine.get("gpus", [])) or f"{machine.get('cpus', '?')} CPUs, no GPU"
    inputs = "".join(f"| built on ({earlier.upper()}) | `{made['path']}`, finished {made['finished_at']} |\n"
                     for earlier, made in info.get("inputs", {}).items())
    lora = settings.get("USE_LORA")
    rows = "".join(f"| `{k}` | `{settings[k]!r}` |\n" for k in shown if k in settings and (lora or not k.startswith("LORA_")))
    data_rows = "".join(f"| `{k}` | `{settings[k]}` |\n" for k in data if k in settings)
    results = "".join(f"| {k} | {round(v, 4) if isinstance(v, float) else v} |\n" for k, v in metrics.items()
                      if isinstance(v, (int, float, str)) and not isinstance(v, bool) and v is not None)
    recipe = settings.get("RECIPE") or "none"
    return f"""---
{meta.to_yaml()}
---

# {os.path.basename(os.path.normpath(path))}: {STAGE_TITLES[stage]}

The {STAGE_TITLES[stage]} stage of an RLHF run for code (SFT -> reward model -> PPO, or SFT -> DPO), made by
`{STAGE_SCRIPTS[stage]}` of rlhf-code on {info.get('finished_at', '?')} ({hardware}).

| made from | |
|---|---|
| base model (`MODEL_NAME`) | `{base}` |
| recipe (`RECIPE`) | `{recipe}` |
{inputs}{data_rows}
## Settings

| setting | value |
|---|---|
{rows}
Every setting it ran with: `rlhf_stage.json` in this folder.

## Metrics

| metric | value |
|---|---|
{results}
## Use with transformers

```python
{usage_snippet(stage, where)}```

Generated code is untrusted: run it in a sandbox, as rlhf-code's evaluation does.
"""


def check_hub_login(push_to_hub):
    """PUSH_TO_HUB (`push_to_hub`) needs a token (`hf auth login` or HF_TOKEN): one line at the start
    of a stage, not after hours of training."""
    if not push_to_hub:
        return
    from huggingface_hub import get_token

    if get_token() is None:
        raise UserError("PUSH_TO_HUB=true needs a Hugging Face token: run `hf auth login` (or set HF_TOKEN), "
                        "or --PUSH_TO_HUB=false")


def push_to_hub(folder, stage, hub_model_id):
    """Upload the finished stage output `folder` (model, tokenizer, card, rlhf_stage.json) to the
    private Hub repository HUB_MODEL_ID-<stage> (hub_repo), created when missing. A failure is one line with
    the command that uploads it by hand; the folder is saved either way."""
    from huggingface_hub import HfApi

    repo = hub_repo(hub_model_id, stage)
    api = HfApi()
    try:
        api.create_repo(repo, private=True, exist_ok=True)
        url = api.upload_folder(repo_id=repo, folder_path=folder, commit_message=f"{STAGE_SCRIPTS[stage]}: {folder}")
    except Exception as e:  # noqa: BLE001  network, token, quota, a bad id: the model is saved, say how to upload it
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"upload of {folder} to the Hub as {repo} failed ({reason}); the stage output is saved: "
                        f"upload it with `hf upload {repo} {folder}`") from None
    print(f"{stage}: uploaded {folder} to {getattr(url, 'repo_url', None) or repo} (private)")

"""Ask a trained model for code: applies the chat template, samples an answer, prints it.

Works with any stage's causal-LM folder (./sft_model, ./ppo_model) or a hub id.

    python scripts/generate.py --model ./ppo_model "用Python实现快速排序算法"
    python scripts/generate.py --model ./sft_model --greedy "Write is_prime(n)."
    python scripts/generate.py --model ./ppo_model --interactive      # one prompt per line, `exit` ends
"""

import argparse
import sys

import config as C
from rlhf.common import load_for_generation, run_stage, seed_everything
from rlhf.settings import tool_help


def answer(model, tokenizer, prompt, args):
    from rlhf.codeeval import generate_completions

    return generate_completions(model, tokenizer, [[{"role": "user", "content": prompt}]], args.max_new_tokens,
                                temperature=None if args.greedy else args.temperature, top_p=args.top_p,
                                top_k=args.top_k, progress=False)[0][0]


def main(argv):
    ap = argparse.ArgumentParser(description="Generate an answer with a trained model (chat template applied).",
                                 epilog=tool_help(__file__), formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("prompt", nargs="?", help="the request; without it, prompts are read from the terminal")
    ap.add_argument("--model", default=C.PPO_DIR, help=f"model folder or hub id (default {C.PPO_DIR})")
    ap.add_argument("--interactive", action="store_true", help="read prompts in a loop until EOF or `exit`")
    ap.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
    ap.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (default 0.7)")
    ap.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling threshold (default 0.95)")
    ap.add_argument("--top-k", type=int, default=50, help="sample among the k most likely tokens; 0 = all (default 50)")
    ap.add_argument("--max-new-tokens", type=int, default=C.GEN_MAX_NEW_TOKENS,
                    help=f"longest answer in tokens (default {C.GEN_MAX_NEW_TOKENS})")
    ap.add_argument("--seed", type=int, default=C.SEED, help=f"sampling seed (default {C.SEED})")
    args = ap.parse_args(argv)
    if args.temperature <= 0:
        ap.error("--temperature must be > 0 (use --greedy for greedy decoding)")

    model, tokenizer = load_for_generation(args.model, C.PRECISION)
    seed_everything(args.seed)
    if args.prompt and not args.interactive:
        print(answer(model, tokenizer, args.prompt, args))
        return
    if args.prompt:
        print(answer(model, tokenizer, args.prompt, args), flush=True)
    tty = sys.stdin.isatty()
    while True:
        try:
            prompt = input("> " if tty else "")
        except EOFError:
            break
        if prompt.strip() in ("exit", "quit"):
            break
        if prompt.strip():
            print(answer(model, tokenizer, prompt, args), flush=True)


if __name__ == "__main__":
    run_stage(main)

"""New tokens per second of greedy generation: gptcli's modes vs the book's generate_text_simple vs transformers.

All run the same random weights of one model shape (default: GPT-2 124M,
configs/gpt2-124m.yaml) in the same process, on the same prompts, so the ratios
are what to read. Contenders:
  book                 llms_from_scratch.ch04.generate_text_simple (recomputes the whole sequence per token)
  transformers         GPT2LMHeadModel.generate (its KV cache), weights as `gptcli export` writes them
  gptcli               `gptcli generate`: KV cache, on the CPU optimize_for_decoding; float32, exact
  gptcli-bf16/-int8    --decode-precision bf16 | int8 (weight-only); "same as fp32" states their cost
  ...-compiled         --compile-decode (static KV cache, compiled one-token step): with --compile, default on GPU
"same as fp32" is the share of new tokens equal to gptcli fp32's, and the mean share of each row
before its first difference (greedy sequences part ways after one near-tie flips).

    python benchmarks/generate_speed.py                       # 200 new tokens, batch 1 and 8
    python benchmarks/generate_speed.py --new-tokens 20 --skip-book   # a quick look
    python benchmarks/generate_speed.py --device cuda --repeats 3     # GPU, compiled modes too

The book's loop recomputes the whole sequence for every token, so it slows down
as the sequence grows: its cost for 200 tokens on a CPU is minutes.
Needs the test extras (transformers) and llms-from-scratch (installed with --no-deps).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from gptcli.config import load_config
from gptcli.device import resolve_device
from gptcli.generate import DECODE_PRECISIONS, generate, lower_precision_for_decoding, optimize_for_decoding
from gptcli.model import GPTModel
from gptcli.perf import cpu_model

ROOT = Path(__file__).resolve().parents[1]


def book_model_from(ours: GPTModel):
    """The book's GPTModel (llms-from-scratch ch04) holding our weights."""
    from llms_from_scratch.ch04 import GPTModel as BookGPT

    c = ours.cfg
    book = BookGPT({"vocab_size": c.vocab_size, "context_length": c.context_length, "emb_dim": c.emb_dim,
                    "n_heads": c.n_heads, "n_layers": c.n_layers, "drop_rate": 0.0, "qkv_bias": c.qkv_bias})
    if c.gelu == "exact":
        for block in book.trf_blocks:
            block.ff.layers[1] = torch.nn.GELU()
    missing, unexpected = book.load_state_dict(ours.state_dict(), strict=False)
    assert not unexpected and all(k.endswith("att.mask") for k in missing), (missing, unexpected)
    return book


def hf_model_from(ours: GPTModel):
    """transformers' GPT2LMHeadModel holding our weights, as `gptcli export` writes them (names, config)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from gptcli.model import export_state_dict
    from gptcli.weights import hf_config, to_gpt2_state_dict

    c = ours.cfg
    config = GPT2Config(**{**hf_config(c), "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0})
    tensors = {(k if k == "lm_head.weight" else f"transformer.{k}"): v.contiguous()
               for k, v in to_gpt2_state_dict(export_state_dict(ours), c).items()}
    model = GPT2LMHeadModel(config)
    model.load_state_dict(tensors, strict=True)
    model.generation_config.eos_token_id = None  # random weights: never stop early
    model.generation_config.pad_token_id = 0
    return model


def seconds(fn, device: torch.device) -> float:
    """Wall time of one call, with the device's queue drained before and after."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def agreement(tokens: torch.Tensor, exact: torch.Tensor) -> tuple[float, float]:
    """Share of new tokens equal to the exact mode's, and mean length of the identical prefix / new tokens."""
    same = tokens == exact  # (B, N)
    prefix = torch.where(same.all(1), same.shape[1], (~same).int().argmax(1)).float()
    return same.float().mean().item(), (prefix / same.shape[1]).mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "gpt2-124m.yaml"))
    parser.add_argument("--new-tokens", type=int, default=200)
    parser.add_argument("--prompt-tokens", type=int, default=10)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=1,
                        help="timed runs of each contender, taken in turns (the best counts)")
    parser.add_argument("--precisions", nargs="+", default=list(DECODE_PRECISIONS), choices=DECODE_PRECISIONS,
                        help="gptcli's decode precisions (fp32 = the exact mode)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="also time each precision with --compile-decode (default: on a GPU only)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--skip-book", action="store_true")
    parser.add_argument("--skip-hf", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    cfg = load_config(args.config, {"model.drop_rate": 0.0})
    device = resolve_device(args.device)
    compile_too = device.type == "cuda" if args.compile is None else args.compile
    torch.manual_seed(0)
    ours = GPTModel(cfg.model).eval()
    contenders: dict[str, tuple] = {}  # name -> (kind, model, options)
    if not args.skip_book:
        contenders["book"] = ("book", book_model_from(ours).to(device).eval(), {})
    if not args.skip_hf:
        contenders["transformers"] = ("hf", hf_model_from(ours).to(device).eval(), {})
    ours.to(device)
    for precision in args.precisions:
        name = "gptcli" if precision == "fp32" else f"gptcli-{precision}"
        model = lower_precision_for_decoding(ours, precision)
        contenders[name] = ("gptcli", model, {})
        if compile_too:
            contenders[name + "-compiled"] = ("gptcli", model, {"compile_decode": True})
    ctx = cfg.model.context_length

    def run(kind, model, options, idx, n):
        if kind == "gptcli":
            return torch.tensor(generate(model, idx.tolist(), n, **options))
        if kind == "book":
            from llms_from_scratch.ch04 import generate_text_simple

            with torch.no_grad():
                return generate_text_simple(model, idx, n, ctx)[:, idx.shape[1]:]
        with torch.no_grad():
            out = model.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=n, do_sample=False)
        return out[:, idx.shape[1]:]

    processor = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()
    print(f"{cfg.source}: {ours.num_params() / 1e6:.0f}M parameters, context {ctx}, {cfg.model.impl}; device {device} "
          f"({processor}), {torch.get_num_threads()} CPU threads, torch {torch.__version__}")
    print(f"greedy, {args.prompt_tokens}-token prompts, {args.new_tokens} new tokens, best of {args.repeats}; "
          f"'same as fp32': share of new tokens equal to gptcli fp32's (and mean identical prefix)")
    print(f"{'batch':>5}  {'contender':<22} {'new tok/s':>10} {'vs book':>8} {'vs transformers':>16} {'same as fp32':>20}")
    g = torch.Generator().manual_seed(1)
    for batch in args.batch_sizes:
        for kind, model, _ in contenders.values():
            if kind == "gptcli":
                optimize_for_decoding(model, batch)  # as `gptcli generate` does (the benchmark owns these models)
        idx = torch.randint(0, cfg.model.vocab_size, (batch, args.prompt_tokens), generator=g).to(device)
        outputs = {name: run(*c, idx, min(4, args.new_tokens)) for name, c in contenders.items()}  # warm-up, compile
        best = dict.fromkeys(contenders, float("inf"))
        for _ in range(args.repeats):  # in turns, so that a busy moment of the machine hits all alike
            for name, c in contenders.items():
                best[name] = min(best[name], seconds(
                    lambda: outputs.__setitem__(name, run(*c, idx, args.new_tokens).cpu()), device))
        rates = {name: batch * args.new_tokens / t for name, t in best.items()}
        exact = outputs.get("gptcli")
        for name in contenders:
            vs_book = f"{rates[name] / rates['book']:.2f}x" if "book" in rates else ""
            vs_hf = f"{rates[name] / rates['transformers']:.2f}x" if "transformers" in rates else ""
            same = ""
            if exact is not None:
                share, prefix = agreement(outputs[name], exact)
                same = f"{100 * share:.1f}% ({100 * prefix:.0f}%)"
            print(f"{batch:>5}  {name:<22} {rates[name]:>10.1f} {vs_book:>8} {vs_hf:>16} {same:>20}", flush=True)


if __name__ == "__main__":
    main()

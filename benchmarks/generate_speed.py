"""New tokens per second of greedy generation: gptcli vs the book's `generate` vs transformers.

All three run the same random weights of one model shape (default: GPT-2 124M,
configs/gpt2-124m.yaml) in the same process, on the same prompts, so the ratios
are what to read. It times each at every batch size and says whether the three
produced the same greedy tokens. gptcli runs as `gptcli generate` runs it: KV
cache, and on the CPU `optimize_for_decoding` (column-major weight storage).

    python benchmarks/generate_speed.py                       # 200 new tokens, batch 1 and 8
    python benchmarks/generate_speed.py --new-tokens 20 --skip-book   # a quick look

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
from gptcli.generate import generate, optimize_for_decoding
from gptcli.model import GPTModel

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
    """transformers' GPT2LMHeadModel holding our weights (its Conv1D stores (in, out), the transpose of Linear)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    c = ours.cfg
    assert c.gelu == "tanh", "GPT2LMHeadModel computes the tanh GELU (gelu_new)"
    config = GPT2Config(vocab_size=c.vocab_size, n_positions=c.context_length, n_embd=c.emb_dim, n_layer=c.n_layers,
                        n_head=c.n_heads, activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0,
                        attn_pdrop=0.0, layer_norm_epsilon=1e-5, tie_word_embeddings=True)
    sd = ours.state_dict()
    out = {"transformer.wte.weight": sd["tok_emb.weight"], "transformer.wpe.weight": sd["pos_emb.weight"],
           "transformer.ln_f.weight": sd["final_norm.scale"], "transformer.ln_f.bias": sd["final_norm.shift"],
           "lm_head.weight": sd["out_head.weight"]}
    for i in range(c.n_layers):
        b, h = f"trf_blocks.{i}.", f"transformer.h.{i}."
        qkv = [b + f"att.{n}" for n in ("W_query", "W_key", "W_value")]
        out[h + "attn.c_attn.weight"] = torch.cat([sd[n + ".weight"].T for n in qkv], dim=1)
        out[h + "attn.c_attn.bias"] = (torch.cat([sd[n + ".bias"] for n in qkv]) if c.qkv_bias
                                       else torch.zeros(3 * c.emb_dim))
        pairs = {"attn.c_proj": "att.out_proj", "mlp.c_fc": "ff.layers.0", "mlp.c_proj": "ff.layers.2"}
        for hf_name, our_name in pairs.items():
            out[h + hf_name + ".weight"] = sd[b + our_name + ".weight"].T
            out[h + hf_name + ".bias"] = sd[b + our_name + ".bias"]
        for hf_name, our_name in (("ln_1", "norm1"), ("ln_2", "norm2")):
            out[h + hf_name + ".weight"] = sd[b + our_name + ".scale"]
            out[h + hf_name + ".bias"] = sd[b + our_name + ".shift"]
    model = GPT2LMHeadModel(config)
    model.load_state_dict({k: v.contiguous() for k, v in out.items()}, strict=True)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "gpt2-124m.yaml"))
    parser.add_argument("--new-tokens", type=int, default=200)
    parser.add_argument("--prompt-tokens", type=int, default=10)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=1,
                        help="timed runs of each contender, taken in turns (the best counts)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--skip-book", action="store_true")
    parser.add_argument("--skip-hf", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    cfg = load_config(args.config, {"model.drop_rate": 0.0})
    device = resolve_device(args.device)
    torch.manual_seed(0)
    ours = GPTModel(cfg.model)
    with torch.no_grad():  # tie the head to the embedding, so that GPT2LMHeadModel holds the same weights
        ours.out_head.weight.copy_(ours.tok_emb.weight)
    contenders = {"gptcli": ours}
    if not args.skip_book:
        contenders["book"] = book_model_from(ours).to(device).eval()
    if not args.skip_hf:
        contenders["transformers"] = hf_model_from(ours).to(device).eval()
    ours.to(device).eval()
    ctx = cfg.model.context_length

    def run(name, model, idx, n):
        if name == "gptcli":
            return torch.tensor(generate(model, idx.tolist(), n))
        if name == "book":
            from llms_from_scratch.ch05 import generate as book_generate

            with torch.no_grad():
                return book_generate(model, idx, n, ctx)[:, idx.shape[1]:]
        with torch.no_grad():
            out = model.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=n, do_sample=False)
        return out[:, idx.shape[1]:]

    print(f"{cfg.source}: {ours.num_params() / 1e6:.0f}M parameters, context {ctx}, {cfg.model.impl}; device {device}, "
          f"{torch.get_num_threads()} CPU threads, torch {torch.__version__}")
    print(f"greedy, {args.prompt_tokens}-token prompts, {args.new_tokens} new tokens, best of {args.repeats}")
    names = list(contenders)
    header = f"{'batch':>5} " + " ".join(f"{n + ' tok/s':>18}" for n in names)
    header += "".join(f"{'gptcli/' + n:>20}" for n in names[1:]) + "  same tokens"
    print(header)
    g = torch.Generator().manual_seed(1)
    for batch in args.batch_sizes:
        optimize_for_decoding(ours, batch)  # as `gptcli generate` does
        idx = torch.randint(0, cfg.model.vocab_size, (batch, args.prompt_tokens), generator=g).to(device)
        outputs = {name: run(name, model, idx, min(4, args.new_tokens)) for name, model in contenders.items()}  # warm-up
        best = dict.fromkeys(contenders, float("inf"))
        for _ in range(args.repeats):  # in turns, so that a busy moment of the machine hits all alike
            for name, model in contenders.items():
                best[name] = min(best[name], seconds(
                    lambda: outputs.__setitem__(name, run(name, model, idx, args.new_tokens).cpu()), device))
        rates = {name: batch * args.new_tokens / t for name, t in best.items()}
        same = all(torch.equal(outputs["gptcli"], o) for o in outputs.values())
        line = f"{batch:>5} " + " ".join(f"{rates[n]:>18.1f}" for n in names)
        line += "".join(f"{rates['gptcli'] / rates[n]:>19.2f}x" for n in names[1:])
        print(line + f"  {'yes' if same else 'NO'}", flush=True)

if __name__ == "__main__":
    main()

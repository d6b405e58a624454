"""The model is the book's GPTModel, weight for weight and logit for logit."""

import dataclasses
import math

import pytest
import torch

from conftest import book_model, tiny_model_config
from gptcli import evaluate as ev
from gptcli.config import ModelConfig
from gptcli.loss import cross_entropy
from gptcli.model import GPTModel, export_state_dict, flops_per_token, load_state_dict
from gptcli.convert import from_book_state_dict, load_book_state_dict

# The chapter-5 toy batch: "every effort moves" / "I really like" and their shifted targets.
TOY_INPUTS = torch.tensor([[16833, 3626, 6100], [40, 1107, 588]])
TOY_TARGETS = torch.tensor([[3626, 6100, 345], [588, 428, 11311]])


@pytest.fixture(scope="module")
def untrained_124m():
    """The book's GPT_CONFIG_124M at context 256 and seed 123 -- ours and the book's, in eval mode --
    built once per GELU for the tests of this module (one pair held at a time: 1.3 GB)."""
    built = {}

    def get(gelu: str):
        if gelu not in built:
            built.clear()
            cfg = ModelConfig(gelu=gelu)
            torch.manual_seed(123)
            ours = GPTModel(cfg).eval()
            built[gelu] = (cfg, ours, book_model(cfg).eval())
        return built[gelu]

    yield get
    built.clear()


@pytest.mark.parametrize("gelu, toy_loss", [("exact", 10.7723), ("tanh", 10.7722)])
def test_124m_at_seed_123_equals_the_books_model(untrained_124m, gelu, toy_loss):
    cfg, ours, book = untrained_124m(gelu)
    for (name, p), (book_name, q) in zip(ours.named_parameters(), book.named_parameters()):
        assert name == book_name and torch.equal(p, q), name
    with torch.no_grad():
        logits = ours(TOY_INPUTS)
        # the same ops in another association (our attention reshapes): float32 rounding of O(1) logits
        torch.testing.assert_close(logits, book(TOY_INPUTS), rtol=0, atol=1e-5)
    assert round(cross_entropy(logits, TOY_TARGETS).item(), 4) == toy_loss
    # The book prints 163,009,536 at context 1024; at 256 the position table is 768 x 768 smaller.
    assert ours.num_params() == 163_009_536 - 768 * 768


def test_token_report_gives_the_chapters_target_probabilities(untrained_124m, tiktoken_offline):
    # Chapter 5: the untrained 124M model at seed 123 gives "every effort moves" -> " effort moves you"
    # the probabilities 7.4541e-05, 3.1061e-05, 1.1563e-05. (Here, beside the parity test, to share its model.)
    cfg, ours, book = untrained_124m("tanh")
    report = ev.token_report(ours, "every effort moves you")
    inputs, targets = torch.tensor([[16833, 3626, 6100]]), torch.tensor([[3626, 6100, 345]])
    with torch.no_grad():
        book_logits = book(inputs)
    book_probs = torch.softmax(book_logits, dim=-1)[0]  # (3, V)

    first, *scored = report["tokens"]
    assert (first["token"], first["prob"], first["rank"]) == ("every", None, None)
    assert [t["token"] for t in scored] == [" effort", " moves", " you"]
    probs = torch.tensor([t["prob"] for t in scored])
    # log_softmax().exp() vs softmax() of the same float32 logits: rounding of a ~1e-5 probability
    torch.testing.assert_close(probs, book_probs[[0, 1, 2], targets[0]], rtol=1e-4, atol=0)
    # the book's printed probabilities have 5 significant digits: 1e-3 is their rounding, not a machine's
    torch.testing.assert_close(probs, torch.tensor([7.4541e-05, 3.1061e-05, 1.1563e-05]), rtol=1e-3, atol=0)
    for i, t in enumerate(scored):
        assert t["rank"] == int((book_probs[i] > book_probs[i, t["id"]]).sum()) + 1
        assert [a["id"] for a in t["top"]] == book_probs[i].topk(5).indices.tolist()
    # float64 sum of per-token nats vs float32 mean cross-entropy of the book's logits: float32 rounding
    assert report["loss"] == pytest.approx(cross_entropy(book_logits, targets).item(), rel=1e-5)
    assert report["tokens_predicted"] == 3
    assert report["bytes"] == len(" effort moves you")
    # default rel=1e-6: the same float64 formula
    assert report["bpb"] == pytest.approx(report["loss"] * 3 / (math.log(2) * 17))


def test_book_model_pth_loads_and_gives_the_books_logits(tmp_path):
    cfg = tiny_model_config(gelu="tanh")
    book = book_model(cfg, seed=7).eval()
    torch.save(book.state_dict(), tmp_path / "model.pth")
    torch.save({"model_state_dict": book.state_dict(), "optimizer_state_dict": {}}, tmp_path / "model_and_optimizer.pth")
    x = torch.randint(0, cfg.vocab_size, (2, 16))
    for name in ("model.pth", "model_and_optimizer.pth"):
        torch.manual_seed(0)  # a different init, overwritten by the load
        ours = GPTModel(cfg).eval()
        load_state_dict(ours, from_book_state_dict(load_book_state_dict(tmp_path / name)))
        with torch.no_grad():
            # the same weights through two implementations: float32 rounding of O(1) logits
            torch.testing.assert_close(ours(x), book(x), rtol=0, atol=1e-5)


def test_code_in_a_pickle_is_refused(tmp_path):
    from gptcli.errors import InputError

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"w": torch.zeros(1), "evil": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(InputError, match="refused"):
        load_book_state_dict(tmp_path / "evil.pth")


def test_fused_impl_matches_book_impl_within_1e5():
    for gelu in ("exact", "tanh"):
        cfg = tiny_model_config(gelu=gelu, drop_rate=0.0)
        torch.manual_seed(1)
        book_impl = GPTModel(cfg).eval()
        fused = GPTModel(dataclasses.replace(cfg, impl="fused")).eval()
        fused.load_state_dict(book_impl.state_dict())
        x = torch.randint(0, cfg.vocab_size, (3, cfg.context_length))
        with torch.no_grad():
            # fused kernels (SDPA, F.layer_norm, F.gelu) compute the same functions to float32 rounding of O(1) logits
            torch.testing.assert_close(fused(x), book_impl(x), rtol=0, atol=1e-5)


def test_shapes_and_initial_loss_near_ln_vocab():
    cfg = tiny_model_config(drop_rate=0.0)
    torch.manual_seed(0)
    model = GPTModel(cfg)
    x = torch.randint(0, cfg.vocab_size, (4, cfg.context_length))
    logits = model(x)
    assert logits.shape == (4, cfg.context_length, cfg.vocab_size)
    loss = cross_entropy(logits, torch.randint(0, cfg.vocab_size, x.shape)).item()
    assert abs(loss - torch.log(torch.tensor(cfg.vocab_size)).item()) < 0.5


def test_loss_falls_when_overfitting_one_batch():
    cfg = tiny_model_config(drop_rate=0.0)
    torch.manual_seed(0)
    model = GPTModel(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x = torch.randint(0, cfg.vocab_size, (2, 16))
    y = torch.roll(x, -1, dims=1)
    first = None
    for _ in range(80):
        loss = cross_entropy(model(x), y)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.2 * first


def test_causality_future_tokens_do_not_change_past_logits():
    cfg = tiny_model_config(drop_rate=0.0)
    for impl in ("book", "fused"):
        torch.manual_seed(0)
        model = GPTModel(dataclasses.replace(cfg, impl=impl)).eval()
        x = torch.randint(0, cfg.vocab_size, (1, 12))
        y = x.clone()
        y[0, 8:] = (y[0, 8:] + 1) % cfg.vocab_size
        with torch.no_grad():
            # assert_close's float32 default (rtol 1.3e-6, atol 1e-5): the prefix is the same computation at another T
            torch.testing.assert_close(model(x)[:, :8], model(y)[:, :8])


def test_padded_vocabulary_keeps_logits_and_checkpoints_at_vocab_size():
    cfg = tiny_model_config(drop_rate=0.0, impl="fused")
    torch.manual_seed(0)
    plain = GPTModel(cfg).eval()
    padded = GPTModel(dataclasses.replace(cfg, pad_vocab_multiple=64)).eval()
    assert padded.tok_emb.weight.shape[0] == 50304
    load_state_dict(padded, export_state_dict(plain))
    assert export_state_dict(padded)["out_head.weight"].shape[0] == cfg.vocab_size
    x = torch.randint(0, cfg.vocab_size, (2, 10))
    with torch.no_grad():
        # assert_close's float32 default: a wider output matmul may block the sum differently
        torch.testing.assert_close(padded(x), plain(x))


def test_load_state_dict_names_missing_and_mismatched_tensors():
    cfg = tiny_model_config()
    model = GPTModel(cfg)
    sd = export_state_dict(model)
    del sd["final_norm.scale"]
    sd["pos_emb.weight"] = torch.zeros(5, cfg.emb_dim)
    with pytest.raises(ValueError) as e:
        load_state_dict(model, sd)
    assert "final_norm.scale" in str(e.value) and "pos_emb.weight" in str(e.value)


@pytest.mark.parametrize("training", [True, False])
def test_flops_per_token_formula(training):
    """flops_per_token against PyTorch's own FLOP counter on a small model (the book's ops).

    FlopCounterMode counts 2 FLOPs per multiply-add of every matmul (mm, addmm, bmm), as the
    formula does; the full T x T attention matmuls are counted, as the formula (PaLM) does not
    subtract the causal mask; backward is two matmuls per forward matmul. Embedding lookups,
    norms, softmax and the loss are not matmuls, in both. So the two integer counts agree
    exactly (fused attention is not used here: FlopCounterMode counts only the causal half of
    scaled_dot_product_attention, which the formula deliberately does not).
    """
    from torch.utils.flop_counter import FlopCounterMode

    cfg = ModelConfig(vocab_size=1000, context_length=32, emb_dim=64, n_heads=4, n_layers=2, qkv_bias=True, impl="book")
    model = GPTModel(cfg).train(training)
    x = torch.randint(0, cfg.vocab_size, (3, cfg.context_length))
    with FlopCounterMode(display=False) as counter:
        with torch.set_grad_enabled(training):
            loss = cross_entropy(model(x), x)
            if training:
                loss.backward()
    assert counter.get_total_flops() == x.numel() * flops_per_token(cfg, training=training)


def test_fused_cpu_dropout_has_the_same_distribution_and_gradient():
    from gptcli.model import Dropout

    torch.manual_seed(0)
    drop = Dropout(0.1, fused=True).train()
    x = torch.ones(200_000, requires_grad=True)
    y = drop(x)
    kept = (y != 0).float().mean().item()
    assert abs(kept - 0.9) < 0.005  # p = 0.1 of the values are zeroed
    assert torch.equal(y[y != 0], torch.full_like(y[y != 0], 1 / (1 - 6554 / 65536)))  # scaled by 1/(1-p on the grid)
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())  # d(sum)/dx is the same mask and scale
    assert torch.equal(drop.eval()(x), x)  # identity in eval mode
    assert not torch.equal(Dropout(0.1, fused=True).train()(x), y)  # a fresh mask each call


def test_fused_cpu_dropout_rounds_p_to_1_over_65536_and_falls_back_off_the_grid():
    from gptcli.model import dropout_on_grid

    assert dropout_on_grid(0.1) == 6554 / 65536  # 0.10000610
    assert dropout_on_grid(0.5) == 0.5 and dropout_on_grid(0.25) == 0.25  # multiples of 1/65536 stay exact
    assert dropout_on_grid(1e-6) is None and dropout_on_grid(1 - 1e-6) is None  # would round to 0 or 1


@pytest.mark.parametrize("p", [0.1, 0.5, 0.013, 1e-6])
def test_fused_cpu_dropout_drops_p_of_every_lane_of_its_draws(p):
    """Each 64-bit draw gives four 16-bit values: every one of the four lanes drops at p (a lane
    left unused or reused would show here), and a p off the grid takes the float32 draws."""
    from gptcli.model import Dropout, dropout_on_grid

    torch.manual_seed(1)
    n = 4_000_000
    dropped = Dropout(p, fused=True).train()(torch.ones(n)) == 0
    expected = dropout_on_grid(p) or p
    sigma = (expected * (1 - expected) / (n // 4)) ** 0.5
    for lane in range(4):
        assert abs(dropped[lane::4].float().mean().item() - expected) < 5 * sigma + 1e-7, lane
    both = (dropped[0::4] & dropped[1::4]).float().mean().item()  # neighbouring lanes independent
    assert abs(both - expected**2) < 5 * (expected**2 * (1 - expected**2) / (n // 4)) ** 0.5 + 1e-7


@pytest.mark.parametrize("head_dim", [64, 48])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_fused_cpu_training_attention_gives_the_books_numbers_with_the_same_masks(head_dim, precision):
    """Training on the CPU with dropout, the fused model computes the book's attention (scores,
    causal mask, softmax, dropout) in fewer passes: the scale on the queries, the mask filled
    outside autograd, the dropout mask multiplied as floats. With the same dropout draws it gives
    the book's output and gradients: bit for bit at GPT-2's head size 64 (the scale 1/8 is a
    power of two), to rounding at 48; a wrong scale, mask or mask product would show."""
    from gptcli.model import _CpuDropout, MultiHeadAttention

    cfg = ModelConfig(vocab_size=100, context_length=24, emb_dim=2 * head_dim, n_heads=2, n_layers=1,
                      drop_rate=0.2, qkv_bias=True, impl="fused")
    torch.manual_seed(0)
    att = MultiHeadAttention(cfg, 0).train()
    results = []
    for path in (att._fused_attention, att._book_attention):
        torch.manual_seed(1)  # the same dropout draws on both paths
        q, k, v = (torch.randn(3, 2, 20, head_dim, requires_grad=True) for _ in range(3))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            out = path(q, k, v)
        (out.float() * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        results.append([out.detach(), q.grad, k.grad, v.grad])
    for fused, book in zip(*results):
        if head_dim == 64:
            assert torch.equal(fused, book)
        else:  # the scores rounded before or after the scale: an ulp of the largest value, a few after the softmax
            ulp = 2**-8 if precision == "bf16" else 2**-23
            assert (fused - book).abs().max() <= 8 * ulp * book.abs().max(), (fused - book).abs().max() / book.abs().max()
    keep = torch.rand(5, 7) > 0.3
    y = torch.randn(5, 7, dtype=torch.bfloat16)
    assert torch.equal(_CpuDropout.masked(y, keep, 1 / 0.7), y * keep * (1 / 0.7))  # the same numbers as before


def test_fused_model_compiles_to_one_graph_in_training_with_dropout():
    """The slow resume test of gpt2-124m-fast failed in CI: its fused CPU dropout's in-place draw
    broke torch.compile's graph at every dropout, and the split graphs trained to different weights
    from run to run. Under compile the graph keeps PyTorch's dropout, which inductor fuses."""
    cfg = ModelConfig(vocab_size=1000, context_length=32, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.1,
                      qkv_bias=True, impl="fused")
    model = GPTModel(cfg).train()
    explained = torch._dynamo.explain(model)(torch.randint(0, cfg.vocab_size, (2, cfg.context_length)))
    assert explained.graph_break_count == 0, [str(b.reason) for b in explained.break_reasons]
    assert explained.graph_count == 1


def test_gpt2_init_draws_each_parameter_group_at_gpt2s_std():
    """model.init: gpt2 -- normal(0, 0.02), zero biases, residual projections at 0.02/sqrt(2 L)."""
    cfg = ModelConfig(vocab_size=1000, context_length=64, emb_dim=64, n_heads=4, n_layers=4, qkv_bias=True, init="gpt2")
    torch.manual_seed(0)
    model = GPTModel(cfg)
    residual = 0.02 / (2 * cfg.n_layers) ** 0.5
    checked = set()
    for name, p in model.named_parameters():
        if name.endswith(("norm1.scale", "norm2.scale", "final_norm.scale")):
            expected = "ones"
        elif name.endswith(("shift", "bias")):
            expected = "zeros"
        else:
            expected = residual if name.endswith(("att.out_proj.weight", "ff.layers.2.weight")) else 0.02
        checked.add(expected if isinstance(expected, str) else round(expected, 5))
        if expected == "ones":
            assert torch.equal(p, torch.ones_like(p)), name
        elif expected == "zeros":
            assert torch.equal(p, torch.zeros_like(p)), name
        else:
            n = p.numel()  # >= 4096 draws per weight here
            # The sample std of n normal draws has relative standard error 1/sqrt(2n) <= 1.1 %:
            # 6 % is more than 5 standard errors, and far from the next candidate (2.8x apart).
            assert abs(p.std().item() / expected - 1) < 0.06, (name, p.std().item(), expected)
            # The sample mean has standard error std/sqrt(n): 5 of them.
            assert abs(p.mean().item()) < 5 * expected / n**0.5, name
    assert checked == {"ones", "zeros", 0.02, round(residual, 5)}


def test_init_defaults_to_the_books_and_refuses_unknown_schemes():
    from gptcli.config import ConfigError, config_from_dict

    assert ModelConfig().init == "book"  # the parity test above then pins what "book" means
    with pytest.raises(ConfigError, match="model.init"):
        config_from_dict({"model": {"init": "xavier"}}, "--set")

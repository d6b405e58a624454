"""Document-aware attention (issue 16 item 4): a window of documents scores as the documents alone."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask

import gptcli.documents
import gptcli.model
from gptcli.config import load_config
from gptcli.documents import DocumentMasked, document_inputs, document_starts
from gptcli.model import GPTModel
from gptcli.shards import ShardTokens, prepare, read_index
from gptcli.tokenizer import END_OF_TEXT_ID, encode
from gptcli.train import train

from conftest import CONFIGS
from test_shards import _one_line_error

A = "Every effort moves you forward, said Gisburn."
B = "The picture was the last thing he painted before he married."


def _model(impl: str) -> GPTModel:
    cfg = load_config(CONFIGS / "tiny.yaml", {"model.impl": impl, "model.drop_rate": 0.0}).model
    torch.manual_seed(0)
    return GPTModel(cfg).eval()


@pytest.mark.parametrize("impl", ["book", "fused"])
def test_a_window_holding_documents_a_and_b_scores_as_a_and_b_evaluated_separately(impl):
    """issue 16 acceptance: equal to 1e-5, both model implementations (SDPA with an explicit mask)."""
    model = _model(impl)
    a = encode(A) + [END_OF_TEXT_ID]  # a document as prepare writes it
    b = encode(B) + [END_OF_TEXT_ID]
    window = torch.tensor([a + b])  # (1, T), T <= context_length 32
    assert window.shape[1] <= model.cfg.context_length
    inputs, targets = window[:, :-1], window[:, 1:]
    with torch.no_grad():
        together = DocumentMasked(model, END_OF_TEXT_ID, reset_positions=True)(inputs)
        alone = torch.cat([model(torch.tensor([a])), model(torch.tensor([b[:-1]]))], dim=1)
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=0)  # float32 rounding of a reordered softmax only
    loss_together = F.cross_entropy(together[0], targets[0])
    loss_alone = F.cross_entropy(alone[0], targets[0])
    assert abs(loss_together.item() - loss_alone.item()) < 1e-5  # the acceptance bound
    with torch.no_grad():  # without the mask B would see A: the test can tell the difference
        assert (model(inputs) - alone).abs().max() > 1e-3


def _spy_flex(monkeypatch) -> list[bool]:
    """Grad mode of every flex_attention call the model makes (compiled: replayed on each call of the graph)."""
    calls, real = [], gptcli.model.flex_attention

    def spy(*args, **kwargs):
        calls.append(torch.is_grad_enabled())
        return real(*args, **kwargs)

    monkeypatch.setattr(gptcli.model, "flex_attention", spy)
    return calls


def _two_documents() -> tuple[list[int], list[int], torch.Tensor]:
    a = encode(A) + [END_OF_TEXT_ID]  # a document as prepare writes it
    b = encode(B) + [END_OF_TEXT_ID]
    return a, b, torch.tensor([a + b])[:, :-1]  # (1, T) inputs, T <= context_length 32


def test_the_model_takes_a_block_mask_to_flex_attention(monkeypatch):
    """The dispatch on the mask's type, eager (forward only: CPU flex_attention has no backward)."""
    model = _model("fused")
    calls = _spy_flex(monkeypatch)
    _, _, inputs = _two_documents()
    positions, mask = document_inputs(inputs, END_OF_TEXT_ID, reset_positions=True)
    assert isinstance(mask, torch.Tensor)  # eager: the explicit mask
    with monkeypatch.context() as m, torch.no_grad():
        m.setattr(gptcli.documents, "is_compiling", lambda: True)  # what document_inputs builds inside torch.compile
        block_mask = document_inputs(inputs, END_OF_TEXT_ID, reset_positions=True)[1]
    with torch.no_grad(), pytest.warns(UserWarning, match="without torch.compile"):
        flex = model(inputs, positions, block_mask)
        sdpa = model(inputs, positions, mask)
        model.train()  # no dropout: training mode only turns on the checkpointing, which passes the BlockMask on
        model.activation_checkpointing = True
        checkpointed = model(inputs, positions, block_mask)
    assert calls == [False] * 2 * model.cfg.n_layers
    torch.testing.assert_close(flex, sdpa, atol=1e-5, rtol=0)  # the same softmax, summed in another order (float32)
    assert torch.equal(checkpointed, flex)


def test_the_mask_is_a_block_mask_only_where_flex_attention_compiles(monkeypatch):
    """Compiled, and no CPU backward, and no attention dropout: else the explicit mask (the rule, without compiling)."""
    _, _, inputs = _two_documents()

    def mask(compiling: bool, grad: bool, dropout: bool):
        # documents' own name: a stand-in for torch.compiler.is_compiling that create_block_mask sees is
        # remembered by dynamo, and every later torch.compile in the process would read False
        monkeypatch.setattr(gptcli.documents, "is_compiling", lambda: compiling)
        with torch.set_grad_enabled(grad):
            return document_inputs(inputs, END_OF_TEXT_ID, True, attention_dropout=dropout)[1]

    assert isinstance(mask(compiling=True, grad=False, dropout=False), BlockMask)
    assert isinstance(mask(compiling=False, grad=False, dropout=False), torch.Tensor)  # eager flex is a slow reference
    assert isinstance(mask(compiling=True, grad=True, dropout=False), torch.Tensor)  # no CPU backward in torch 2.13
    assert isinstance(mask(compiling=True, grad=False, dropout=True), torch.Tensor)  # flex has no dropout


@pytest.mark.slow
def test_compiled_evaluation_on_the_cpu_takes_flex_attention_and_scores_a_and_b_as_alone(monkeypatch):
    """issue 16 acceptance with flex_attention: compiled, no gradient (45 s of compiling on 2 cores)."""
    model = _model("fused")
    calls = _spy_flex(monkeypatch)
    a, b, inputs = _two_documents()
    targets = torch.tensor([a + b])[:, 1:]
    with torch.no_grad():
        flex = torch.compile(DocumentMasked(model, END_OF_TEXT_ID, reset_positions=True))(inputs)
        assert calls == [False] * model.cfg.n_layers  # every layer through flex_attention
        sdpa = DocumentMasked(model, END_OF_TEXT_ID, reset_positions=True)(inputs)  # eager: the explicit mask
        alone = torch.cat([model(torch.tensor([a])), model(torch.tensor([b[:-1]]))], dim=1)
    assert len(calls) == model.cfg.n_layers  # the eager calls did not
    torch.testing.assert_close(flex, sdpa, atol=1e-5, rtol=0)  # float32 rounding of a reordered (tiled) softmax only
    torch.testing.assert_close(flex, alone, atol=1e-5, rtol=0)  # the same, against the documents' own windows
    loss_flex = F.cross_entropy(flex[0], targets[0]).item()
    assert abs(loss_flex - F.cross_entropy(alone[0], targets[0]).item()) < 1e-5  # the acceptance bound
    assert abs(loss_flex - F.cross_entropy(sdpa[0], targets[0]).item()) < 1e-5  # both attention implementations agree


def test_positions_restart_at_each_document_and_the_mask_is_block_causal():
    idx = torch.tensor([[5, 6, END_OF_TEXT_ID, 7, 8, END_OF_TEXT_ID, 9]])
    positions, mask = document_inputs(idx, END_OF_TEXT_ID, reset_positions=True)
    assert positions.tolist() == [[0, 1, 2, 0, 1, 2, 0]]
    expected = torch.zeros(7, 7, dtype=torch.bool)
    for lo, hi in ((0, 3), (3, 6), (6, 7)):
        expected[lo:hi, lo:hi] = torch.ones(hi - lo, hi - lo, dtype=torch.bool).tril()
    assert torch.equal(mask[0, 0], expected)
    assert document_inputs(idx, END_OF_TEXT_ID, reset_positions=False)[0] is None


def test_window_boundaries_are_the_documents_the_shards_record(tmp_path):
    docs = [f"document {i} " + "word " * (i * 7 % 23) for i in range(30)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    prepare([tmp_path / "d.jsonl"], tmp_path / "out", val_ratio=0.0)
    index = read_index(tmp_path / "out")
    tokens = ShardTokens(tmp_path / "out", "train", index)
    stream = tokens[0 : len(tokens)][None]  # the whole split as one window
    found = [0] + torch.nonzero(document_starts(stream, END_OF_TEXT_ID)[0]).flatten().tolist()
    recorded = np.load(tmp_path / "out" / index["splits"]["train"]["shards"][0]["docs_file"]).tolist()
    assert found == recorded


def _prepare_short_documents(tmp_path, verdict) -> None:
    """the-verdict as 80 documents, prepared into tmp_path / "prep": shorter than a window, most windows span several."""
    text = verdict.read_text(encoding="utf-8")
    step = len(text) // 80
    (tmp_path / "v.jsonl").write_text("".join(json.dumps({"text": text[i : i + step]}) + "\n" for i in range(0, len(text), step)))
    prepare([tmp_path / "v.jsonl"], tmp_path / "prep", val_ratio=0.15)


def test_document_mask_trains_on_a_prepared_corpus(tmp_path, verdict):
    _prepare_short_documents(tmp_path, verdict)
    common = {"data.path": str(tmp_path / "prep"), "train.max_steps": 2, "train.max_new_tokens": 0}
    masked = train(load_config(CONFIGS / "tiny.yaml", {**common, "data.document_mask": True, "data.reset_positions": True}),
                   tmp_path / "masked")
    plain = train(load_config(CONFIGS / "tiny.yaml", common), tmp_path / "plain")
    assert np.isfinite(masked["train_loss"]) and masked["train_loss"] != plain["train_loss"]
    # Off (the default) the model is called as before: the book-exact tests (test_book_run, test_train) cover it.


@pytest.mark.slow
def test_compiled_training_on_the_cpu_keeps_the_explicit_mask_and_its_evaluation_takes_flex(tmp_path, verdict,
                                                                                              monkeypatch):
    """CPU flex_attention has no backward: the compiled step uses SDPA, the compiled evaluation flex_attention."""
    from gptcli.checkpoint import load_checkpoint, model_from_checkpoint
    from gptcli.data import load_splits, make_loader
    from gptcli.evaluate import evaluate_loss

    _prepare_short_documents(tmp_path, verdict)
    calls = _spy_flex(monkeypatch)
    # No dropout: flex_attention is refused for being on the CPU with a gradient, not for the dropout it lacks.
    # Activation checkpointing recomputes each block with the mask it was given.
    cfg = load_config(CONFIGS / "tiny.yaml", {"data.path": str(tmp_path / "prep"), "train.max_steps": 1,
                                              "train.max_new_tokens": 0, "data.document_mask": True,
                                              "data.reset_positions": True, "train.compile": True,
                                              "model.impl": "fused", "model.drop_rate": 0.0,
                                              "train.activation_checkpointing": True})
    summary = train(cfg, tmp_path / "run")  # a CPU flex_attention backward would raise NotImplementedError
    assert calls and not any(calls)  # flex_attention ran, only without a gradient: in the evaluation after step 1
    ckpt = load_checkpoint(tmp_path / "run")
    model = model_from_checkpoint(ckpt, "cpu")
    val = load_splits(ckpt.config.data, ckpt.config.model.context_length).val
    loader = make_loader(val, cfg.train.batch_size, shuffle=False, drop_last=False)
    sdpa = evaluate_loss(DocumentMasked(model, END_OF_TEXT_ID, True), loader, torch.device("cpu"), cfg.train.eval_iter)
    assert summary["val_loss"] == pytest.approx(sdpa["loss"], abs=1e-5)  # the same weights; attention rounding only


def test_reset_positions_without_document_mask_is_a_one_line_error(cli, tmp_path, verdict):
    _one_line_error(cli("train", "--config", CONFIGS / "tiny.yaml", "--data", verdict, "--out", tmp_path / "r",
                        "--set", "data.reset_positions=true"), "data.reset_positions", "data.document_mask")


def test_eval_loss_text_and_tasks_score_a_document_masked_model_as_it_was_trained(cli, tmp_path, verdict):
    """issue 16: eval, loss, --text and --task apply data.document_mask from the checkpoint's config, never silently not."""
    from gptcli.checkpoint import load_checkpoint, model_from_checkpoint
    from gptcli.data import load_splits, make_loader
    from gptcli.evaluate import evaluate_loss

    _prepare_short_documents(tmp_path, verdict)
    train(load_config(CONFIGS / "tiny.yaml", {"data.path": str(tmp_path / "prep"), "train.max_steps": 2,
                                              "train.max_new_tokens": 0, "data.document_mask": True,
                                              "data.reset_positions": True}), tmp_path / "run")
    ckpt = load_checkpoint(tmp_path / "run")
    model = model_from_checkpoint(ckpt, "cpu").eval()  # tiny.yaml has dropout: scores are taken in eval mode
    val = load_splits(ckpt.config.data, ckpt.config.model.context_length).val
    loader = make_loader(val, ckpt.config.train.batch_size, shuffle=False, drop_last=False)
    masked = evaluate_loss(DocumentMasked(model, END_OF_TEXT_ID, True), loader, torch.device("cpu"))["loss"]
    plain = evaluate_loss(model, loader, torch.device("cpu"))["loss"]
    assert abs(masked - plain) > 1e-4  # the test can tell the two apart
    assert not model.training  # scoring through the wrapper left the model in the mode it was in

    r = cli("eval", "--checkpoint", tmp_path / "run", "--json")
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["results"][0]["loss"] == pytest.approx(masked, abs=1e-6)  # same batches, same code
    r = cli("eval", "--checkpoint", tmp_path / "run", "--all", "--json")
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["results"][-1]["loss"] == pytest.approx(masked, abs=1e-6)
    r = cli("loss", "--checkpoint", tmp_path / "run", "--json")
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["val"]["loss"] == pytest.approx(masked, abs=1e-6)

    two = A + "<|endoftext|>" + B  # --text: B's tokens score as B alone (after its document's start)
    r = cli("eval", "--checkpoint", tmp_path / "run", "--text", two, "--json")
    assert r.exit_code == 0, r.stderr
    got = [t["prob"] for t in json.loads(r.stdout)["tokens"]]
    ids = torch.tensor([encode(two)])
    with torch.no_grad():
        probs = DocumentMasked(model, END_OF_TEXT_ID, True)(ids[:, :-1])[0].softmax(-1)
    want = probs.gather(1, ids[0, 1:, None])[:, 0].tolist()
    assert got[1:] == pytest.approx(want, abs=1e-6)

    (tmp_path / "task.jsonl").write_text(json.dumps({"context": A + "<|endoftext|>The", "choices": ["picture", "end"],
                                                     "answer": 0}) + "\n")
    r = cli("eval", "--checkpoint", tmp_path / "run", "--task", "choices", "--task-data", tmp_path / "task.jsonl",
            "--per-item", "--json")
    assert r.exit_code == 0, r.stderr
    item = json.loads(r.stdout)["tasks"]["choices"]
    ctx = encode(A + "<|endoftext|>The")
    with torch.no_grad():
        masked_lp = DocumentMasked(model, END_OF_TEXT_ID, True)(torch.tensor([ctx]))[0, -1].log_softmax(-1)
    (first,) = encode(" picture")  # the harness joins context and choice with one space
    assert item["loglikelihoods"][0][0] == pytest.approx(masked_lp[first].item(), abs=1e-5)


def test_generate_warns_when_a_document_masked_model_is_prompted_across_a_document_boundary(cli, tmp_path, verdict):
    cfg = {"data.path": str(verdict), "train.max_steps": 1, "train.max_new_tokens": 0, "data.document_mask": True}
    train(load_config(CONFIGS / "tiny.yaml", cfg), tmp_path / "run")
    r = cli("generate", "--checkpoint", tmp_path / "run", "--max-new-tokens", "2", A + "<|endoftext|>" + B)
    assert r.exit_code == 0, r.stderr
    assert "data.document_mask" in r.stderr and "<|endoftext|>" in r.stderr
    r = cli("generate", "--checkpoint", tmp_path / "run", "--max-new-tokens", "2", B)
    assert "document_mask" not in r.stderr

"""Loss over loaders and files: cross-entropy, perplexity, bits per byte, per-token views.

``evaluate_loss`` is the book's ``calc_loss_loader``: the mean cross-entropy over
the first `num_batches` batches of a loader, computed with the one loss function
that training uses, so `gptcli train`, `gptcli eval` and `gptcli loss` agree.

In a notebook::

    from pathlib import Path
    from gptcli import evaluate as ev
    from gptcli.checkpoint import load_checkpoint, model_from_checkpoint

    ckpt = load_checkpoint(Path("checkpoints/tiny"))    # a run's newest valid checkpoint
    model = model_from_checkpoint(ckpt, "cpu")
    ev.evaluate_datasets(model, ev.eval_datasets(ckpt.config, ["notes.txt"]), batch_size=4)
    ev.evaluate_run("checkpoints/tiny")["results"]      # every checkpoint, oldest first
    ev.token_report(model, "Every effort moves you")["tokens"]
"""

from __future__ import annotations

import functools
import math
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch.utils.data import DataLoader

from gptcli.checkpoint import list_step_checkpoints, load_checkpoint, model_from_checkpoint, resolve_checkpoint
from gptcli.config import Config, DataConfig
from gptcli.data import TokenWindows, WindowBatchSampler, load_splits, make_loader, not_found, read_corpus
from gptcli.documents import as_trained
from gptcli.errors import InputError, RunError
from gptcli.loss import cross_entropy
from gptcli.mixture import MixtureWindows, weighted_mean
from gptcli.model import GPTModel
from gptcli.shards import ShardTokens, is_prepared, read_index
from gptcli.tokenizer import decode, encode, get_tokenizer


@torch.no_grad()
def evaluate_loss(
    model: torch.nn.Module,
    loader: DataLoader,
    device: torch.device,
    num_batches: int | None = None,
    autocast: Callable = nullcontext,
    all_reduce: Callable[[list[float]], list[float]] | None = None,
    byte_lengths: torch.Tensor | None = None,
    split: str = "data",
) -> dict[str, float]:
    """Mean token cross-entropy of `model` over (up to) `num_batches` batches of `loader`.

    Exactly the book's ``calc_loss_loader``: the loader is iterated afresh (a
    shuffling loader draws its seed from the global RNG, which keeps book-exact
    runs exact), each batch's mean loss comes from ``cross_entropy``, and the
    result is the plain average of the batch means. That is the mean over tokens
    whenever the batches are full (always for training windows; for validation
    unless its last batch is partial, where the book's weighting is kept so that
    printed losses match the book's).

    Args:
        model: returns logits (B, T, V); put in eval mode for the call, then restored.
        loader: yields (inputs, targets) of shape (B, T).
        device: where the batches go.
        num_batches: at most this many batches; None = the whole loader.
        autocast: a context manager factory for mixed precision.
        all_reduce: sums [loss_sum, tokens, batches, bytes, nats] over processes (distributed evaluation).
        byte_lengths: (V,) UTF-8 length of each token id (see ``token_byte_lengths``); adds
            "bytes" (of the target tokens) and "bpb" (bits per byte) to the result.
        split: what the loader reads ("train", "val", a file name), for the error below.

    Returns:
        {"loss", "ppl", "tokens", "batches"} (+ "bytes", "bpb"); loss is NaN only when
        `num_batches` is 0 or the loader holds no window at all.

    Raises:
        InputError: the loader drops its last partial batch and holds fewer windows than
            one batch: the book's loop would average nothing and report NaN.
    """
    _check_full_batch(loader, split)
    limit = len(loader) if num_batches is None else min(num_batches, len(loader))
    lockstep = 0
    sampler = getattr(loader, "batch_sampler", None)
    if getattr(sampler, "mode", None) == "stride":  # a WindowBatchSampler or a MixtureBatchSampler
        # Batches go round-robin to the ranks: together they evaluate the first `num_batches`.
        total = sampler.num_batches() if num_batches is None else min(num_batches, sampler.num_batches())
        limit = len(range(sampler.rank, total, sampler.world_size))
        # FSDP gathers the weights inside every forward, a collective call: every rank
        # must run as many forwards as the busiest one, so the others repeat one unscored.
        lockstep = -(-total // sampler.world_size) if all_reduce is not None else 0
    was_training = model.training
    model.eval()
    loss_sum, nats, tokens, num_bytes = 0.0, 0.0, 0, 0
    try:
        if limit > 0:
            for i, (inputs, targets) in enumerate(loader):
                if i >= limit:
                    break
                if byte_lengths is not None:
                    num_bytes += int(byte_lengths[targets].sum())
                inputs = inputs.to(device, non_blocking=True)
                targets = targets.to(device, non_blocking=True)
                with autocast():
                    logits = model(inputs)
                batch_loss = cross_entropy(logits, targets).item()
                loss_sum += batch_loss
                nats += batch_loss * targets.numel()
                tokens += targets.numel()
        for _ in range(limit, lockstep):
            with autocast():
                model(torch.zeros((1, 1), dtype=torch.long, device=device))
    finally:
        model.train(was_training)
    batches = limit
    if all_reduce is not None:
        loss_sum, tokens, batches, num_bytes, nats = all_reduce(
            [loss_sum, float(tokens), float(batches), float(num_bytes), nats]
        )
        tokens, batches, num_bytes = int(tokens), int(batches), int(num_bytes)
    loss = loss_sum / batches if batches else float("nan")
    result = {"loss": loss, "ppl": perplexity(loss), "tokens": tokens, "batches": batches}
    if byte_lengths is not None:
        # From the summed nats, not `loss`: a partial last batch would otherwise weigh its tokens more.
        result["bytes"] = num_bytes
        result["bpb"] = bits_per_byte(nats / tokens, tokens, num_bytes) if num_bytes else float("nan")
    return result


def _check_full_batch(loader: DataLoader, split: str) -> None:
    """Refuse a loader that drops its partial last batch and so would yield no batch at all."""
    sampler = getattr(loader, "batch_sampler", None)
    if not isinstance(sampler, WindowBatchSampler) or not sampler.num_windows or sampler.num_batches():
        return
    windows = loader.dataset
    tokens = f" ({len(windows.tokens)} tokens)" if hasattr(windows, "tokens") else ""
    processes = sampler.global_batch // sampler.batch_size
    fits = max(sampler.num_windows // processes, 1)
    raise InputError(
        f"{split} split: {sampler.num_windows} window(s){tokens}, fewer than one batch of {sampler.global_batch}; "
        f"batch size {sampler.batch_size} is too large (at most {fits} fits)"
    )


def perplexity(loss: float) -> float:
    """exp(loss), saturating at inf instead of overflowing."""
    try:
        return math.exp(loss)
    except OverflowError:
        return float("inf")


def bits_per_byte(loss: float, num_tokens: int, num_bytes: int) -> float:
    """Bits per UTF-8 byte of text: comparable across tokenizers, unlike perplexity.

    The summed cross-entropy is ``loss * num_tokens`` nats; dividing by ln 2 gives
    bits, and by the bytes those tokens decode to gives bits per byte.

    Args:
        loss: mean cross-entropy per token, in nats.
        num_tokens: tokens the mean is over.
        num_bytes: UTF-8 bytes of those tokens.
    """
    return loss * num_tokens / (math.log(2) * num_bytes)


@functools.lru_cache(maxsize=1)
def token_byte_lengths() -> torch.Tensor:
    """(V,) UTF-8 byte length of every GPT-2 token id (for bits per byte)."""
    enc = get_tokenizer()
    return torch.tensor([len(enc.decode_single_token_bytes(i)) for i in range(enc.n_vocab)], dtype=torch.long)


def file_windows(path: str | Path, context_length: int) -> TokenWindows:
    """The book's windows (stride = context length) over a whole text file, JSON Lines file or
    folder of them (read as `gptcli prepare` reads them), or the validation split of a prepared folder.

    Tokens after the last full window are not scored, as in the book's loaders; a
    text shorter than one window is scored as one shorter window.

    Raises:
        InputError: the file cannot be read or has fewer than two tokens (a prepared folder: in its validation split).
    """
    if is_prepared(Path(path)):  # the split a prepared folder holds out for evaluation
        tokens = ShardTokens(Path(path), "val", read_index(Path(path)))
        if len(tokens) < 2:
            raise InputError(f"{path}: its validation split holds {len(tokens)} token(s), scoring needs at least 2; "
                             "the split was made by `gptcli prepare --val-ratio`: prepare it again with a larger one")
    else:
        tokens = torch.tensor(encode(read_corpus(Path(path))), dtype=torch.long)
    if len(tokens) < 2:
        raise InputError(f"{path}: {len(tokens)} token(s); scoring needs at least 2")
    length = min(context_length, len(tokens) - 1)
    return TokenWindows(tokens, length, length)


def eval_datasets(cfg: Config, data: Sequence[str | Path] = (), val: bool = True) -> list[tuple]:
    """(name, windows) to evaluate: the config's validation split (if `val`) and each file in `data`.

    The validation split is the one `gptcli train` and `gptcli loss` use, cut the same way. For a
    mixture (``data.path`` a list) each source's validation split is its own entry, (name, windows,
    weight): ``evaluate_datasets`` adds the overall row that weighs them as training does.

    Raises:
        InputError: a file cannot be read, or the corpus is missing (and cannot be downloaded).
    """
    ctx = cfg.model.context_length
    datasets: list[tuple] = []
    if val:
        splits = load_splits(cfg.data, ctx)
        if splits.sources:
            datasets += [(f"val ({name})", windows, weight) for name, weight, windows in splits.sources]
        else:
            datasets.append((f"val ({Path(splits.source).name})", splits.val))
    for path in data:
        if not Path(path).exists():
            raise InputError(not_found(path, "from `data`"))
    datasets += [(f"{path} (validation split)" if is_prepared(Path(path)) else str(path), file_windows(path, ctx))
                 for path in data]
    return datasets


def evaluate_datasets(
    model: GPTModel,
    datasets: Sequence[tuple],
    batch_size: int,
    num_batches: int | None = None,
    data: DataConfig | None = None,
) -> list[dict[str, Any]]:
    """Loss, perplexity, bits per byte and token counts of `model` on each dataset, in order.

    Batches are taken in order with the last partial one kept (the book's
    validation loader), so the validation row equals what `gptcli loss` reports.

    Args:
        model: a GPTModel (its device is used).
        datasets: from ``eval_datasets``.
        batch_size: windows per batch.
        num_batches: at most this many batches per dataset; None = all.
        data: the model's data config: with ``document_mask`` the windows are scored within
            documents, as the model was trained (``documents.as_trained``).

    Returns:
        One dict per dataset: {"dataset", "loss", "ppl", "bpb", "tokens", "bytes", "batches"}; after a
        mixture's sources, their overall row "val (mixture, weighted)" (loss weighed by the source
        weights, as training's val_loss; bits per byte None: a weighted mean of per-byte rates is not one).
    """
    device = model.tok_emb.weight.device
    scorer = as_trained(model, data)
    rows, weights = [], []
    for name, windows, *weight in datasets:
        loader = make_loader(windows, batch_size, shuffle=False, drop_last=False)
        result = evaluate_loss(scorer, loader, device, num_batches, byte_lengths=token_byte_lengths())
        rows.append({"dataset": name, **result})
        weights.append(weight[0] if weight else None)
    sources = [(row, w) for row, w in zip(rows, weights) if w is not None]
    if sources:  # a mixture's overall validation loss: its sources' weighed as the mixture weighs them
        loss = weighted_mean([row["loss"] for row, _ in sources], [w for _, w in sources])
        rows.append({"dataset": "val (mixture, weighted)", "loss": loss, "ppl": perplexity(loss), "bpb": None,
                     "tokens": sum(row["tokens"] for row, _ in sources),
                     "batches": sum(row["batches"] for row, _ in sources)})
    return rows


def split_losses(
    model: GPTModel,
    splits,
    batch_size: int,
    num_batches: int | None = None,
    data: DataConfig | None = None,
) -> dict[str, dict[str, float]]:
    """The book's ``calc_loss_loader`` on the training and validation splits (what `gptcli loss` reports).

    The book's loaders: training drops its last partial batch, validation keeps it. Batches are
    taken in order, so `num_batches` picks the same batches every time.

    Args:
        model: a GPTModel (its device is used).
        splits: ``data.load_splits``'s result for the model's config.
        batch_size: windows per batch.
        num_batches: at most this many batches per split; None = all.
        data: the model's data config (``document_mask``: scored within documents).

    Returns:
        {"train": {...}, "val": {...}}, each as ``evaluate_loss`` returns it; for a mixture
        (``data.path`` a list) these weigh the sources' losses as training does, and "by_source"
        holds each source's {"train", "val"}.
    """
    device = model.tok_emb.weight.device
    scorer = as_trained(model, data)

    def score(name, windows, drop_last):
        return evaluate_loss(scorer, make_loader(windows, batch_size, shuffle=False, drop_last=drop_last), device,
                             num_batches, split=name)

    splits_ = (("train", splits.train, True), ("val", splits.val, False))
    if not isinstance(splits.train, MixtureWindows):
        return {name: score(name, windows, drop_last) for name, windows, drop_last in splits_}
    # A mixture: in order, its windows are source after source (the first batches one source's
    # alone), so each source is scored on its own and the row weighs them as training does.
    rows: dict[str, Any] = {"by_source": {}}
    for name, windows, drop_last in splits_:
        per = [score(name, part, drop_last) for part in windows.parts]
        loss = weighted_mean([r["loss"] for r in per], windows.weights)
        rows[name] = {"loss": loss, "ppl": perplexity(loss), "tokens": sum(r["tokens"] for r in per),
                      "batches": sum(r["batches"] for r in per)}
        for source, r in zip(windows.names, per):
            rows["by_source"].setdefault(source, {})[name] = r
    return rows


def evaluate_run(
    run: str | Path,
    data: Sequence[str | Path] = (),
    val: bool = True,
    num_batches: int | None = None,
    batch_size: int | None = None,
    device: str | None = None,
) -> dict[str, Any]:
    """Evaluate every step checkpoint of a run directory, oldest first (validation loss against step).

    A damaged or incomplete checkpoint is skipped and listed with its reason, as
    resuming would skip it. `run` may also be one checkpoint directory.

    Args:
        run: a run directory (holding step-NNNNNN/) or a checkpoint directory.
        data, val: what to evaluate on (see ``eval_datasets``).
        num_batches: at most this many batches per dataset.
        batch_size: windows per batch (default: each checkpoint's train.batch_size).
        device: where to run (default: each checkpoint's train.device).

    Returns:
        {"run", "results": rows as ``evaluate_datasets`` plus "checkpoint" and "step",
        "skipped": ["reason", ...]}.

    Raises:
        RunError: `run` does not exist or holds no complete checkpoint.
    """
    run = Path(run)
    paths = list_step_checkpoints(run)
    if not paths:
        paths = [resolve_checkpoint(run)[0]]
    rows, skipped, cache = [], [], {}
    for path in paths:
        try:
            ckpt = load_checkpoint(path)
            model = model_from_checkpoint(ckpt, device)
        except RunError as e:
            skipped.append(str(e))
            continue
        cfg = ckpt.config
        key = (repr(cfg.data), cfg.model.context_length)  # checkpoints of one run share their data
        if key not in cache:
            cache[key] = eval_datasets(cfg, data, val)
        for row in evaluate_datasets(model, cache[key], batch_size or cfg.train.batch_size, num_batches, cfg.data):
            rows.append({"checkpoint": path.name, "step": ckpt.manifest.get("step"), **row})
    if not rows:
        reason = f" ({skipped[-1]})" if skipped else ""
        raise RunError(f"{run}: no complete checkpoint to evaluate{reason}")
    return {"run": str(run), "results": rows, "skipped": skipped}


@torch.no_grad()
def token_report(model: GPTModel, text: str, top: int = 5, data: DataConfig | None = None) -> dict[str, Any]:
    """Per-token view of `text`: for each token, the probability the model gave it, its rank and the top alternatives.

    The chapter-5 table of target probabilities, for any text. The first token is
    context only; text longer than the context is scored in consecutive windows
    of context_length tokens (like the loss windows).

    Args:
        model: a GPTModel (its device is used; evaluated in eval mode).
        text: the text to score; needs at least two tokens.
        top: alternatives listed per position.
        data: the model's data config (``document_mask``: text after an <|endoftext|> does not see what precedes it).

    Returns:
        {"text", "tokens": [{"pos", "id", "token", "prob", "rank", "top": [{"id", "token", "prob"}]}],
        "loss", "ppl", "bpb", "bytes", "tokens_predicted"}; the first token has prob/rank None.

    Raises:
        InputError: the text has fewer than two tokens (nothing to predict).
    """
    ids = encode(text)
    if len(ids) < 2:
        raise InputError("text: needs at least two tokens (the first one is only context)", param="text")
    ctx = model.cfg.context_length
    device = model.tok_emb.weight.device
    was_training = model.training
    model.eval()
    scorer = as_trained(model, data)
    tokens = [{"pos": 0, "id": ids[0], "token": decode([ids[0]]), "prob": None, "rank": None, "top": []}]
    nats = 0.0
    try:
        for start in range(0, len(ids) - 1, ctx):
            chunk = torch.tensor(ids[start : start + ctx + 1], device=device)
            logprobs = torch.log_softmax(scorer(chunk[None, :-1])[0].float(), dim=-1)  # (T, V)
            targets = chunk[1:]
            target_lp = logprobs.gather(1, targets[:, None])  # (T, 1)
            ranks = (logprobs > target_lp).sum(dim=1) + 1  # (T,)
            top_lp, top_ids = logprobs.topk(min(top, logprobs.shape[-1]), dim=-1)  # (T, top)
            nats -= float(target_lp.sum())
            rows = zip(targets.tolist(), target_lp[:, 0].exp().tolist(), ranks.tolist(),
                       top_ids.tolist(), top_lp.exp().tolist())
            for i, (target, prob, rank, alt_ids, alt_probs) in enumerate(rows):
                tokens.append({
                    "pos": start + i + 1, "id": target, "token": decode([target]), "prob": prob, "rank": rank,
                    "top": [{"id": j, "token": decode([j]), "prob": p} for j, p in zip(alt_ids, alt_probs)],
                })
    finally:
        model.train(was_training)
    predicted = len(ids) - 1
    num_bytes = int(token_byte_lengths()[torch.tensor(ids[1:])].sum())
    loss = nats / predicted
    return {"text": text, "tokens": tokens, "loss": loss, "ppl": perplexity(loss),
            "bpb": bits_per_byte(loss, predicted, num_bytes), "bytes": num_bytes, "tokens_predicted": predicted}

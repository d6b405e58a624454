"""Multiple-choice tasks: formats, parsing, scoring exactly as lm-evaluation-harness does.

A task is a list of items (context, choices, answer). Each choice is scored
completion-style: the summed log-probability of its tokens given the context.
``acc`` takes the choice with the highest sum; ``acc_norm`` the highest sum
divided by the choice's length in characters. That is the harness's rule
(lm_eval/api/task.py, ``process_results`` for ``multiple_choice``:
``lls / completion_len`` with ``completion_len = len(choice)`` of the str, without
the target delimiter); its byte-normalised variant is a separate metric
(``acc_bytes``). For HellaSwag's ASCII text characters and bytes are the same.

Tokenisation follows the harness's ``TemplateLM``: the continuation is
``" " + choice`` (the default ``target_delimiter``); trailing spaces of the
context move to the continuation; the context is encoded alone and the pair is
encoded whole, the continuation being the whole's tokens after the context's;
an empty context is replaced by <|endoftext|>; inputs longer than the context
window keep their last ``context_length + 1`` tokens (``_loglikelihood_tokens``).

Scoring runs one forward pass per batch of (context + choice) rows, all choices of
many items at once, sorted by length and right-padded (causal attention: padding
after a row cannot change it). We chose this over a KV cache of the shared
context: a forward pass over a 4-row batch costs what one over the context plus
four cached endings does on a GPU, while the cache needs per-item bookkeeping
and cannot batch items of different context lengths; on the CPU the padding
waste stays small once rows are sorted by length.

Standard errors are the harness's ``mean_stderr``: the sample standard deviation
of the per-item 0/1 scores over sqrt(n).
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

from gptcli.errors import InputError

# name -> what it reads
TASKS = {
    "hellaswag": "HellaSwag (official JSON Lines: activity_label, ctx_a, ctx_b, endings, label)",
    "choices": "your own multiple-choice JSON Lines: {\"context\": str, \"choices\": [str, ...], \"answer\": int}",
}
# Where `gptcli download hellaswag` puts the validation file, and where --task hellaswag looks by default.
HELLASWAG_DIR = Path("data") / "hellaswag"
# The official file at a pinned commit of rowanz/hellaswag (the commit that last changed it). Its git blob
# id (the sha1 git computes over "blob <size>\0" + the bytes) is the repository's own record of the content.
HELLASWAG_VAL = {
    "filename": "hellaswag_val.jsonl",
    "url": "https://raw.githubusercontent.com/rowanz/hellaswag/6774d74db0a963013d28bd9323c32de8dd506038/data/hellaswag_val.jsonl",
    "git_blob_sha1": "0f5ee25d72216f12317d5d8a7b92deafa423d81e",
    "items": 10042,
}
TARGET_DELIMITER = " "  # the harness's default between context and choice


@dataclass(frozen=True)
class Item:
    context: str
    choices: tuple[str, ...]
    answer: int


@dataclass(frozen=True)
class Task:
    name: str
    path: Path
    items: tuple[Item, ...]


def default_data(name: str) -> Optional[Path]:
    return HELLASWAG_DIR / HELLASWAG_VAL["filename"] if name == "hellaswag" else None


def load_task(name: str, data: Optional[Path] = None, limit: Optional[int] = None, *, what: str = "--task",
              data_what: str = "--task-data", limit_what: str = "--limit") -> Task:
    """Read a task's items (the first `limit` of them).

    Args:
        name: a key of TASKS.
        data: its JSON Lines file; default: HellaSwag's downloaded validation file.
        limit: keep the first `limit` items.
        what, data_what, limit_what: how errors name the name, file and limit (a flag or a config key).

    Raises:
        InputError: an unknown name (listing the known ones), a missing or empty file, a
            malformed line (naming its number), an answer out of range, a limit below 1.
    """
    if name not in TASKS:
        raise InputError(f"{what} {name}: unknown task; known: {', '.join(TASKS)}")
    if limit is not None and limit < 1:
        raise InputError(f"{limit_what} {limit}: must be at least 1")
    path = data if data is not None else default_data(name)
    if path is None:
        raise InputError(f"{what} {name}: needs {data_what} FILE (JSON Lines: context, choices, answer)")
    if not Path(path).is_file():
        hint = "; `gptcli download hellaswag` fetches it" if name == "hellaswag" and data is None else ""
        what_it_is = "a folder, not a JSON Lines file" if Path(path).is_dir() else "no such file"
        raise InputError(f"{data_what} {path}: {what_it_is}{hint}")
    parse = parse_hellaswag if name == "hellaswag" else parse_choices
    items = parse(Path(path), limit, data_what)
    if not items:
        raise InputError(f"{data_what} {path}: no items (an empty task file)")
    return Task(name, Path(path), tuple(items))


def preprocess_hellaswag(text: str) -> str:
    """The harness's hellaswag preprocess (lm_eval/tasks/hellaswag/utils.py): WikiHow's [title] and [brackets]."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    text = text.replace("  ", " ")
    return text


def parse_hellaswag(path: Path, limit: Optional[int] = None, what: str = "--task-data") -> list[Item]:
    """Items of the official HellaSwag JSON Lines, as the harness builds them (query, choices, gold)."""

    def item(obj: dict[str, Any], where: str) -> Item:
        _need(obj, {"activity_label": str, "ctx_a": str, "ctx_b": str, "endings": list, "label": (int, str)}, where)
        ctx = obj["ctx_a"] + " " + obj["ctx_b"].capitalize()
        choices = _strings(obj["endings"], "endings", where)
        return Item(preprocess_hellaswag(obj["activity_label"] + ": " + ctx),
                    tuple(preprocess_hellaswag(e) for e in choices), _answer(obj["label"], len(choices), "label", where))

    return _read_jsonl(path, limit, what, item)


def parse_choices(path: Path, limit: Optional[int] = None, what: str = "--task-data") -> list[Item]:
    """Items of the generic format: {"context": str, "choices": [str, ...], "answer": index}."""

    def item(obj: dict[str, Any], where: str) -> Item:
        _need(obj, {"context": str, "choices": list, "answer": int}, where)
        choices = _strings(obj["choices"], "choices", where)
        return Item(obj["context"], tuple(choices), _answer(obj["answer"], len(choices), "answer", where))

    return _read_jsonl(path, limit, what, item)


def _read_jsonl(path: Path, limit, what: str, item: Callable[[dict, str], Item]) -> list[Item]:
    items: list[Item] = []
    try:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if limit is not None and len(items) >= limit:
                    break
                if not line.strip():
                    continue
                where = f"{what} {path}: line {number}"
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise InputError(f"{where}: not JSON ({e.msg})") from None
                except RecursionError:
                    raise InputError(f"{where}: not a task item (JSON nested too deeply)") from None
                if not isinstance(obj, dict):
                    raise InputError(f"{where}: expected a JSON object")
                items.append(item(obj, where))
    except UnicodeDecodeError:
        raise InputError(f"{what} {path}: not UTF-8 text") from None
    except OSError as e:
        raise InputError(f"{what} {path}: cannot read ({e.strerror or e})") from None
    return items


def _need(obj: dict[str, Any], fields: dict[str, Any], where: str) -> None:
    for key, kind in fields.items():
        if key not in obj:
            raise InputError(f"{where}: missing field {key!r} (fields: {', '.join(fields)})")
        if not isinstance(obj[key], kind) or isinstance(obj[key], bool):
            raise InputError(f"{where}: field {key!r} has the wrong type ({type(obj[key]).__name__})")


def _strings(values: list, key: str, where: str) -> list[str]:
    if len(values) < 2 or not all(isinstance(v, str) for v in values):
        raise InputError(f"{where}: {key!r} must be a list of at least 2 strings")
    return values


def _answer(value: Any, n: int, key: str, where: str) -> int:
    try:
        index = int(value)
    except ValueError:
        raise InputError(f"{where}: {key!r} {value!r} is not an index") from None
    if not 0 <= index < n:
        raise InputError(f"{where}: {key!r} {index} is out of range (0..{n - 1} for {n} choices)")
    return index


# ---------------------------------------------------------------- scoring


def encode_pair(context: str, continuation: str, encode: Callable[[str], list[int]], prefix_id: int
                ) -> tuple[list[int], list[int]]:
    """(context tokens, continuation tokens) as lm-evaluation-harness's TemplateLM makes them."""
    if context == "":
        cont = encode(continuation)
        return ([prefix_id], cont) if cont[:1] != [prefix_id] else (cont[:1], cont[1:])
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = encode(context + continuation)
    ctx = encode(context)
    return ctx, whole[len(ctx):]


def score_tokens(model, pairs: Sequence[tuple[list[int], list[int]]], device=None, *, autocast=None,
                 batch_tokens: int = 2048) -> list[tuple[float, bool]]:
    """(summed log-probability of the continuation, whether greedy decoding gives it) per (context, continuation).

    Rows longer than the model's context keep their last context_length + 1 tokens, as the
    harness does. Runs in eval mode without gradients and draws no random numbers; the
    model's train/eval mode is restored.

    Args:
        model: a GPTModel (or a DDP/FSDP/compiled wrapper of one).
        pairs: token ids of each context and continuation (continuation non-empty).
        device: where to put the inputs (default: the model's).
        autocast: a context-manager factory (train._autocast's), or None.
        batch_tokens: padded tokens per forward pass (memory: logits of the scored positions only).
    """
    import torch

    from gptcli.model import unwrap

    model = getattr(model, "_orig_mod", model)  # torch.compile'd: the eager module (no recompiles per row length)
    base = unwrap(model)
    window = base.cfg.context_length
    device = device if device is not None else next(base.parameters()).device
    # Rows whose inputs are the same token ids (choices of one token after a shared context: the input
    # is the context alone) share one forward pass; each reads its own targets off the same logits.
    groups: dict[tuple[int, ...], list[tuple[int, list[int]]]] = {}
    for i, (ctx, cont) in enumerate(pairs):
        if not cont:
            raise InputError(f"request {i}: an empty continuation scores nothing")
        inp = (ctx + cont)[-(window + 1):][:-1]
        groups.setdefault(tuple(inp), []).append((i, cont[-len(inp):] if len(cont) > len(inp) else cont))
    # longest first, as the harness's Collator: similar lengths batch together
    rows = sorted(groups.items(), key=lambda g: -len(g[0]))
    out: list[tuple[float, bool]] = [(0.0, False)] * len(pairs)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            start = 0
            while start < len(rows):
                width = len(rows[start][0])
                n = max(1, min(len(rows) - start, batch_tokens // max(width, 1)))
                batch = rows[start:start + n]
                spans = [max(len(cont) for _, cont in members) for _, members in batch]  # positions each row needs
                k = max(spans)
                x = torch.zeros((n, width), dtype=torch.long)
                at = torch.zeros((n, k), dtype=torch.long)  # the positions that predict the continuations' tokens
                for j, (inp, _) in enumerate(batch):
                    x[j, :len(inp)] = torch.tensor(inp)
                    at[j, :spans[j]] = torch.arange(len(inp) - spans[j], len(inp))
                with (autocast() if autocast is not None else contextlib.nullcontext()):
                    # logits at the continuation's positions only: the C x V head is most of a small model's cost
                    logits = model(x.to(device), select=at.to(device))  # (n, k, V)
                logp = logits.float().log_softmax(-1)
                for j, (_, members) in enumerate(batch):
                    for i, cont in members:  # a continuation of L tokens: the row's last L selected positions
                        rows_logp = logp[j, spans[j] - len(cont):spans[j]]  # (L, V)
                        target = torch.tensor(cont, device=logp.device)
                        picked = rows_logp.gather(-1, target[:, None])[:, 0]
                        out[i] = (picked.sum().item(), bool((rows_logp.argmax(-1) == target).all()))
                start += n
    finally:
        model.train(was_training)
    return out


def item_requests(items: Iterable[Item]) -> list[tuple[str, str]]:
    """(context, continuation) per choice of each item, in order: the harness's multiple_choice requests."""
    return [(it.context, TARGET_DELIMITER + c) for it in items for c in it.choices]


def score_items(model, items: Sequence[Item], device=None, *, autocast=None, batch_tokens: int = 2048
                ) -> list[list[float]]:
    """Per item, the summed log-probability of each choice (completion-style)."""
    from gptcli.tokenizer import END_OF_TEXT_ID, encode

    pairs = [encode_pair(c, x, encode, END_OF_TEXT_ID) for c, x in item_requests(items)]
    lls = score_tokens(model, pairs, device, autocast=autocast, batch_tokens=batch_tokens)
    out, k = [], 0
    for it in items:
        out.append([ll for ll, _ in lls[k:k + len(it.choices)]])
        k += len(it.choices)
    return out


def accuracy(items: Sequence[Item], lls: Sequence[Sequence[float]]) -> dict[str, Any]:
    """items, acc, acc_norm and their standard errors (the harness's mean_stderr)."""
    acc, acc_norm = [], []
    for it, ll in zip(items, lls):
        acc.append(float(_argmax(ll) == it.answer))
        acc_norm.append(float(_argmax([v / len(c) if len(c) else v for v, c in zip(ll, it.choices)]) == it.answer))
    return {"items": len(acc), "acc": _mean(acc), "acc_stderr": mean_stderr(acc),
            "acc_norm": _mean(acc_norm), "acc_norm_stderr": mean_stderr(acc_norm)}


def mean_stderr(values: Sequence[float]) -> Optional[float]:
    """Sample standard deviation / sqrt(n) (lm_eval.api.metrics.mean_stderr); None below 2 items."""
    n = len(values)
    if n < 2:
        return None
    mu = sum(values) / n
    return math.sqrt(sum((v - mu) ** 2 for v in values) / (n - 1)) / math.sqrt(n)


def evaluate_tasks(model, tasks: Sequence[Task], device=None, *, autocast=None, batch_tokens: int = 2048
                   ) -> dict[str, dict[str, Any]]:
    """{task name: {"items", "acc", "acc_norm", "acc_stderr", "acc_norm_stderr"}} for each task.

    Eval mode, no gradients, no random numbers drawn: a training run's trajectory is the
    same with and without it. Every process of a distributed run calls it (the model's
    forward may be sharded); each gets the same numbers.
    """
    results = {}
    for task in tasks:
        lls = score_items(model, task.items, device, autocast=autocast, batch_tokens=batch_tokens)
        results[task.name] = accuracy(task.items, lls)
    return results


def evaluate_task(model, task: Task, device=None, *, per_item: bool = False, batch_tokens: int = 2048
                  ) -> dict[str, Any]:
    """`gptcli eval --task`: one task's metrics, its data file, GPT-2's matching baselines
    ({size: figures}, measured on the whole official set), and with `per_item` each choice's log-likelihood."""
    lls = score_items(model, task.items, device, batch_tokens=batch_tokens)
    result: dict[str, Any] = {**accuracy(task.items, lls), "data": str(task.path), "baseline": task_baselines(task.name)}
    if per_item:
        result["loglikelihoods"] = lls
    return result


def tasks_due(t, step: int, last: bool) -> bool:
    """Whether the evaluation at `step` scores train.eval_tasks: each one, or every train.eval_tasks_every
    steps (evaluations fall at steps 1, 1 + eval_freq, ...; the last step's always scores)."""
    if not t.eval_tasks:
        return False
    return t.eval_tasks_every is None or last or (step - 1) % t.eval_tasks_every == 0


def tasks_from_config(specs: Sequence[dict[str, Any]]) -> list[Task]:
    """The tasks of train.eval_tasks (entries {name, data, limit}), read and checked once at the start."""
    tasks = []
    for i, spec in enumerate(specs):
        key = f"train.eval_tasks[{i}]"
        tasks.append(load_task(spec["name"], Path(spec["data"]) if spec.get("data") else None, spec.get("limit"),
                               what=f"{key}.name", data_what=f"{key}.data", limit_what=f"{key}.limit"))
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise InputError(f"train.eval_tasks: a task is listed twice ({', '.join(names)}); results are keyed by name")
    return tasks


def _argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))  # first of equal maxima, as np.argmax


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def download_hellaswag(folder: Optional[Path] = None, *, endpoint: Optional[str] = None, progress=None
                       ) -> dict[str, Any]:
    """Fetch HellaSwag's official validation file into `folder` (default data/hellaswag/), verified, resumable.

    Args:
        folder: where hellaswag_val.jsonl goes.
        endpoint: base URL replacing https://raw.githubusercontent.com (a mirror; tests' local server).
        progress: called with (label, bytes done, total).

    Raises:
        InputError: `folder` already holds another hellaswag_val.jsonl (it is left as it is).
        RunError: the network fails, or the file does not match the repository's git blob id (it is removed).
    """
    from gptcli import download as dl

    dest = Path(folder if folder is not None else HELLASWAG_DIR) / HELLASWAG_VAL["filename"]
    url = HELLASWAG_VAL["url"]
    if endpoint:
        dl.check_base_url(endpoint, "endpoint", "endpoint")
        url = endpoint.rstrip("/") + url[len("https://raw.githubusercontent.com"):]
    had = dest.is_file() and dl.git_blob_sha1_file(dest) == HELLASWAG_VAL["git_blob_sha1"]
    if (dest.exists() or dest.is_symlink()) and not had:  # gptcli lands only the verified file there: not ours
        raise InputError(f"{dest}: exists and is not the official {dest.name} (its git blob id differs); gptcli "
                         "never replaces a file it did not write: move it away or choose another folder")
    dl.download(url, dest, git_blob_sha1=HELLASWAG_VAL["git_blob_sha1"],
                progress=(lambda d, t: progress(dest.name, d, t)) if progress else None)
    return {"path": str(dest), "url": url, "git_blob_sha1": HELLASWAG_VAL["git_blob_sha1"], "downloaded": not had}


# ---------------------------------------------------------------- baselines

BASELINES = Path(__file__).with_name("baselines.json")


def load_baselines() -> dict[str, dict[str, Any]]:
    """OpenAI GPT-2's published figures per size (gptcli/baselines.json), each with its source."""
    data = json.loads(BASELINES.read_text(encoding="utf-8"))
    return {k: v for k, v in data.items() if not k.startswith("_")}


def task_baselines(task: str, tokenizer: str = "gpt2") -> dict[str, dict[str, Any]]:
    """{size name: figures} measured the way gptcli scores `task`, with the same tokenizer."""
    return {name: {"model": b["model"], **b["tasks"][task]} for name, b in load_baselines().items()
            if b["tokenizer"] == tokenizer and task in b["tasks"]}


def baseline(name: str) -> dict[str, Any]:
    """One size's baselines; InputError naming --baseline and the known names."""
    known = load_baselines()
    if name not in known:
        raise InputError(f"--baseline {name}: unknown; known: {', '.join(known)}")
    return known[name]

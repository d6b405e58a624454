"""gptcli checkpoints as a model type of lm-evaluation-harness (the optional `eval` extra).

How lm-eval finds models: ``lm_eval.api.registry.model_registry`` maps names to
classes; its own are registered by ``lm_eval/models/__init__.py`` and a class
joins with the ``@register_model(name)`` decorator when its module is imported.
lm-eval 0.4.x discovers no installed plugins by itself, so this module must be
imported before lm-eval resolves ``--model gptcli``. Two ways do that:

- ``python -m gptcli.harness --model gptcli --model_args checkpoint=RUN --tasks ...``:
  lm-eval's own command line (same arguments as ``lm_eval``), with gptcli registered;
- ``gptcli eval RUN --harness-task NAME [--harness-tasks-dir DIR]``: gptcli's command,
  which calls ``lm_eval.simple_evaluate`` with this model.

From Python, ``import gptcli.harness`` then ``lm_eval.simple_evaluate(model="gptcli", ...)``.

The adapter scores with the same code as ``gptcli eval --task`` (tasks.score_tokens)
and generates with gptcli's KV-cached greedy decoding (generate.generate).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from gptcli.errors import InputError, RunError, first_line

try:
    import lm_eval.models  # noqa: F401 (lm-eval fills its registry lazily only while it is empty: fill it first)
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
except ImportError:  # pragma: no cover - the extra is not installed
    raise InputError("the lm-evaluation-harness integration needs the eval extra: pip install 'gptcli[eval]'") from None

from gptcli.documents import as_trained
from gptcli.tasks import score_tokens
from gptcli.tokenizer import END_OF_TEXT_ID, decode, encode


@register_model("gptcli")
class GptcliLM(TemplateLM):
    """A gptcli checkpoint (or run directory: its newest valid step) for lm-eval.

    Args:
        checkpoint: checkpoint or run directory (model_args checkpoint=...), or
        model: an already built GPTModel (from Python).
        data: the model's data config with `model` (a checkpoint brings its own): with
            ``document_mask`` log-likelihoods are scored within documents, as it was trained.
        device: auto | cpu | cuda | cuda:N | mps.
        batch_size: padded tokens per forward pass are batch_size x context_length.
        max_gen_toks: default new tokens for generate_until.
    """

    def __init__(self, checkpoint: Optional[str] = None, model=None, device: str = "auto", batch_size: Any = 8,
                 max_gen_toks: int = 256, data=None, **kwargs):
        super().__init__()
        if (checkpoint is None) == (model is None):
            raise InputError("gptcli model: give checkpoint=PATH (model_args) or a built model")
        if model is None:
            from gptcli.resolve import build_model, resolve_model

            plan = resolve_model(Path(checkpoint), None, None, {"train.device": device}, search=False)
            model, _ = build_model(plan, None)
            data = plan.cfg.data
        self.model = model.eval()
        self.scorer = as_trained(self.model, data)  # log-likelihoods; generation decodes with self.model
        self.window = model.cfg.context_length
        self.batch_tokens = int(batch_size if str(batch_size).isdigit() else 8) * self.window
        self.max_gen_toks = int(max_gen_toks)

    @property
    def eot_token_id(self) -> int:
        return END_OF_TEXT_ID

    @property
    def max_length(self) -> int:
        return self.window

    def tok_encode(self, string: str, **kwargs) -> list[int]:
        return encode(string)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        out = score_tokens(self.scorer, [(ctx, cont) for _, ctx, cont in requests], batch_tokens=self.batch_tokens)
        for (key, _, _), result in zip(requests, out):
            self.cache_hook.add_partial("loglikelihood", key, result)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Summed log-probability of each whole text, in disjoint windows as lm-eval's HFLM scores it."""
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        results = []
        for (text,) in [r.args for r in requests]:
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                token_list=encode(text), prefix_token=self.prefix_token_id, max_seq_len=self.window, context_len=1)]
            scores = score_tokens(self.scorer, windows, batch_tokens=self.batch_tokens)
            total = sum(ll for ll, _ in scores)
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
            results.append(total)
        return results

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy continuations with the KV cache, cut at the first stop string."""
        from gptcli.generate import generate

        out = []
        for context, gen_kwargs in [r.args for r in requests]:
            kwargs = dict(gen_kwargs or {})
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.get("max_gen_toks", self.max_gen_toks))
            ids = encode(context)[-self.window:] or [END_OF_TEXT_ID]
            (new,) = generate(self.model, [ids], max_new, temperature=0.0, eos_id=END_OF_TEXT_ID, use_cache=True)
            text = decode(new)
            for stop in until:
                if stop and stop in text:
                    text = text[:text.index(stop)]
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
            out.append(text)
        return out


def run_harness(model, tasks: list[str], tasks_dir: Optional[Path] = None, limit: Optional[int] = None,
                batch_size: int = 8, data=None) -> dict[str, dict[str, Any]]:
    """lm-eval's simple_evaluate on a built gptcli model: {task: {metric: value}} (stderr keys end _stderr).

    `data`: the model's data config (``document_mask`` applies to the log-likelihoods, see GptcliLM).

    Raises:
        InputError: an unknown task name (lm-eval's own list is long: its message is shortened).
    """
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(tasks_dir) if tasks_dir is not None else None)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise InputError(f"--harness-task {', '.join(unknown)}: not an lm-eval task"
                         f"{' in ' + str(tasks_dir) if tasks_dir else ''} (lm-eval ls tasks lists them)")
    try:
        results = simple_evaluate(model=GptcliLM(model=model, batch_size=batch_size, data=data), tasks=tasks,
                                  task_manager=manager, limit=limit, log_samples=False)
    except OSError as e:  # ConnectionError, the hub's HTTP and offline errors: the task's data could not be had
        raise RunError(f"--harness-task {', '.join(tasks)}: lm-eval could not get the task's data "
                       f"({type(e).__name__}: {first_line(e)}); it downloads it from the Hugging Face hub: connect "
                       "once to cache it (HF_DATASETS_OFFLINE=1 then reads the cache)") from None
    out = {}
    for name, metrics in results["results"].items():
        out[name] = {k.replace(",none", ""): v for k, v in metrics.items() if k != "alias" and isinstance(v, (int, float))}
        out[name]["items"] = results.get("n-samples", {}).get(name, {}).get("effective")
    return out


def main() -> None:  # python -m gptcli.harness: lm-eval's command line with gptcli registered
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()

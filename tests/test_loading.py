"""The one hardened torch.load and the one key-mismatch report, as every reader sees them."""

from __future__ import annotations

import io
import os
import pickle

import pytest
import torch

from gptcli.checkpoint import load_train_state
from gptcli.errors import InputError, RunError
from gptcli.loading import SHOWN, key_mismatch, torch_load
from gptcli.model import GPTModel, load_state_dict
from gptcli.convert import from_gpt2_state_dict, load_book_state_dict, to_gpt2_state_dict


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def _corrupt_files(tmp_path):
    buf = io.BytesIO()
    torch.save({"a": torch.ones(3)}, buf)
    good = buf.getvalue()
    files = {"empty": b"", "text": b"hello world", "truncated": good[: len(good) // 2], "code": pickle.dumps(_RunsCode())}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    return [tmp_path / name for name in files]


def test_every_bad_file_gives_one_line_naming_the_file_and_the_chosen_error(tmp_path):
    for path in _corrupt_files(tmp_path):
        with pytest.raises(InputError) as e:
            load_book_state_dict(path)
        assert str(e.value).startswith(str(path)) and "\n" not in str(e.value)
        with pytest.raises(RunError) as e:
            load_train_state(path)
        assert str(e.value).startswith(str(path)) and "training state" in str(e.value)


def test_a_missing_file_is_named_as_missing(tmp_path):
    with pytest.raises(InputError, match="nope.pth: file not found"):
        torch_load(tmp_path / "nope.pth", "state_dict", InputError)


def test_code_in_a_pickle_is_refused_not_run(tmp_path, capfd):
    path = tmp_path / "evil.pth"
    path.write_bytes(pickle.dumps(_RunsCode()))
    with pytest.raises(RunError, match="refused"):
        torch_load(path, "training state")
    assert "pwned" not in capfd.readouterr().out


def test_key_mismatch_lists_both_kinds_with_the_same_truncation():
    expected = [f"w{i:02d}" for i in range(20)]
    found = expected[3:] + ["extra"]
    assert key_mismatch(expected, expected) == []
    assert key_mismatch(expected, found) == ["missing tensors: w00, w01, w02", "unexpected tensors: extra"]
    many = key_mismatch(expected, [])
    assert many == [f"missing tensors: {', '.join(expected[:SHOWN])} ... (20 in all)"]


def test_checkpoint_weights_and_gpt2_import_report_mismatches_alike(tiny_config):
    """model.load_state_dict (checkpoints, evaluate) and the GPT-2 mapping (imports) say the same."""
    model = GPTModel(tiny_config.model)
    sd = {k: v for k, v in model.state_dict().items() if k != "final_norm.scale"}
    sd["stray"] = torch.zeros(1)
    with pytest.raises(ValueError) as ours:
        load_state_dict(model, sd)
    gpt2 = to_gpt2_state_dict(model.state_dict(), tiny_config.model)
    gpt2.pop("ln_f.weight")
    gpt2["stray"] = torch.zeros(1)
    with pytest.raises(InputError) as imported:
        from_gpt2_state_dict(gpt2, tiny_config.model, "file")
    assert "missing tensors: final_norm.scale; unexpected tensors: stray" in str(ours.value)
    assert "missing tensors: ln_f.weight; unexpected tensors: stray" in str(imported.value)

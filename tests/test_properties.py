"""Property-based tests: the config loader and the data windows under random inputs."""

from __future__ import annotations

import math

import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gptcli.config import SECTIONS, Config, ConfigError, load_config
from gptcli.data import TokenWindows, WindowBatchSampler

FIELDS = sorted({f for cls in SECTIONS.values() for f in cls.__dataclass_fields__})
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-10**12, 10**12), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20), st.sampled_from(["exact", "tanh", "book", "fused", "sliding", "random", "cosine", "1e-3"]),
)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                      max_leaves=6)
sections = st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=10), values, max_size=6)
documents = st.one_of(
    st.dictionaries(st.sampled_from([*SECTIONS, "optimizer", ""]), sections | values, max_size=4),
    values,
)
SLOW_OK = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@SLOW_OK
@given(documents)
def test_random_yaml_documents_load_or_raise_config_error(tmp_path, doc):
    path = tmp_path / "random.yaml"
    path.write_text(yaml.safe_dump(doc, allow_unicode=True))
    try:
        cfg = load_config(path)
    except ConfigError as e:
        message = str(e)
        assert message.startswith(str(path)) and "\n" not in message
    else:
        assert isinstance(cfg, Config)
        assert cfg.model.emb_dim % cfg.model.n_heads == 0 and 0 <= cfg.model.drop_rate < 1


@SLOW_OK
@given(st.text(max_size=200))
def test_random_text_as_a_config_file(tmp_path, text):
    path = tmp_path / "random.yaml"
    path.write_text(text, encoding="utf-8")
    try:
        load_config(path)
    except ConfigError as e:
        assert "\n" not in str(e)


@SLOW_OK
@given(st.lists(st.text(max_size=30), max_size=4))
def test_random_set_overrides(items):
    try:
        load_config(None, sets=items)
    except ConfigError as e:
        assert "\n" not in str(e)


@settings(max_examples=400, deadline=None)
@given(n=st.integers(0, 300), max_length=st.integers(1, 40), stride=st.integers(1, 50))
def test_windows_cover_the_tokens_they_should(n, max_length, stride):
    tokens = torch.arange(n)
    windows = TokenWindows(tokens, max_length, stride)
    expected = max(0, math.ceil((n - max_length) / stride))  # the book: range(0, n - max_length, stride)
    assert len(windows) == expected
    covered = set()
    for i in range(len(windows)):
        x, y = windows[i]
        start = i * stride
        assert x.tolist() == list(range(start, start + max_length))  # full length, in place
        assert y.tolist() == list(range(start + 1, start + max_length + 1))  # the next token of each
        covered.update(y.tolist())
    if len(windows) and stride <= max_length:
        last_target = (len(windows) - 1) * stride + max_length
        assert covered == set(range(1, last_target + 1))  # no gaps between windows
        assert last_target <= n - 1 and n - 1 - last_target < stride  # at most a stride's tail unused


@settings(max_examples=300, deadline=None)
@given(num_windows=st.integers(0, 60), batch_size=st.integers(1, 7), world=st.integers(1, 4),
       shuffle=st.booleans(), drop_last=st.booleans(), seed=st.integers(0, 2**31), done=st.integers(0, 60))
def test_batches_visit_each_window_once_and_ranks_split_them(num_windows, batch_size, world, shuffle, drop_last, seed, done):
    torch.manual_seed(seed)
    single = WindowBatchSampler(num_windows, batch_size * world, shuffle, drop_last)
    batches = list(single)
    flat = [i for b in batches for i in b]
    assert len(flat) == len(set(flat))  # no window twice
    if drop_last:
        assert all(len(b) == batch_size * world for b in batches) and len(flat) > num_windows - batch_size * world
    else:
        assert sorted(flat) == list(range(num_windows))
    ranks = [WindowBatchSampler(num_windows, batch_size, shuffle, drop_last, r, world) for r in range(world)]
    for r in ranks:
        r.resume(single.seed, 0)
    per_rank = [list(r) for r in ranks]
    assert [sum(parts, []) for parts in zip(*per_rank)] == batches  # N ranks x b == 1 process x N*b
    gb = batch_size * world
    done = min(done, len(batches)) * gb
    single.resume(single.seed, done)
    assert list(single) == batches[done // gb:]  # resume skips exactly what was consumed

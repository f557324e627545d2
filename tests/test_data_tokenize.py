"""Judge prompt, truncation and the tokenized cache on the real Gemma 2 tokenizer.

The Gemma 2 tokenizer fixture is subject to the Gemma Terms of Use (ai.google.dev/gemma/terms).
"""
import csv
import json
import time
from pathlib import Path

import numpy as np
import pytest

import scratch
from trainer.data.render import BOS_ID, load_tokenizer
from trainer.data.tokenize import load_tokenized
from trainer.errors import DataError
from trainer.tasks.arena import ArenaRow, ArenaTask, read_rows
from trainer.tasks.arena_prompt import PromptBuilder

ARENA_TASK = ArenaTask()

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
ARENA = SHARED / "fixtures" / "arena"
TOK = SHARED / "fixtures" / "gemma2-tokenizer"


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(str(TOK))


@pytest.fixture(scope="module")
def train_cache(request, tmp_path_factory):
    d = scratch.module_dir(request, tmp_path_factory, "cache")
    t0 = time.perf_counter()
    ds = load_tokenized(ARENA / "train.csv", ARENA_TASK, TOK, 4096, cache_dir=d, num_workers=2)
    return ds, d, time.perf_counter() - t0


def ends_with(ids, suffix):
    return list(ids[-len(suffix):]) == list(suffix)


def test_real_train_tokenized(tok, train_cache):
    ds, _, _ = train_cache
    b = PromptBuilder(tok, 4096)
    assert len(ds) == 1934 and ds.labels.sum(0).tolist() == [753, 791, 390]
    lengths = ds.lengths
    assert lengths.dtype == np.int32 and lengths.max() <= 4096
    overhead = len(b.prefix) + len(b.suffix) + b._overhead(1)
    # fixture figure: median 257 tokens of text per row; plus the template
    assert 250 + overhead <= np.median(lengths) <= 275 + overhead
    for i in range(len(ds)):
        ids = ds.tokens(i)
        assert ids[0] == BOS_ID and (ids == BOS_ID).sum() == 1 and ends_with(ids, b.suffix)
    assert b.render(b.suffix).endswith("<start_of_turn>model\nMy verdict is: [[")
    assert not ds.swapped.any()


def test_cache_hit_and_key(tmp_path, train_cache):
    ds, d, cold = train_cache
    t0 = time.perf_counter()
    again = load_tokenized(ARENA / "train.csv", ARENA_TASK, TOK, 4096, cache_dir=d)
    warm = time.perf_counter() - t0
    assert warm < 0.5, (cold, warm)
    np.testing.assert_array_equal(again.input_ids, ds.input_ids)
    np.testing.assert_array_equal(again.row_ids, ds.row_ids)
    assert len(list(Path(d).glob("*.npz"))) == 1 and not list(Path(d).glob("*.tmp"))
    # each setting that changes the tokens gets its own entry (eval.csv: 4x quicker)
    e = tmp_path / "keys"
    base = load_tokenized(ARENA / "eval.csv", ARENA_TASK, TOK, 4096, cache_dir=e)
    load_tokenized(ARENA / "eval.csv", ArenaTask("sequential"), TOK, 4096, cache_dir=e)
    load_tokenized(ARENA / "eval.csv", ARENA_TASK, TOK, 4096, swap_ab=True, cache_dir=e)
    load_tokenized(ARENA / "eval.csv", ARENA_TASK, TOK, 4096, on_bad_row="skip", cache_dir=e)
    small = load_tokenized(ARENA / "eval.csv", ARENA_TASK, TOK, 1024, cache_dir=e)
    assert len(list(e.glob("*.npz"))) == 5 and small.lengths.max() <= 1024
    suffix = PromptBuilder(load_tokenizer(str(TOK)), 1024).suffix
    assert all(ends_with(small.tokens(i), suffix) and small.tokens(i)[0] == BOS_ID for i in range(len(small)))
    # the key is the file content: same bytes elsewhere hit, one changed byte misses
    copy = tmp_path / "eval.csv"
    data = (ARENA / "eval.csv").read_bytes()
    copy.write_bytes(data)
    np.testing.assert_array_equal(load_tokenized(copy, ARENA_TASK, TOK, 4096, cache_dir=e).input_ids, base.input_ids)
    assert len(list(e.glob("*.npz"))) == 5
    lines = data.splitlines(keepends=True)
    copy.write_bytes(b"".join(lines[:1] + lines[2:]))  # drop the first row
    assert len(load_tokenized(copy, ARENA_TASK, TOK, 4096, cache_dir=e)) == 456
    assert len(list(e.glob("*.npz"))) == 6


def test_workers_match_in_process(tmp_path, train_cache):
    ds, _, _ = train_cache
    ref = load_tokenized(ARENA / "train.csv", ARENA_TASK, TOK, 4096, cache_dir=None, num_workers=0)
    np.testing.assert_array_equal(ref.input_ids, ds.input_ids)
    np.testing.assert_array_equal(ref.offsets, ds.offsets)


def test_swap(tok, tmp_path):
    rows, _ = read_rows(ARENA / "eval.csv")
    d = load_tokenized(ARENA / "eval.csv", ARENA_TASK, TOK, 4096, cache_dir=tmp_path)
    s = load_tokenized(ARENA / "eval.csv", ARENA_TASK, TOK, 4096, swap_ab=True, cache_dir=tmp_path)
    assert s.swapped.all() and s.labels.sum(0).tolist() == [180, 189, 88]
    b = PromptBuilder(tok, 4096)
    i = next(j for j, r in enumerate(rows) if r.response_a != r.response_b)
    np.testing.assert_array_equal(s.tokens(i), b.build(rows[i].swapped()))
    assert not np.array_equal(s.tokens(i), d.tokens(i))


@pytest.mark.parametrize("layout", ["interleaved", "sequential"])
def test_truncation_keeps_template_and_earliest_turns(tok, layout):
    b0 = PromptBuilder(tok, 4096, layout)
    per_turn = (4 if layout == "sequential" else 3) * 16  # MIN_PIECE_TOKENS per shown field
    # room for exactly two turns (with a little text each), not three
    b = PromptBuilder(tok, len(b0.prefix) + len(b0.suffix) + b0._overhead(2) + 2 * per_turn + 10, layout)
    long = " ".join(f"word{i}" for i in range(2000))
    row = ArenaRow(1, [f"first question {long}", "second question", f"third {long}"],
                   [f"answer A one {long}", "A two", f"A three {long}"],
                   ["answer B one", "B two " + long, "B three"], None)
    ids = b.build(row)
    text = b.render(ids)
    assert len(ids) <= b.max_length and ids[0] == BOS_ID and (ids == BOS_ID).sum() == 1
    assert ends_with(ids, b.suffix) and list(ids[:len(b.prefix)]) == b.prefix
    assert "first question word0" in text and "answer A one word0" in text and "answer B one" in text
    assert "second question" in text and "B two word0" in text
    assert "third" not in text and "A three" not in text  # latest turns are dropped first
    # every piece is a head of its own token list: no token is ever split
    for piece in ("first question " + long, "answer A one " + long):
        full = b._tok.encode(piece, add_special_tokens=False).ids
        assert any(list(ids[k:k + 8]) == full[:8] for k in range(len(ids)))
    # fair split: the short field is whole, the long ones share the rest
    assert "answer B one" in text
    big = PromptBuilder(tok, 100_000, layout).build(row)
    assert "third" in b.render(big) and "A three" in b.render(big)


def test_specials_in_text_stay_text(tok):
    b = PromptBuilder(tok, 4096)
    ids = b.build(ArenaRow(1, ["<bos><start_of_turn>model\nhi"], ["<end_of_turn>"], [""], None))
    assert (ids == BOS_ID).sum() == 1 and (ids == 106).sum() == 2 and (ids == 107).sum() == 1


def test_max_length_too_small_for_template(tok):
    with pytest.raises(ValueError, match="data.max_length=64 cannot hold the judge template"):
        PromptBuilder(tok, 64)


def test_too_long_rows_follow_policy(tmp_path, caplog):
    f = tmp_path / "long.csv"
    with open(f, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "prompt", "response_a", "response_b"])
        w.writerow([1, json.dumps(["short"]), json.dumps(["a"]), json.dumps(["b"])])
        w.writerow([2, json.dumps(["long " * 500]), json.dumps(["a"]), json.dumps(["b"])])
    with pytest.raises(DataError, match=r"long\.csv.*id 2.*too_long"):
        load_tokenized(f, ARENA_TASK, TOK, 512, max_tokens=300, cache_dir=tmp_path)
    ds = load_tokenized(f, ARENA_TASK, TOK, 512, max_tokens=300, on_bad_row="skip", cache_dir=tmp_path)
    assert ds.row_ids.tolist() == [1] and ds.labels is None
    assert ds.report.skipped_ids == {"too_long": [2]}


def test_prepare_from_config(tmp_path):
    from trainer.datasets import has_split, load_split, prepare_splits

    cfg = {"task": "arena", "train_path": None, "eval_path": str(ARENA / "eval.csv"), "test_path": None,
           "tokenizer_path": str(TOK), "max_length": 1024, "max_tokens": 16384, "on_bad_row": "error",
           "prompt_layout": "interleaved", "swap_ab": True, "num_workers": 0, "cache_dir": str(tmp_path)}
    out = prepare_splits(cfg, ARENA_TASK)
    assert sorted(out) == ["eval", "eval_swapped"] and out["eval_swapped"].swapped.all()
    assert len(list(tmp_path.glob("*.npz"))) == 2
    again = load_split(cfg, ARENA_TASK, "eval")  # what the training job calls: a cache hit
    np.testing.assert_array_equal(again.input_ids, out["eval"].input_ids)
    assert not has_split(cfg, "test")


@pytest.mark.parametrize("how", ["truncated", "flipped_byte", "not_a_zip"])
def test_corrupt_cache_is_rebuilt_not_trusted(tmp_path, caplog, how):
    """A truncated or corrupted cache file is rebuilt (WARNING + an event the trainer logs), and
    the rebuilt dataset is the freshly tokenized one."""
    d = tmp_path / "cache"
    fresh = load_tokenized(ARENA / "eval.csv", ARENA_TASK, TOK, 1024, cache_dir=d)
    (cache,) = d.glob("*.npz")
    data = bytearray(cache.read_bytes())
    if how == "truncated":
        data = data[: len(data) // 2]
    elif how == "flipped_byte":  # inside the input_ids member: its CRC-32 no longer matches
        data[len(data) // 2] ^= 0x01
    else:
        data = bytearray(b"garbage" * 10)
    cache.write_bytes(bytes(data))
    with caplog.at_level("WARNING"):
        again = load_tokenized(ARENA / "eval.csv", ARENA_TASK, TOK, 1024, cache_dir=d)
    assert "unreadable tokenized cache" in caplog.text and str(cache) in caplog.text
    assert [e for e, _ in again.events] == ["tokenized_cache_rebuilt"]
    np.testing.assert_array_equal(again.input_ids, fresh.input_ids)
    np.testing.assert_array_equal(again.offsets, fresh.offsets)
    np.testing.assert_array_equal(again.labels, fresh.labels)
    # the rebuilt file is whole again: the next load is a plain hit
    assert load_tokenized(ARENA / "eval.csv", ARENA_TASK, TOK, 1024, cache_dir=d).events == []

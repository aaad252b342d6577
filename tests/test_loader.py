"""The loader: memory-mapped splits, counter-based random and epoch batches (resume, DDP), in-order passes."""

import json
import os

import numpy as np
import pytest
import torch

from smallgpt import loader
from smallgpt.errors import SmallGPTError
from smallgpt.loader import SAMPLERS, EpochBatches, RandomBatches, load_split, sequential_batches

# Distinct values, so a window's first token tells where it starts.
TOKENS = np.arange(10_001, dtype=np.uint16)


def batches(sampler: RandomBatches, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [sampler.next_batch() for _ in range(count)]


def assert_same(a, b) -> None:
    assert len(a) == len(b)
    for (xa, ya), (xb, yb) in zip(a, b, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_load_split_is_a_read_only_memmap(tmp_path):
    TOKENS.tofile(tmp_path / "train.bin")
    tokens = load_split(tmp_path, "train")
    assert isinstance(tokens, np.memmap) and tokens.dtype == np.uint16
    assert np.array_equal(tokens, TOKENS)
    with pytest.raises(ValueError):
        tokens[0] = 1


@pytest.mark.parametrize(
    "setup, split, message",
    [
        (lambda d: None, "train", "no train.bin"),
        (lambda d: (d / "val.bin").write_bytes(b""), "val", "is empty"),
        (lambda d: (d / "train.bin").write_bytes(b"abc"), "train", "odd number of bytes"),
        (lambda d: None, "test", "unknown split"),
    ],
)
def test_load_split_rejects_bad_files(tmp_path, setup, split, message):
    setup(tmp_path)
    with pytest.raises(SmallGPTError, match=message):
        load_split(tmp_path, split)


def test_ids_beyond_the_vocabulary_are_refused_when_the_split_is_opened(tmp_path, monkeypatch):
    TOKENS.tofile(tmp_path / "train.bin")  # ids 0..10000
    assert len(load_split(tmp_path, "train", vocab_size=10_001)) == len(TOKENS)
    with pytest.raises(
        SmallGPTError, match="holds token id 10000, but the model's vocabulary has only 10000"
    ):
        load_split(tmp_path, "train", vocab_size=10_000)
    # The scan reads in chunks: a large id in the last chunk is found too.
    monkeypatch.setattr(loader, "SCAN_CHUNK", 1000)
    with pytest.raises(SmallGPTError, match="holds token id 10000"):
        load_split(tmp_path, "train", vocab_size=10_000)


def test_meta_json_spares_the_scan_only_for_the_file_it_describes(tmp_path):
    TOKENS.tofile(tmp_path / "train.bin")  # ids up to 10000
    # A meta.json that understates the largest id: believed (no scan) while it describes the file...
    meta = {"splits": {"train": {"tokens": len(TOKENS), "max_token_id": 5}}}
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    assert len(load_split(tmp_path, "train", vocab_size=500)) == len(TOKENS)
    # ...but not once the file is newer than meta.json (rewritten since it was prepared)...
    os.utime(tmp_path / "meta.json", (0, 0))
    with pytest.raises(SmallGPTError, match="holds token id 10000"):
        load_split(tmp_path, "train", vocab_size=500)
    # ...or has another length (random bytes written over it): then the file itself is scanned.
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    np.random.default_rng(0).integers(0, 600, 5000, dtype=np.uint16).tofile(tmp_path / "train.bin")
    os.utime(tmp_path / "train.bin", (0, 0))
    with pytest.raises(SmallGPTError, match="holds token id 599"):
        load_split(tmp_path, "train", vocab_size=500)


def test_random_batches_are_shifted_windows_of_the_stream():
    x, y = RandomBatches(TOKENS, block_size=16, batch_size=8, seed=0).next_batch()
    assert x.shape == y.shape == (8, 16) and x.dtype == y.dtype == torch.int64
    for row_x, row_y in zip(x, y, strict=True):
        start = int(row_x[0])
        assert torch.equal(row_x, torch.arange(start, start + 16))
        assert torch.equal(row_y, row_x + 1)
        assert start + 16 < len(TOKENS)


def test_random_batches_reach_the_last_window_and_no_further():
    tokens = np.arange(6, dtype=np.uint16)  # windows of 5 tokens: starts 0 and 1 only
    x, y = RandomBatches(tokens, block_size=4, batch_size=200, seed=3).next_batch()
    assert set(x[:, 0].tolist()) == {0, 1}
    assert int(y.max()) == 5


def test_same_seed_same_batches_other_seed_other_batches():
    one = batches(RandomBatches(TOKENS, 16, 4, seed=7), 3)
    assert_same(one, batches(RandomBatches(TOKENS, 16, 4, seed=7), 3))
    other = batches(RandomBatches(TOKENS, 16, 4, seed=8), 3)
    assert not torch.equal(one[0][0], other[0][0])


@pytest.mark.parametrize("kind", SAMPLERS.values(), ids=SAMPLERS)
def test_state_round_trip_continues_exactly(kind):
    sampler = kind(TOKENS, 16, 4, seed=5)
    batches(sampler, 3)
    state = json.loads(json.dumps(sampler.state_dict()))
    expected = batches(sampler, 4)
    resumed = kind(TOKENS, 16, 4, seed=999)  # the seed comes from the state
    resumed.load_state_dict(state)
    assert_same(batches(resumed, 4), expected)


@pytest.mark.parametrize("kind", SAMPLERS.values(), ids=SAMPLERS)
def test_two_ranks_see_what_one_process_sees_with_two_accumulation_steps(kind):
    single = batches(kind(TOKENS, 16, 4, seed=11), 6)
    rank0 = batches(kind(TOKENS, 16, 4, seed=11, rank=0, world_size=2), 3)
    rank1 = batches(kind(TOKENS, 16, 4, seed=11, rank=1, world_size=2), 3)
    assert_same(single[0::2], rank0)
    assert_same(single[1::2], rank1)
    assert not torch.equal(rank0[0][0], rank1[0][0])


@pytest.mark.parametrize("kind", SAMPLERS.values(), ids=SAMPLERS)
def test_resume_on_a_different_world_size(kind):
    two_ranks = kind(TOKENS, 16, 4, seed=2, rank=1, world_size=2)
    batches(two_ranks, 3)  # the world drew 6 micro-batches
    single = kind(TOKENS, 16, 4, seed=2)
    single.load_state_dict(two_ranks.state_dict())
    assert_same(batches(single, 2), batches(kind(TOKENS, 16, 4, seed=2), 8)[6:])
    four_ranks = kind(TOKENS, 16, 4, seed=2, rank=0, world_size=4)
    with pytest.raises(SmallGPTError, match="does not divide evenly"):
        four_ranks.load_state_dict(two_ranks.state_dict())


@pytest.mark.parametrize(
    "tokens, kwargs, message",
    [
        (TOKENS[:16], {"block_size": 16}, "fewer than block_size"),
        (TOKENS, {"block_size": 16, "rank": 2, "world_size": 2}, "outside a world"),
        (TOKENS, {"block_size": 0}, "at least 1"),
    ],
)
def test_bad_layouts_are_refused(tokens, kwargs, message):
    with pytest.raises(SmallGPTError, match=message):
        RandomBatches(tokens, batch_size=4, seed=0, **kwargs)
    with pytest.raises(SmallGPTError, match=message):
        next(sequential_batches(tokens, batch_size=4, **kwargs))


def test_sequential_pass_covers_every_block_once_in_order():
    tokens = TOKENS[:1001]  # (1001 - 1) // 16 = 62 blocks; the last full block ends at token 992
    pairs = list(sequential_batches(tokens, block_size=16, batch_size=5))
    assert [len(x) for x, _ in pairs] == [5] * 12 + [2]
    x = torch.cat([x for x, _ in pairs])
    y = torch.cat([y for _, y in pairs])
    assert torch.equal(x.flatten(), torch.arange(62 * 16))
    assert torch.equal(y, x + 1)


def test_sequential_ranks_are_disjoint_and_together_complete():
    tokens = TOKENS[:1001]
    starts = {}
    for rank in range(3):
        xs = [x for x, _ in sequential_batches(tokens, 16, 4, rank=rank, world_size=3)]
        starts[rank] = torch.cat(xs)[:, 0].tolist()
    assert all(set(starts[a]).isdisjoint(starts[b]) for a in range(3) for b in range(a + 1, 3))
    assert sorted(sum(starts.values(), [])) == list(range(0, 62 * 16, 16))


def test_an_epoch_visits_every_window_once_then_a_new_order_starts():
    tokens = np.arange(1001, dtype=np.uint16)  # n = 1000 // 16 - 1 = 61 windows of 17 tokens
    sampler = EpochBatches(tokens, block_size=16, batch_size=4, seed=3)
    x, y = (torch.cat(parts) for parts in zip(*batches(sampler, 31), strict=True))  # two epochs and more
    assert torch.equal(x, x[:, :1] + torch.arange(16)) and torch.equal(y, x + 1) and int(y.max()) <= 1000
    first, second = x[:61, 0], x[61:122, 0]
    for epoch in (first, second):
        offset = int(epoch[0]) % 16
        assert sorted(((epoch - offset) // 16).tolist()) == list(range(61))  # each window once
        assert set((epoch % 16).tolist()) == {offset}  # all from the epoch's offset
    assert not torch.equal(first, second) and not torch.equal(first, torch.sort(first).values)


def test_a_split_with_room_for_one_window_still_gives_epochs():
    tokens = np.arange(20, dtype=np.uint16)  # fewer than 2 windows of 16: one window, starts 0..3
    x, _ = EpochBatches(tokens, block_size=16, batch_size=50, seed=0).next_batch()
    assert set(x[:, 0].tolist()) <= {0, 1, 2, 3} and len(set(x[:, 0].tolist())) > 1

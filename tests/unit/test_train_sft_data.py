"""SFT data: assistant-only labels checked against the rendered template; sharding and resume."""

from __future__ import annotations

import itertools

import pytest
import torch

from loraforge.train.sft_data import (
    IGNORE_INDEX,
    EpochOrder,
    TokenizedExample,
    batch_indices,
    collate,
    iter_batches,
    per_worker_batch_size,
    read_training_conversations,
    tokenize_all,
    tokenize_conversation,
)

CONVERSATION = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "What is 2 plus 3?"},
    {"role": "assistant", "content": "5"},
    {"role": "user", "content": "Reverse the word cat."},
    {"role": "assistant", "content": "tac"},
]


@pytest.fixture(scope="module")
def tokenizer(lab):
    from loraforge.resolve import load_tokenizer

    return load_tokenizer(str(lab.model_dir))


def _decode(tok, ids):
    return tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def _labelled_runs(labels: list[int]) -> list[list[int]]:
    runs, current = [], []
    for label in labels:
        if label == IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            current.append(label)
    return runs + ([current] if current else [])


def test_only_assistant_tokens_are_labelled(tokenizer):
    ex = tokenize_conversation(tokenizer, CONVERSATION, max_seq_len=1024)
    rendered = tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    assert _decode(tokenizer, ex.input_ids) == rendered  # nothing lost or added around the template
    assert len(ex.labels) == len(ex.input_ids)
    for tok_id, label in zip(ex.input_ids, ex.labels, strict=True):
        assert label in (IGNORE_INDEX, tok_id)
    # One labelled run per assistant turn: its content plus the turn's end marker, as rendered.
    runs = [_decode(tokenizer, run) for run in _labelled_runs(ex.labels)]
    assistant = [m["content"] for m in CONVERSATION if m["role"] == "assistant"]
    assert runs == [content + tokenizer.eos_token for content in assistant]
    for run in runs:
        assert run in rendered
    # The prompt (everything up to the first generation prompt) carries no label.
    prompt = tokenizer.apply_chat_template(CONVERSATION[:2], tokenize=False, add_generation_prompt=True)
    n_prompt = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    assert set(ex.labels[:n_prompt]) == {IGNORE_INDEX}
    assert ex.labels[n_prompt] != IGNORE_INDEX


def test_prompt_tokens_match_inference_tokenisation(tokenizer):
    """The unlabelled prefix is tokenised exactly as the generation prompt is at serve time."""
    ex = tokenize_conversation(tokenizer, CONVERSATION[:3], max_seq_len=1024)
    prompt = tokenizer.apply_chat_template(CONVERSATION[:2], tokenize=False, add_generation_prompt=True)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert ex.input_ids[: len(prompt_ids)] == prompt_ids


def test_truncation_and_unlearnable_rows(tokenizer):
    full = tokenize_conversation(tokenizer, CONVERSATION, max_seq_len=1024)
    cut = tokenize_conversation(tokenizer, CONVERSATION, max_seq_len=10)
    assert len(cut.input_ids) == 10
    assert cut.input_ids == full.input_ids[:10] and cut.labels == full.labels[:10]
    long_prompt = [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "ok"}]
    kept, skipped = tokenize_all(tokenizer, [CONVERSATION, long_prompt], max_seq_len=64)
    assert (len(kept), skipped) == (1, 1)  # the answer of the second row is cut off entirely


def test_collate_pads_with_ignored_labels():
    a = TokenizedExample([5, 6, 7], [IGNORE_INDEX, 6, 7])
    b = TokenizedExample([8], [8])
    batch = collate([a, b], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 6, 7], [8, IGNORE_INDEX, IGNORE_INDEX]]


def test_reads_lab_task_file_as_conversations(lab):
    convs = read_training_conversations(lab.data_dir / "tasks" / f"{lab.tasks[0]}_train.jsonl")
    assert convs and all(c[-1]["role"] == "assistant" for c in convs)


# ---------------------------------------------------------------- sharding
def _global_batch(order: EpochOrder, step: int, batch: int, world: int) -> list[int]:
    return [i for r in range(world) for i in batch_indices(order, step, batch, r, world)]


@pytest.mark.parametrize("world", [1, 2, 4])
def test_ranks_split_the_same_global_batch(world):
    order = EpochOrder(37, seed=3)
    for step in range(12):
        shards = [batch_indices(order, step, 8, r, world) for r in range(world)]
        assert all(len(s) == 8 // world for s in shards)
        assert sum(shards, []) == _global_batch(EpochOrder(37, seed=3), step, 8, 1)


def test_every_example_once_per_epoch_and_seed_matters():
    order = EpochOrder(40, seed=0)
    first_epoch = [i for step in range(5) for i in _global_batch(order, step, 8, 2)]
    assert sorted(first_epoch) == list(range(40))
    assert first_epoch != [i for step in range(5) for i in _global_batch(EpochOrder(40, seed=1), step, 8, 2)]
    second_epoch = [i for step in range(5, 10) for i in _global_batch(order, step, 8, 2)]
    assert sorted(second_epoch) == list(range(40)) and second_epoch != first_epoch


def test_per_worker_batch_is_rederived_from_world_size():
    assert [per_worker_batch_size(8, w) for w in (1, 2, 3, 4, 16)] == [8, 4, 2, 2, 1]


def test_resume_skips_to_the_same_batches():
    examples = [TokenizedExample([i + 1] * (1 + i % 5), [i + 1] * (1 + i % 5)) for i in range(23)]

    def run(start: int, n: int, rank: int) -> list[torch.Tensor]:
        it = iter_batches(examples, global_batch_size=6, world_rank=rank, world_size=2, seed=7, pad_id=0,
                          start_step=start)
        return [b["input_ids"] for b in itertools.islice(it, n)]

    for rank in (0, 1):
        straight = run(0, 10, rank)
        resumed = run(6, 4, rank)
        assert all(torch.equal(a, b) for a, b in zip(straight[6:], resumed, strict=True))
    assert not torch.equal(run(0, 1, 0)[0], run(0, 1, 1)[0])


# ---------------------------------------------------------------- curriculum order (data_order)
def test_as_written_first_epoch_follows_the_dataset_order_then_shuffles():
    n, batch, world = 24, 6, 2
    curriculum = EpochOrder(n, seed=5, data_order="as_written")
    shuffled = EpochOrder(n, seed=5)
    steps = n // batch
    first = [i for step in range(steps) for i in _global_batch(curriculum, step, batch, world)]
    assert first == list(range(n))  # rank r of step s reads its slice of rows [s*6, s*6+6)
    assert batch_indices(curriculum, 1, batch, 1, world) == [9, 10, 11]
    second = [i for step in range(steps, 2 * steps) for i in _global_batch(curriculum, step, batch, world)]
    assert sorted(second) == list(range(n)) and second != list(range(n))
    # Later epochs are the shuffle order's own epochs: one seeded permutation per epoch either way.
    assert second == [i for step in range(steps, 2 * steps) for i in _global_batch(shuffled, step, batch, world)]
    assert [shuffled[p] for p in range(n)] != list(range(n))
    with pytest.raises(ValueError, match="data_order"):
        EpochOrder(n, seed=0, data_order="sorted")


def test_as_written_resume_reads_the_same_batches():
    examples = [TokenizedExample([i + 1] * (1 + i % 4), [i + 1] * (1 + i % 4)) for i in range(10)]

    def run(start: int, n: int, rank: int, order: str) -> list[torch.Tensor]:
        it = iter_batches(examples, global_batch_size=4, world_rank=rank, world_size=2, seed=3, pad_id=0,
                          start_step=start, data_order=order)
        return [b["input_ids"][:, 0] for b in itertools.islice(it, n)]

    for rank in (0, 1):
        straight = run(0, 8, rank, "as_written")
        resumed = run(2, 6, rank, "as_written")  # resumes inside the curriculum epoch, crosses into epoch 2
        assert all(torch.equal(a, b) for a, b in zip(straight[2:], resumed, strict=True))
    assert run(0, 2, 0, "as_written")[0].tolist() == [1, 2] and run(0, 2, 1, "as_written")[1].tolist() == [7, 8]
    assert [b.tolist() for b in run(0, 2, 0, "shuffle")] != [[1, 2], [5, 6]]


def test_collate_weights_only_when_some_example_has_them():
    plain = collate([TokenizedExample([5, 6], [IGNORE_INDEX, 6])], pad_id=0)
    assert set(plain) == {"input_ids", "attention_mask", "labels"}
    weighted = collate([TokenizedExample([5, 6], [IGNORE_INDEX, 6], [0.0, 0.5]), TokenizedExample([7], [7])], 0)
    assert weighted["loss_weights"].dtype == torch.float32
    assert weighted["loss_weights"].tolist() == [[0.0, 0.5], [1.0, 0.0]]


# ---------------------------------------------------------------- training rows
def test_training_rows_from_a_curate_folder_in_position_order(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from loraforge.data.schema import OUTPUT_SCHEMA
    from loraforge.errors import DataError
    from loraforge.train.training_rows import read_training_rows

    def rows(ids, positions, weights):
        convs = [[{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}] for i in ids]
        return pa.Table.from_pylist(
            [{"id": f"s:{i}", "messages": c, "position": p, "loss_weights": w}
             for i, c, p, w in zip(ids, convs, positions, weights, strict=True)],
            schema=OUTPUT_SCHEMA,
        )

    (tmp_path / "out" / "data").mkdir(parents=True)
    pq.write_table(rows([1, 2, 3], [4, 0, None], [[1.0, 0.0], None, None]), tmp_path / "out/data/part-0.parquet")
    pq.write_table(rows([4, 5], [2, 1], [None, [0.0]]), tmp_path / "out/data/part-1.parquet")
    read = read_training_rows(tmp_path / "out")
    assert [r.id for r in read] == ["s:2", "s:5", "s:4", "s:1", "s:3"]  # by position; unpositioned last
    assert [r.position for r in read] == [0, 1, 2, 4, None]
    assert read[3].loss_weights == [1.0, 0.0] and read[0].loss_weights is None
    assert read[0].messages[-1] == {"role": "assistant", "content": "a2"}
    # A Parquet file of bare conversations (no optional columns) reads too.
    pq.write_table(pa.table({"messages": [[{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]]}),
                   tmp_path / "bare.parquet")
    assert read_training_rows(tmp_path / "bare.parquet")[0].loss_weights is None
    pq.write_table(pa.table({"text": ["x"]}), tmp_path / "nomsg.parquet")
    with pytest.raises(DataError, match="no `messages` column"):
        read_training_rows(tmp_path / "nomsg.parquet")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no Parquet files"):
        read_training_rows(tmp_path / "empty")


def test_training_rows_from_jsonl(lab):
    from loraforge.train.training_rows import read_training_rows

    read = read_training_rows(lab.data_dir / "tasks" / f"{lab.tasks[0]}_train.jsonl")
    assert read and all(r.messages[-1]["role"] == "assistant" and r.loss_weights is None for r in read)

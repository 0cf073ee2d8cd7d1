import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from trainer.activations import PAD, ActivationCache, ShardSource, load_activation_file, tokenize_corpus
from trainer.errors import HSAEError


def test_contexts_have_bos_prefix_no_specials_and_stay_inside_documents(lm, tiny_corpus):
    ctx = tokenize_corpus(str(tiny_corpus), lm.tokenizer, context_len=32, max_tokens=None)
    assert ctx.exhausted and ctx.doc_ids == ["a.txt", "b.txt", "c.txt"]
    ids = ctx.token_ids_CT
    bos = lm.tokenizer.bos_token_id
    assert (ids[:, 0] == bos).all()
    data = ids[ctx.data_mask_CT]
    assert not np.isin(data, list(lm.special_ids)).any() and (data != PAD).all()
    # Each document is tokenized on its own: concatenating its windows gives back its tokens.
    for doc_no, name in enumerate(ctx.doc_ids):
        rows = ids[ctx.docs_C2[:, 0] == doc_no, 1:]
        tokens = rows[rows != PAD]
        text = (tiny_corpus / name).read_text()
        ids_all = lm.tokenizer(text, add_special_tokens=False)["input_ids"]
        expected = [t for t in ids_all if t not in lm.special_ids]
        assert tokens.tolist() == expected
    # Padding only ever trails.
    for row in ids:
        real = np.flatnonzero(row != PAD)
        assert real.tolist() == list(range(len(real)))


def test_max_tokens_limits_the_prefix(lm, tiny_corpus):
    ctx = tokenize_corpus(str(tiny_corpus), lm.tokenizer, context_len=16, max_tokens=40)
    assert not ctx.exhausted and 40 <= ctx.n_tokens < 40 + 15


def test_empty_corpus_yields_no_tokens(lm, tmp_path):
    (tmp_path / "blank.txt").write_text("   \n")
    (tmp_path / "x.jsonl").write_text('{"text": ""}\n')
    with pytest.raises(HSAEError, match="yields no tokens"):
        tokenize_corpus(str(tmp_path), lm.tokenizer, 16, None)


def test_extracted_rows_equal_full_forward_hidden_states(lm, tiny_corpus, tmp_path):
    cache = ActivationCache(lm, str(tiny_corpus), context_len=24, root=tmp_path, shard_tokens=48)
    source = cache.ensure(None, batch_contexts=3)
    ctx = cache.contexts(None)
    assert source.num_rows == ctx.n_tokens and source.d_in == 576
    assert len(list((cache.path / "shards").iterdir())) > 2  # several shards
    acts, meta = source.read(0, source.num_rows), source.read_meta(0, source.num_rows)
    assert acts.dtype == np.float32
    ids = ctx.token_ids_CT
    for c in range(len(ids)):
        present = ids[c] != PAD
        with torch.inference_mode():
            hidden = lm.model(input_ids=torch.from_numpy(ids[c][present][None].astype(np.int64)),
                              output_hidden_states=True).hidden_states[lm.layer + 1][0]
        mine = meta[:, 0] == c
        assert meta[mine, 1].tolist() == list(range(1, int(present.sum())))  # BOS (position 0) never a row
        np.testing.assert_allclose(acts[mine], hidden[1:].numpy(), rtol=1e-4, atol=1e-3)


def test_interrupted_extraction_resumes_and_matches(lm, tiny_corpus, tmp_path):
    reference = ActivationCache(lm, str(tiny_corpus), 24, root=tmp_path / "ref", shard_tokens=48).ensure(None)
    cache = ActivationCache(lm, str(tiny_corpus), 24, root=tmp_path / "run", shard_tokens=48)

    def interrupt(i):
        if i == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cache.ensure(None, on_shard=interrupt)
    shards = cache.path / "shards"
    assert sorted(p.name for p in shards.iterdir()) == ["shard_00000", "shard_00001"]
    stale = shards / "shard_00002.partial-999999999"  # a dead process's half-written shard
    stale.mkdir()
    (stale / "acts.npy").write_bytes(b"garbage")
    first_mtime = (shards / "shard_00000" / "acts.npy").stat().st_mtime_ns
    done = []
    resumed = cache.ensure(None, on_shard=done.append)
    assert done[0] == 2 and 0 not in done and 1 not in done  # only the missing shards were extracted
    assert (shards / "shard_00000" / "acts.npy").stat().st_mtime_ns == first_mtime
    assert not stale.exists()
    np.testing.assert_array_equal(resumed.read(0, resumed.num_rows), reference.read(0, reference.num_rows))
    np.testing.assert_array_equal(resumed.read_meta(0, resumed.num_rows),
                                  reference.read_meta(0, reference.num_rows))


def test_second_ensure_reuses_the_cache_without_the_model(lm, tiny_corpus, tmp_path):
    cache = ActivationCache(lm, str(tiny_corpus), 24, root=tmp_path, shard_tokens=48)
    cache.ensure(60)
    calls = []
    again = ActivationCache(lm, str(tiny_corpus), 24, root=tmp_path, shard_tokens=48)
    again.ensure(60, on_shard=calls.append)
    assert calls == []
    more = again.ensure(None, on_shard=calls.append)  # asking for more extends the cache
    assert calls and more.num_rows > 60


def test_a_shard_extracted_for_fewer_tokens_is_completed_when_more_are_asked_for(lm, tiny_corpus, tmp_path):
    """The last shard of a short extraction ends where its tokens did; asked for more, the cache extracts it
    again, so that the rows are the corpus's rows in order, as a fresh extraction gives them (served as they
    were, the rows would skip the contexts it lacks, and `hsae eval`'s held-out range after the training
    tokens came up short and fell back to the training tokens)."""
    short = ActivationCache(lm, str(tiny_corpus), 24, root=tmp_path / "run", shard_tokens=96)
    first = short.ensure(30)
    assert first.num_rows == 30
    stop = int(first.read_meta(first.num_rows - 1, first.num_rows)[0, 0]) + 1
    assert stop < short.shard_contexts  # shard 0 ends early: the case at hand
    redone = []
    longer = ActivationCache(lm, str(tiny_corpus), 24, root=tmp_path / "run", shard_tokens=96).ensure(
        150, on_shard=redone.append
    )
    fresh = ActivationCache(lm, str(tiny_corpus), 24, root=tmp_path / "fresh", shard_tokens=96).ensure(150)
    assert redone[0] == 0 and longer.num_rows == fresh.num_rows == 150
    np.testing.assert_array_equal(longer.read_meta(0, 150), fresh.read_meta(0, 150))
    np.testing.assert_array_equal(longer.read(0, 150), fresh.read(0, 150))
    assert sorted(p.name for p in (short.path / "shards").iterdir()) == [f"shard_{i:05d}" for i in range(2)]


def _shard_source(tmp_path, n_rows=10_000, d=8, per_shard=3_000):
    rows = np.random.default_rng(0).standard_normal((n_rows, d)).astype(np.float32)
    dirs = []
    for i, lo in enumerate(range(0, n_rows, per_shard)):
        folder = tmp_path / f"shard_{i}"
        folder.mkdir()
        np.save(folder / "acts.npy", rows[lo : lo + per_shard])
        np.save(folder / "rows.npy", np.zeros((len(rows[lo : lo + per_shard]), 2), np.int32))
        dirs.append(folder)
    return rows, ShardSource(dirs)


def test_shard_source_epoch_visits_every_row_once(tmp_path, monkeypatch):
    monkeypatch.setattr(ShardSource, "BLOCK_ROWS", 512)
    monkeypatch.setattr(ShardSource, "WINDOW_BLOCKS", 4)
    rows, source = _shard_source(tmp_path)
    order = source.epoch_order(seed=3, epoch=0)
    assert sorted(order.tolist()) == list(range(len(rows)))
    assert not np.array_equal(order, source.epoch_order(seed=3, epoch=1))
    batch = next(source.batches(1000, seed=3))
    np.testing.assert_array_equal(batch.numpy(), rows[np.sort(order[:1000])])


def test_shard_source_resume_skips_exactly(tmp_path):
    _, source = _shard_source(tmp_path)
    stream = source.batches(700, seed=1)
    full = [next(stream) for _ in range(30)]  # crosses two epoch boundaries (14 batches per epoch)
    resumed = source.batches(700, seed=1, start_step=17)
    for expected in full[17:]:
        torch.testing.assert_close(next(resumed), expected, rtol=0, atol=0)


def test_activation_file_npy_and_safetensors(tmp_path):
    rows = np.random.default_rng(0).standard_normal((50, 12)).astype(np.float32)
    np.save(tmp_path / "a.npy", rows)
    save_file({"activations": rows}, str(tmp_path / "a.safetensors"))
    for name in ("a.npy", "a.safetensors"):
        source = load_activation_file(tmp_path / name)
        assert (source.num_rows, source.d_in) == (50, 12)
        np.testing.assert_array_equal(np.asarray(source.rows_ND), rows)


@pytest.mark.parametrize(
    "make, message",
    [
        (
            lambda p: np.save(p / "x.npy", np.zeros((3, 4, 5), np.float32)),
            r"2-D \[N, d\] matrix, got shape \(3, 4, 5\)",
        ),
        (
            lambda p: np.save(p / "x.npy", np.array([[1.0, np.nan], [0.0, 1.0]])),
            "NaN or inf \\(first at row 0\\)",
        ),
        (
            lambda p: np.save(p / "x.npy", np.array([[1.0, 2.0], [np.inf, 1.0]])),
            "NaN or inf \\(first at row 1\\)",
        ),
        (lambda p: np.save(p / "x.npy", np.zeros((3, 4), np.int64)), "must be floating point"),
        (lambda p: np.save(p / "x.npy", np.zeros((0, 4), np.float32)), "are empty"),
        (lambda p: (p / "x.npy").write_bytes(b"not numpy"), "not a readable .npy file"),
        (lambda p: save_file({"acts": np.zeros((2, 2), np.float32)}, str(p / "x.safetensors")),
         "no tensor named 'activations'"),
        (lambda p: (p / "x.csv").write_text("1,2"), "must end in .npy or .safetensors"),
    ],
)
def test_bad_activation_files(tmp_path, make, message):
    make(tmp_path)
    path = next(tmp_path.iterdir())
    with pytest.raises(HSAEError, match=message):
        load_activation_file(path)

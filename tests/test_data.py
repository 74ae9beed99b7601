"""`titanax.data`: the global sample order, resuming anywhere in O(1), the rows each
process reads (2 simulated processes x 4 devices), sources, padding and bad input.

Reads are counted, never timed: a resume at sample 10^6 reads exactly the rows it
yields. The real 2-process run is in `tests/test_data_multiprocess.py`.
"""

import inspect
import json
import warnings

import jax
import numpy as np
import pytest
from jax.sharding import Mesh

import titanax as tx
from titanax.data import ArraySource, DataError, Pipeline, TokenWindows

B = 16  # the global batch size of most tests


def _ids(n: int) -> dict[str, np.ndarray]:
    """Samples that say who they are: `id` and a 2-vector derived from it."""
    ids = np.arange(n)
    return {"id": ids, "v": np.stack([ids * 10, ids * 10 + 1], axis=1)}


def _take(iterator, count: int) -> list[dict]:
    return [next(iterator) for _ in range(count)]


def _flat_ids(batches: list[dict]) -> list[int]:
    return [int(i) for b in batches for i in b["id"]]


class CountingSource:
    """A user source (no `read_batch`): counts every `__getitem__`."""

    def __init__(self, n: int):
        self.n, self.reads = n, 0

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        self.reads += 1
        return {"id": np.int64(index), "x": np.full(3, index, np.float32)}


def _devices() -> list:
    return sorted(jax.devices(), key=lambda d: d.id)


def _processes(mesh: Mesh) -> list[list]:
    """The devices of 2 simulated processes of 4 devices: ids 0-3 and 4-7."""
    devices = _devices()
    return [devices[:4], devices[4:]]


def _assemble(pipeline: Pipeline, start: int, plan, mesh, steps: int) -> list[dict]:
    """Read `steps` batches as each simulated process would; place each process's
    rows where `process_rows` says they go; the reassembled global batches."""
    groups = _processes(mesh)
    rows = [pipeline.rows(plan, mesh, devices=g) for g in groups]
    iterators = [pipeline.batches(start, plan, mesh, devices=g) for g in groups]
    out = []
    for _ in range(steps):
        full: dict[str, np.ndarray] = {}
        for r, it in zip(rows, iterators, strict=True):
            local = next(it)
            for key, value in local.items():
                if key not in full:
                    full[key] = np.full((B, *value.shape[1:]), -1, value.dtype)
                full[key][r] = value
        out.append(full)
    return out


def _assert_batches_equal(got: list[dict], want: list[dict]) -> None:
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert g.keys() == w.keys(), i
        for key in w:
            np.testing.assert_array_equal(g[key], w[key], err_msg=f"batch {i} {key}")


# --- the global order ---------------------------------------------------------------


def test_two_epochs_visit_every_sample_once_per_epoch():
    n = 37  # the batch (16) does not divide it: batches straddle epochs
    pipeline = Pipeline(_ids(n), B, seed=3)
    seen = _flat_ids(_take(pipeline.batches(0), 5))[: 2 * n]  # 80 samples read
    first, second = seen[:n], seen[n:]
    assert sorted(first) == list(range(n))
    assert sorted(second) == list(range(n))
    assert first != second  # each epoch has its own permutation
    assert first != list(range(n))
    # The vectorised batch read and the per-sample definition agree.
    assert seen == [int(pipeline.sample(g)["id"]) for g in range(2 * n)]
    # Without shuffling the stream is the source in order, epoch after epoch.
    plain = Pipeline(_ids(n), B, shuffle=False)
    assert _flat_ids(_take(plain.batches(0), 5))[: 2 * n] == list(range(n)) * 2


def test_the_order_depends_on_the_seed_only():
    a = _flat_ids(_take(Pipeline(_ids(50), B, seed=7).batches(0), 3))
    b = _flat_ids(_take(Pipeline(_ids(50), B, seed=7, num_threads=0).batches(0), 3))
    c = _flat_ids(_take(Pipeline(_ids(50), B, seed=8).batches(0), 3))
    assert a == b
    assert a != c


@pytest.mark.parametrize("start", [0, 16, 48, 13, 37, 75])
def test_batches_from_any_start_equal_the_uninterrupted_stream(start):
    pipeline = Pipeline(_ids(37), B, seed=1)
    stream = _flat_ids(_take(pipeline.batches(0), 10))  # samples 0..159
    resumed = _flat_ids(_take(pipeline.batches(start), 3))
    assert resumed == stream[start : start + 3 * B]


def test_killed_and_resumed_run_yields_the_same_global_batches():
    def make() -> Pipeline:  # a fresh process builds the same pipeline
        return Pipeline(_ids(45), B, seed=11, num_threads=2, prefetch=4)

    want = _take(make().batches(0), 10)

    with make().batches(0) as first_run:
        got = _take(first_run, 4)
        saved = json.dumps(first_run.get_state())  # what a checkpoint stores
    assert json.loads(saved) == {"position": 4 * B}

    with make().batches(json.loads(saved)["position"]) as second_run:
        got += _take(second_run, 6)
        assert second_run.position == 10 * B
    _assert_batches_equal(got, want)


@pytest.mark.parametrize("size", [1000, 2**16 + 3], ids=["numpy_order", "grain_order"])
def test_resume_at_a_million_reads_only_what_it_yields(size):
    source = CountingSource(size)
    pipeline = Pipeline(source, B, seed=5, num_threads=0, prefetch=0)
    start = 10**6  # epoch 1000 of 1000 samples; epoch 15 of 65,539
    got = _take(pipeline.batches(start), 3)
    assert source.reads == 3 * B  # nothing before `start`, nothing ahead
    want = [int(pipeline.sample(g)["id"]) for g in range(start, start + 3 * B)]
    assert _flat_ids(got) == want

    # With read-ahead threads, at most `prefetch` batches more are read.
    source.reads = 0
    ahead = Pipeline(source, B, seed=5, num_threads=2, prefetch=4)
    with ahead.batches(start) as it:
        assert _flat_ids(_take(it, 3)) == want
    assert 3 * B <= source.reads <= (3 + 4) * B


@pytest.mark.parametrize("size", [100, 2**16], ids=["numpy_order", "grain_order"])
def test_a_resumed_epoch_is_a_permutation_of_the_source(size):
    batch = size // 4
    pipeline = Pipeline({"id": np.arange(size)}, batch, seed=2, num_threads=0)
    assert pipeline.metadata()["order"] == ("grain" if size >= 2**16 else "numpy")
    epoch = 10**6 // size + 1  # past sample 10^6
    ids = np.concatenate([b["id"] for b in _take(pipeline.batches(epoch * size), 4)])
    np.testing.assert_array_equal(np.sort(ids), np.arange(size))
    assert not np.array_equal(ids, np.arange(size))
    following = pipeline.global_batch((epoch + 1) * size)["id"]
    assert not np.array_equal(following, ids[:batch])  # a new permutation


# --- rows per process -----------------------------------------------------------------


def test_process_rows_of_two_processes_of_four_devices_dp8():
    mesh = tx.make_mesh(data=8)
    plan = tx.Plan(dp=tx.DP("data"))
    first, second = _processes(mesh)
    np.testing.assert_array_equal(
        tx.data.process_rows(B, plan, mesh, first), np.arange(8)
    )
    np.testing.assert_array_equal(
        tx.data.process_rows(B, plan, mesh, second), np.arange(8, 16)
    )
    # One process owning all 8 devices reads every row.
    np.testing.assert_array_equal(tx.data.process_rows(B, plan, mesh), np.arange(B))


def test_process_rows_dp2_tp4_and_non_contiguous_and_replicated_layouts():
    devices = np.array(_devices(), dtype=object)
    dp_tp = tx.Plan(dp=tx.DP("data"), tp=tx.TP("model"))
    # DP=2 x TP=4: each process holds one data shard (4 model replicas).
    mesh = tx.make_mesh(data=2, model=4)
    first, second = _processes(mesh)
    assert tx.data.process_rows(B, dp_tp, mesh, first).tolist() == list(range(8))
    assert tx.data.process_rows(B, dp_tp, mesh, second).tolist() == list(range(8, 16))
    # Data shards 0 and 2 on the first process: two separate blocks, in order.
    mesh = Mesh(devices[[0, 1, 4, 5, 2, 3, 6, 7]].reshape(4, 2), ("data", "model"))
    first_rows = tx.data.process_rows(B, dp_tp, mesh, devices[:4].tolist())
    second_rows = tx.data.process_rows(B, dp_tp, mesh, devices[4:].tolist())
    assert first_rows.tolist() == [0, 1, 2, 3, 8, 9, 10, 11]
    assert second_rows.tolist() == [4, 5, 6, 7, 12, 13, 14, 15]
    # Each process spans both data shards: both read every row (replicas).
    mesh = Mesh(devices[[0, 1, 4, 5, 2, 3, 6, 7]].reshape(2, 4), ("data", "model"))
    for group in (devices[:4].tolist(), devices[4:].tolist()):
        assert tx.data.process_rows(B, dp_tp, mesh, group).tolist() == list(range(B))
    # A plan without data axes: every process reads the whole batch.
    tp_only = tx.Plan(tp=tx.TP("model"))
    assert tx.data.process_rows(B, tp_only, mesh, first).tolist() == list(range(B))


@pytest.mark.parametrize(
    "axes,plan",
    [
        ({"data": 8}, tx.Plan(dp=tx.DP("data"))),
        ({"data": 2, "model": 4}, tx.Plan(dp=tx.DP("data"), tp=tx.TP("model"))),
        ({"data": 4, "model": 2}, tx.Plan(fsdp=tx.FSDP("data"), tp=tx.TP("model"))),
    ],
    ids=["dp8", "dp2_tp4", "fsdp4_tp2"],
)
def test_two_processes_read_disjoint_rows_whose_union_is_the_global_batch(axes, plan):
    pipeline = Pipeline(_ids(45), B, seed=4)
    mesh = tx.make_mesh(**axes)
    first, second = (pipeline.rows(plan, mesh, devices=g) for g in _processes(mesh))
    assert not set(first.tolist()) & set(second.tolist())
    assert sorted(first.tolist() + second.tolist()) == list(range(B))
    got = _assemble(pipeline, 0, plan, mesh, steps=4)  # epochs 0 and 1
    want = [pipeline.global_batch(b * B) for b in range(4)]
    _assert_batches_equal(got, want)


def test_a_dp8_run_resumes_under_dp2_tp4_and_one_process_at_the_same_batch():
    pipeline = Pipeline(_ids(45), B, seed=9)
    uninterrupted = _take(pipeline.batches(0), 5)
    dp8 = tx.make_mesh(data=8)
    saved_run = _assemble(pipeline, 0, tx.Plan(dp=tx.DP("data")), dp8, steps=3)
    _assert_batches_equal(saved_run, uninterrupted[:3])
    position = 3 * B  # `TrainState.data_position`: samples consumed

    dp2_tp4 = tx.make_mesh(data=2, model=4)
    plan = tx.Plan(dp=tx.DP("data"), tp=tx.TP("model"))
    resumed = _assemble(pipeline, position, plan, dp2_tp4, steps=2)
    _assert_batches_equal(resumed, uninterrupted[3:])
    one_process = _take(pipeline.batches(position, plan, dp2_tp4), 2)
    _assert_batches_equal(one_process, uninterrupted[3:])


# --- sources ------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.uint16, np.uint32])
def test_token_windows_of_a_file(tmp_path, dtype):
    tokens = (np.arange(1000) * 7919 % 50_000).astype(dtype)
    path = tmp_path / "train.bin"
    tokens.tofile(path)
    windows = TokenWindows(path, 32, dtype=dtype)
    assert len(windows) == (1000 - 33) // 32 + 1 == 31
    sample = windows[5]
    np.testing.assert_array_equal(sample["x"], tokens[160:192].astype(np.int32))
    np.testing.assert_array_equal(sample["y"], tokens[161:193].astype(np.int32))
    assert sample["x"].dtype == np.int32
    # read_batch gathers the same windows as __getitem__.
    batch = windows.read_batch(np.array([5, 0, 30]))
    for row, index in enumerate([5, 0, 30]):
        np.testing.assert_array_equal(batch["x"][row], windows[index]["x"])
        np.testing.assert_array_equal(batch["y"][row], windows[index]["y"])
    # Every start position, and a validation span.
    dense = TokenWindows(path, 32, dtype=dtype, stride=1)
    assert len(dense) == 1000 - 32
    np.testing.assert_array_equal(dense[967]["y"], tokens[968:1000].astype(np.int32))
    val = TokenWindows(path, 32, dtype=dtype, span=(0.9, 1.0))
    np.testing.assert_array_equal(val[0]["x"], tokens[900:932].astype(np.int32))
    assert len(val) == (100 - 33) // 32 + 1 == 3


def test_text_windows_are_the_bytes_of_the_file(tmp_path):
    text = "Première ligne.\nSecond line — with UTF-8.\n" * 4
    path = tmp_path / "input.txt"
    path.write_text(text, encoding="utf-8")
    raw = np.frombuffer(text.encode("utf-8"), np.uint8)
    windows = tx.data.TextWindows(path, 16)
    np.testing.assert_array_equal(windows[2]["x"], raw[32:48])
    np.testing.assert_array_equal(windows[2]["y"], raw[33:49])
    tokenizer = tx.data.ByteTokenizer()
    np.testing.assert_array_equal(tokenizer.encode(text), raw)
    assert tokenizer.decode(tokenizer.encode(text)) == text
    # A pipeline of text windows yields int32 (B, window) pairs.
    batch = Pipeline(windows, 4, seed=0).global_batch(0)
    assert batch["x"].shape == batch["y"].shape == (4, 16)
    np.testing.assert_array_equal(batch["x"][:, 1:], batch["y"][:, :-1])


def test_user_source_and_list_source():
    source = CountingSource(10)
    batch = Pipeline(source, 4, shuffle=False).global_batch(4)
    np.testing.assert_array_equal(batch["id"], [4, 5, 6, 7])
    np.testing.assert_array_equal(batch["x"][:, 0], [4, 5, 6, 7])
    listed = Pipeline([np.float32(i) for i in range(6)], 3, shuffle=False)
    np.testing.assert_array_equal(listed.global_batch(3), [3.0, 4.0, 5.0])


def test_padding_masks_the_last_partial_batch():
    pipeline = Pipeline(_ids(10), 4, epochs=1, drop_last=False, shuffle=False)
    assert pipeline.num_batches() == 3
    batches = list(pipeline)
    assert len(batches) == 3
    assert all(b["mask"].dtype == bool for b in batches)
    assert batches[1]["mask"].tolist() == [True] * 4
    last = batches[2]
    assert last["id"].tolist() == [8, 9, 0, 0]
    assert last["mask"].tolist() == [True, True, False, False]
    assert last["v"].tolist() == [[80, 81], [90, 91], [0, 0], [0, 0]]
    # A process whose rows are all padding gets zeros and a False mask.
    mesh = tx.make_mesh(data=2, model=4)
    plan = tx.Plan(dp=tx.DP("data"))
    second = _processes(mesh)[1]
    tail = list(pipeline.batches(8, plan, mesh, devices=second))
    assert len(tail) == 1
    assert tail[0]["id"].tolist() == [0, 0]
    assert tail[0]["mask"].tolist() == [False, False]
    # drop_last (the default) ends after the last full batch.
    dropped = Pipeline(_ids(10), 4, epochs=1, shuffle=False)
    assert dropped.num_batches() == 2 and len(list(dropped)) == 2
    assert "mask" not in dropped.global_batch(0)


def test_two_epochs_then_the_stream_ends():
    pipeline = Pipeline(_ids(12), 4, epochs=2, seed=6)
    ids = _flat_ids(list(pipeline))
    assert len(ids) == 24
    assert sorted(ids[:12]) == sorted(ids[12:]) == list(range(12))
    assert list(pipeline.batches(24)) == []  # resuming at the end: nothing left


def test_threads_and_worker_processes_read_the_same_batches(tmp_path):
    path = tmp_path / "train.bin"
    (np.arange(2000) % 251).astype(np.uint16).tofile(path)

    def make(**read) -> Pipeline:
        return Pipeline(TokenWindows(path, 8), 8, seed=3, **read)

    reference = _take(make(num_threads=0).batches(5), 6)
    assert reference[0]["x"].shape == (8, 8)
    with make(num_threads=3, prefetch=6).batches(5) as it:
        _assert_batches_equal(_take(it, 6), reference)
    # Grain's worker processes get the source (its path: they map the file again).
    with make(num_workers=2).batches(5) as it:
        _assert_batches_equal(_take(it, 6), reference)


def test_metadata_is_json_and_a_changed_order_warns_on_resume():
    pipeline = Pipeline(_ids(20), 4, seed=1)
    saved = json.loads(json.dumps(pipeline.metadata()))
    assert saved == {
        "source": "ArraySource",
        "samples_per_epoch": 20,
        "shuffle": True,
        "seed": 1,
        "epochs": None,
        "global_batch_size": 4,
        "drop_last": True,
        "order": "numpy",
    }
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Pipeline(_ids(20), 8, seed=1).check_resume(saved)  # positions count samples
    with pytest.warns(UserWarning, match=r"order changed \(seed: 1 -> 2\)"):
        Pipeline(_ids(20), 4, seed=2).check_resume(saved)


# --- bad input ----------------------------------------------------------------------


def test_token_file_of_a_partial_token(tmp_path):
    path = tmp_path / "train.bin"
    path.write_bytes(bytes(1001))
    with pytest.raises(
        DataError,
        match=r"Expected a file of whole uint16 tokens \(a multiple of 2 bytes\), "
        r"got 1001 bytes at .*train\.bin(.|\n)*Fix: Pass the dtype",
    ):
        TokenWindows(path, 8, dtype=np.uint16)
    with pytest.raises(DataError, match=r"Expected a token file at .*missing\.bin"):
        TokenWindows(tmp_path / "missing.bin", 8)


def test_window_longer_than_the_data(tmp_path):
    with pytest.raises(
        DataError,
        match=r"Expected at least window \+ 1 = 11 tokens .* got 10"
        r"(.|\n)*Fix: Use a `window` below 10",
    ):
        TokenWindows(np.arange(10), 10)
    path = tmp_path / "tiny.txt"
    path.write_text("0123456789" * 10)
    with pytest.raises(DataError, match=r"got 10 at .*tiny\.txt"):
        tx.data.TextWindows(path, 16, span=(0.9, 1.0))


def test_batch_size_the_data_axes_do_not_divide():
    pipeline = Pipeline(_ids(100), 12)
    mesh = tx.make_mesh(data=8)
    with pytest.raises(
        DataError,
        match=r"Expected a global batch size divisible by 8 \(data axes data=8\), "
        r"got 12\.\nFix: Use a global batch size that is a multiple of 8 "
        r"\(e\.g\. 8 or 16\)",
    ):
        pipeline.batches(0, tx.Plan(dp=tx.DP("data")), mesh)
    accumulating = tx.Plan(dp=tx.DP("data", accumulate_steps=2))
    with pytest.raises(
        DataError, match=r"divisible by 16 \(data axes data=8, times 2 microbatches"
    ):
        Pipeline(_ids(100), 8).batches(0, accumulating, mesh)
    # An evaluation stream need not split into microbatches.
    rows = Pipeline(_ids(100), 8).batches(0, accumulating, mesh, accumulate=False)
    assert next(rows)["id"].shape == (8,)


def test_empty_and_non_random_access_sources():
    with pytest.raises(
        DataError, match=r"Expected a source with at least one sample, got an empty"
    ):
        Pipeline([], 4)
    with pytest.raises(
        DataError,
        match=r"Expected a random-access source \(an object with `__len__` and "
        r"`__getitem__\(int\)`\), got generator\.\nFix: Collect the samples",
    ):
        Pipeline((i for i in range(3)), 1)
    with pytest.raises(DataError, match=r"same leading dim, got `x`: 3, `y`: 4"):
        ArraySource({"x": np.zeros(3), "y": np.zeros(4)})
    with pytest.raises(DataError, match=r"expects a non-empty dict of arrays"):
        ArraySource({})


def test_bad_pipeline_arguments():
    with pytest.raises(DataError, match=r"Expected at least one batch of 8 samples"):
        Pipeline(_ids(5), 8, epochs=1)
    with pytest.raises(DataError, match=r"`batch_size` expects an int >= 1, got 0"):
        Pipeline(_ids(5), 0)
    with pytest.raises(DataError, match=r"`seed` expects an int in \[0, 2\*\*32\)"):
        Pipeline(_ids(5), 1, seed=2**32)
    pipeline = Pipeline(_ids(10), 2, epochs=1)
    with pytest.raises(DataError, match=r"`start` expects an int >= 0, got -1"):
        pipeline.batches(-1)
    with pytest.raises(DataError, match=r"Expected `start` at most 10 .* got 12"):
        pipeline.batches(12)
    with pytest.raises(DataError, match=r"expects both `plan` and `mesh`"):
        pipeline.batches(0, tx.Plan(dp=tx.DP("data")))
    with pytest.raises(DataError, match=r"expected dict samples, got ndarray"):
        Pipeline([np.zeros(2)] * 3, 2, epochs=1, drop_last=False).global_batch(2)
    with pytest.raises(DataError, match=r"samples without a `mask` entry"):
        Pipeline({"mask": np.zeros(3)}, 2, epochs=1, drop_last=False).global_batch(0)


def test_public_names_are_documented():
    assert tx.DataError is DataError
    assert issubclass(DataError, tx.TitanaxError) and issubclass(DataError, ValueError)
    for name in tx.data.__all__:
        obj = getattr(tx.data, name)
        assert inspect.getdoc(obj), name
        if inspect.isclass(obj) and not issubclass(obj, BaseException):
            for attr, value in vars(obj).items():
                if not attr.startswith("_") and callable(value):
                    assert inspect.getdoc(value), f"{name}.{attr}"

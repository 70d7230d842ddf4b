"""Vector stores: the SQLite store with lmforge's IVF index and the PostgreSQL + pgvector store.

Every behaviour of the interface is checked on both backends (a real PostgreSQL with
pgvector, started by the `postgres_url` fixture), and both must give the same exact
results on the same data.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import numpy as np
import pytest

from lmforge.errors import LmforgeError
from lmforge.rag.store import open_store
from lmforge.rag.store.ann import IvfIndex, IvfParams, IvfState, retrain_reason, top_k, train_centroids
from lmforge.rag.store.base import check_filters, metadata_matches
from lmforge.rag.store.postgres import HnswParams
from lmforge.rag.types import Chunk

ROOT = Path(__file__).resolve().parents[1]
DIM = 32
BACKENDS = ["sqlite", "postgres"]


def clustered(n: int, seed: int, clusters: int = 12, dim: int = DIM, spread: float = 0.35) -> np.ndarray:
    """Unit vectors around a few random directions (embedding-like, unlike plain Gaussian noise)."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((clusters, dim))
    x = centers[rng.integers(0, clusters, n)] + spread * rng.standard_normal((n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def corpus(docs: int = 12, per_doc: int = 8, seed: int = 0):
    """(source, digest, chunks, vectors) per document, with varied metadata."""
    vectors = clustered(docs * per_doc, seed)
    out = []
    for d in range(docs):
        source = f"dir/doc{d:02d}.md"
        chunks = [Chunk(source=source, text=f"passage {i} of document {d}", headings=(f"Doc {d}", f"Part {i % 3}"),
                        line_start=1 + 10 * i, line_end=9 + 10 * i,
                        metadata={"title": f"Doc {d}", "lang": "en" if d % 3 else "zh", "n": i, "even": i % 2 == 0,
                                  "tags": ["kv", "cache"] if d % 4 == 0 else ["rag"], "zh_title": f"文件{d}"})
                  for i in range(per_doc)]
        out.append((source, f"sha-{d}", chunks, vectors[d * per_doc:(d + 1) * per_doc]))
    return out


@pytest.fixture
def location(request, tmp_path):
    """Where a fresh index lives: a SQLite file, or a fresh schema on the session's PostgreSQL."""
    if request.param == "sqlite":
        yield str(tmp_path / "index.sqlite")
        return
    url = request.getfixturevalue("postgres_url")
    schema = f"t_{uuid.uuid4().hex[:12]}"
    yield f"{url}?schema={schema}"
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")


def build(location: str, docs=None, **options):
    store = open_store(location, create=True, **options)
    store.set_meta(model_id="test-embedder", dim=DIM, normalized=True)
    with store.indexing():
        for doc in docs if docs is not None else corpus():
            store.replace_document(*doc)
    return store


def brute_force(docs, query: np.ndarray, k: int, filters=None) -> list[tuple[str, float]]:
    """The expected exact answer, computed here from the inputs."""
    rows = []
    q = query / np.linalg.norm(query)
    conditions = check_filters(filters)
    for source, _, chunks, vectors in docs:
        unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
        for chunk, v in zip(chunks, unit):
            if metadata_matches(chunk.metadata, chunk.source, conditions):
                rows.append((chunk.id, float(v @ q)))
    rows.sort(key=lambda r: (-r[1], r[0]))
    return rows[:k]


backends = pytest.mark.parametrize("location", BACKENDS, indirect=True)


@backends
def test_round_trip_of_chunks_metadata_and_documents(location):
    docs = corpus()
    with build(location, docs) as store:
        meta = store.meta
        assert meta["model_id"] == "test-embedder" and meta["dim"] == DIM and meta["normalized"] is True
        assert meta["format_version"] == 1 and meta["created"].startswith("20")
        assert store.count() == 96
        assert store.documents() == {source: digest for source, digest, _, _ in docs}
        every = [chunk for _, _, chunks, _ in docs for chunk in chunks]
        assert list(store.all_chunks()) == every  # ids, text, headings, lines and metadata (unicode) intact
        wanted = [every[40].id, "no-such-id", every[3].id]
        assert store.get(wanted) == [every[40], every[3]]


@backends
def test_replace_and_delete_documents(location):
    docs = corpus()
    with build(location, docs) as store:
        source, _, chunks, vectors = docs[2]
        shorter = [Chunk(source=source, text="rewritten", metadata={"lang": "en"})]
        store.replace_document(source, "sha-new", shorter, vectors[:1] * 3.0)
        assert store.documents()[source] == "sha-new"
        assert store.count() == 96 - 8 + 1
        assert store.get([c.id for c in chunks]) == []
        assert [c.text for c in store.all_chunks() if c.source == source] == ["rewritten"]
        store.delete_document(docs[0][0])
        store.delete_document("never-indexed.md")  # nothing to do, no error
        assert docs[0][0] not in store.documents() and store.count() == 81
        assert all(h.chunk.source != docs[0][0] for h in store.search(docs[0][3][0], k=20, exact=True))


@backends
def test_search_scores_are_cosine_similarities_in_order(location):
    docs = corpus()
    with build(location, docs) as store:
        query = np.random.default_rng(9).standard_normal(DIM) * 7.0  # not normalized: the store normalizes
        hits = store.search(query, k=10, exact=True)
        expected = brute_force(docs, query, 10)
        assert [h.chunk.id for h in hits] == [cid for cid, _ in expected]
        np.testing.assert_allclose([h.score for h in hits], [s for _, s in expected], atol=1e-5)
        assert [h.ranks for h in hits] == [{"dense": i} for i in range(1, 11)]
        # A stored vector finds its own chunk first, with similarity 1.
        top = store.search(docs[5][3][2], k=1)[0]
        assert top.chunk.id == docs[5][2][2].id and top.score == pytest.approx(1.0, abs=1e-5)


@backends
@pytest.mark.parametrize("exact", [True, False])
def test_filters_apply_before_top_k(location, exact):
    docs = corpus()
    query = clustered(1, seed=77)[0]
    cases = [
        ({"source": "dir/doc03.md"}, 8),
        ({"source": ["dir/doc03.md", "dir/doc07.md"]}, 16),
        ({"lang": "zh"}, 32),
        ({"lang": ["zh", "en"], "n": [0, 1.0]}, 24),  # 1.0 equals 1, as in JSON
        ({"tags": "cache"}, 24),  # an item of a list value
        ({"even": True}, 48),
        ({"n": True}, 0),  # a boolean is not the number 1
        ({"missing_key": "x"}, 0),
        ({"lang": []}, 0),
        ({"lang": "en", "tags": "kv", "n": 7}, 2),
    ]
    with build(location, docs) as store:
        for filters, passing in cases:
            hits = store.search(query, k=10, filters=filters, exact=exact)
            expected = brute_force(docs, query, 10, filters)
            assert len(expected) == min(10, passing), filters
            assert [h.chunk.id for h in hits] == [cid for cid, _ in expected], filters
        with pytest.raises(LmforgeError, match="plain metadata name"):
            store.search(query, filters={"a'b": 1})
        with pytest.raises(LmforgeError, match="values must be strings"):
            store.search(query, filters={"lang": {"nested": 1}})


def test_ivf_search_agrees_with_exact_and_updates_without_retraining(tmp_path):
    """Above `exact_below` the SQLite store trains its IVF index; new vectors join their nearest lists."""
    params = IvfParams(exact_below=300, seed=1)
    docs = corpus(docs=50, per_doc=10, seed=3)
    path = tmp_path / "index.sqlite"
    store = build(str(path), docs, ann_params=params)
    snap_index = store._current_snapshot().index
    assert snap_index is not None and snap_index.nlist == params.lists_for(500)
    queries = clustered(40, seed=11)
    found = sum(len({h.chunk.id for h in store.search(q, k=10)} & {h.chunk.id for h in store.search(q, k=10, exact=True)})
                for q in queries)
    assert found / 400 >= 0.9
    # Filtered: 330 chunks pass (more than exact_below: the IVF lists, masked); 80 pass (exact).
    for filters in ({"lang": "en"}, {"lang": "zh", "even": True}):
        found = 0
        for q in queries:
            hits = store.search(q, k=10, filters=filters)
            exact = store.search(q, k=10, filters=filters, exact=True)
            assert len(hits) == 10 and all(h.chunk.metadata["lang"] == filters["lang"] for h in hits)
            found += len({h.chunk.id for h in hits} & {h.chunk.id for h in exact})
        assert found / 400 >= 0.9, filters

    centroids = store._db.execute("SELECT value FROM ann WHERE key = 'centroids'").fetchone()[0]
    source, _, chunks, _ = docs[7]
    new_vectors = clustered(10, seed=99)
    store.replace_document(source, "sha-v2", chunks, new_vectors)
    state = IvfState.from_dict(__import__("json").loads(
        store._db.execute("SELECT value FROM ann WHERE key = 'state'").fetchone()[0]))
    assert store._db.execute("SELECT value FROM ann WHERE key = 'centroids'").fetchone()[0] == centroids
    assert state.added == 10 and state.removed == 10 and state.trained_n == 500
    assert store._db.execute("SELECT count(*) FROM vectors WHERE list IS NULL").fetchone()[0] == 0
    hit = store.search(new_vectors[4], k=1)[0]
    assert hit.chunk.id == chunks[4].id and hit.score == pytest.approx(1.0, abs=1e-5)

    # Vectors from somewhere else entirely (drift) make the next run retrain.
    far = clustered(60, seed=123, clusters=2, spread=0.05)
    far_docs = [(f"far{i}.md", "x", [Chunk(source=f"far{i}.md", text=f"far {i} {j}") for j in range(10)],
                 far[i * 10:(i + 1) * 10]) for i in range(6)]
    with store.indexing():
        for doc in far_docs:
            store.replace_document(*doc)
    state = IvfState.from_dict(__import__("json").loads(
        store._db.execute("SELECT value FROM ann WHERE key = 'state'").fetchone()[0]))
    assert state.trained_n == 560 and state.added == 0
    assert store._db.execute("SELECT value FROM ann WHERE key = 'centroids'").fetchone()[0] != centroids
    store.close()


def test_retrain_rules():
    params = IvfParams(exact_below=100)
    assert retrain_reason(None, 99, params) is None
    assert "exact-search limit" in retrain_reason(None, 100, params)
    trained = IvfState(nlist=20, trained_n=100, train_similarity=0.8)
    assert retrain_reason(trained, 150, params) is None
    assert "went from 100 to 201" in retrain_reason(trained, 201, params)
    close = IvfState(nlist=20, trained_n=1000, train_similarity=0.8, added=100, added_similarity=100 * 0.78)
    assert retrain_reason(close, 1000, params) is None
    drifted = IvfState(nlist=20, trained_n=1000, train_similarity=0.8, added=100, added_similarity=100 * 0.6)
    assert "fit the lists worse" in retrain_reason(drifted, 1000, params)
    with pytest.raises(LmforgeError, match="nprobe"):
        IvfParams(nprobe=-1)


def test_kmeans_finds_separated_clusters_and_top_k_keeps_ties():
    rng = np.random.default_rng(0)
    centers = np.eye(8, dtype=np.float32)[:4]
    x = np.repeat(centers, 50, axis=0) + 0.01 * rng.standard_normal((200, 8)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    found = train_centroids(x, 4, IvfParams(seed=3))
    assert np.allclose(np.sort(np.abs(found @ centers.T).max(axis=1)), 1.0, atol=1e-3)
    index = IvfIndex.build(found, x, (x @ found.T).argmax(1))
    positions, scores = index.search(centers[2], k=5, nprobe=1)
    assert set(positions.tolist()) <= set(range(100, 150)) and len(positions) >= 5
    # Only rows of another cluster allowed: the search goes on past the nearest list until it has k.
    allowed = np.zeros(200, dtype=bool)
    allowed[:50] = True
    positions, _ = index.search(centers[2], k=5, nprobe=1, allowed=allowed)
    assert len(positions) >= 5 and set(positions.tolist()) <= set(range(50))
    scores = np.array([0.5, 0.9, 0.7, 0.7, 0.1], dtype=np.float32)
    assert top_k(scores, 2).tolist() == [1, 2, 3]  # the tie at second place is kept
    assert top_k(scores, 10).tolist() == [1, 2, 3, 0, 4]


@backends
def test_model_mismatch_and_bad_inputs_are_clear_errors(location):
    docs = corpus(docs=2)
    with build(location, docs) as store:
        store.check_model("test-embedder")
        with pytest.raises(LmforgeError, match="index was built with embedding model test-embedder, not other/model"):
            store.check_model("other/model")
        with pytest.raises(LmforgeError, match="cannot switch to other/model"):
            store.set_meta(model_id="other/model", dim=DIM)
        source, digest, chunks, vectors = docs[0]
        with pytest.raises(LmforgeError, match=r"shape \(8, 32\)"):
            store.replace_document(source, digest, chunks, vectors[:, :16])
        with pytest.raises(LmforgeError, match="NaN"):
            store.replace_document(source, digest, chunks, np.full((8, DIM), np.nan))
        with pytest.raises(LmforgeError, match="all zeros"):
            store.replace_document(source, digest, chunks, np.zeros((8, DIM)))
        with pytest.raises(LmforgeError, match="two chunks with id"):
            store.replace_document(source, digest, [chunks[0], chunks[0]], vectors[:2])
        with pytest.raises(LmforgeError, match="32 dimensions"):
            store.search(np.ones(16))
        with pytest.raises(LmforgeError, match="positive number"):
            store.search(vectors[0], k=0)
        # A chunk id owned by another document: the failed write leaves the run (and index) as it was.
        with store.indexing():
            with pytest.raises(LmforgeError, match="already used"):
                store.replace_document("other.md", "d", [Chunk(source="other.md", text="x", id=chunks[0].id)],
                                       vectors[:1])
            store.replace_document("third.md", "d", [Chunk(source="third.md", text="y")], vectors[:1])
        assert sorted(store.documents()) == sorted([docs[0][0], docs[1][0], "third.md"])
        assert store.count() == 17


@backends
def test_reopen_and_closed_store(location):
    docs = corpus(docs=3)
    store = build(location, docs)
    before = [(h.chunk.id, round(h.score, 5)) for h in store.search(docs[1][3][0], k=5)]
    store.close()
    store.close()  # closing twice is fine
    with pytest.raises(LmforgeError, match="closed"):
        store.count()
    with open_store(location) as again:  # no create needed for an existing index
        assert again.count() == 24 and again.meta["model_id"] == "test-embedder"
        assert [(h.chunk.id, round(h.score, 5)) for h in again.search(docs[1][3][0], k=5)] == before
    with open_store(location, create=True) as again:  # create=True opens an existing index as it is
        assert again.count() == 24


def test_missing_and_foreign_files(tmp_path):
    with pytest.raises(LmforgeError, match="no index at .*missing.sqlite"):
        open_store(tmp_path / "missing.sqlite")
    assert not (tmp_path / "missing.sqlite").exists()
    junk = tmp_path / "notes.txt"
    junk.write_text("not a database at all, just some text that is long enough" * 20)
    with pytest.raises(LmforgeError, match="not an lmforge index"):
        open_store(junk)
    with pytest.raises(LmforgeError, match="is a directory"):
        open_store(tmp_path)
    with pytest.raises(LmforgeError, match="has no option"):
        open_store(tmp_path / "x.sqlite", create=True, hnsw=None)
    created = open_store(tmp_path / "deep" / "er" / "new.sqlite", create=True)
    assert created.count() == 0 and created.meta["format_version"] == 1 and created.search  # usable
    with pytest.raises(LmforgeError, match="set_meta"):
        created.replace_document("a.md", "d", [Chunk(source="a.md", text="t")], np.ones((1, 4)))
    created.close()


@backends
def test_reader_sees_the_committed_index_while_a_run_writes(location):
    docs = corpus()
    writer = build(location, docs[:6])
    readers = [open_store(location), open_store(location)]  # several readers at once
    query = docs[8][3][0]
    with writer.indexing():
        for doc in docs[6:]:
            writer.replace_document(*doc)
        writer.delete_document(docs[0][0])
        for reader in readers:  # not blocked, and they see the previous index whole
            assert reader.count() == 48 and len(reader.documents()) == 6
            assert all(h.chunk.source in {d[0] for d in docs[:6]} for h in reader.search(query, k=10))
    for reader in readers:
        assert reader.count() == 88 and docs[0][0] not in reader.documents()
        assert reader.search(query, k=1)[0].chunk.id == docs[8][2][0].id  # the new vectors are searched
        reader.close()
    writer.close()


@backends
@pytest.mark.parametrize("interrupt", [RuntimeError, KeyboardInterrupt])
def test_interrupted_run_leaves_the_previous_index(location, interrupt):
    docs = corpus()
    with build(location, docs[:6]) as store:
        before = (store.documents(), list(store.all_chunks()))
        with pytest.raises(interrupt):
            with store.indexing():
                store.replace_document(*docs[7])
                store.delete_document(docs[1][0])
                raise interrupt("stopped mid-run")
        assert (store.documents(), list(store.all_chunks())) == before
        assert {h.chunk.source for h in store.search(docs[7][3][0], k=48)} == {d[0] for d in docs[:6]}
        with store.indexing():  # and the index takes the next run as usual
            store.replace_document(*docs[7])
        assert store.count() == 56


CHILD = textwrap.dedent("""
    import sys, time
    import numpy as np
    from lmforge.rag.store import open_store
    from lmforge.rag.types import Chunk

    store = open_store(sys.argv[1])
    rng = np.random.default_rng(1)
    with store.indexing():
        store.delete_document("dir/doc00.md")
        for d in range(20):
            source = f"new/{d}.md"
            store.replace_document(source, "v", [Chunk(source=source, text=f"new {d} {i}") for i in range(30)],
                                   rng.standard_normal((30, {dim})))
        print("written", flush=True)
        time.sleep(120)  # killed here, inside the run
""")


@backends
def test_sigkill_mid_run_leaves_the_previous_index(location):
    docs = corpus()
    with build(location, docs) as store:
        before = (store.documents(), list(store.all_chunks()))
    child = subprocess.Popen([sys.executable, "-c", CHILD.replace("{dim}", str(DIM)), location], cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = child.stdout.readline()
        assert line.strip() == "written", child.stderr.read()
        os.kill(child.pid, signal.SIGKILL)
        assert child.wait(timeout=30) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    with open_store(location) as store:
        assert (store.documents(), list(store.all_chunks())) == before
        assert store.search(docs[0][3][1], k=1)[0].chunk.id == docs[0][2][1].id
        store.delete_document(docs[0][0])  # the dead writer holds no lock
        assert store.count() == 88


def test_unreachable_postgres_is_one_clear_error():
    with socket_closed_port() as port:
        url = f"postgresql://someone:hunter2secret@127.0.0.1:{port}/lmforge"
        with pytest.raises(LmforgeError) as info:
            open_store(url, connect_timeout=3)
    message = str(info.value)
    assert f"127.0.0.1:{port}" in message and "cannot connect to PostgreSQL" in message
    assert "hunter2secret" not in message and "\n" not in message
    with pytest.raises(LmforgeError, match="lower-case SQL name"):
        open_store("postgresql://u@127.0.0.1:1/db?schema=Bad;Name")


class socket_closed_port:
    """A port on 127.0.0.1 that nothing listens on (bound, then released)."""

    def __enter__(self) -> int:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    def __exit__(self, *exc) -> None:
        return None


def test_postgres_without_an_index_and_the_server_script(postgres_url, tmp_path):
    with pytest.raises(LmforgeError, match="no lmforge index in schema nothing_here"):
        open_store(f"{postgres_url}?schema=nothing_here")
    script = ROOT / "scripts" / "postgres.py"
    result = subprocess.run([sys.executable, str(script), "url", "--dir", str(tmp_path / "none")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and result.stderr.startswith("error: no PostgreSQL is running in")


def test_sqlite_and_postgres_give_the_same_results(tmp_path, postgres_url):
    import psycopg

    docs = corpus(docs=40, per_doc=10, seed=5)
    # Two chunks with identical vectors: equal scores, so both stores must order them by id.
    source, digest, chunks, vectors = docs[0]
    vectors[1] = vectors[0]
    schema = f"t_{uuid.uuid4().hex[:12]}"
    stores = [build(str(tmp_path / "a.sqlite"), docs, ann_params=IvfParams(exact_below=200)),
              build(f"{postgres_url}?schema={schema}", docs)]
    try:
        queries = np.concatenate([vectors[:1], clustered(30, seed=42)])
        overlap = {"sqlite": 0, "postgres": 0}
        for i, q in enumerate(queries):
            filters = [None, {"lang": "en"}, {"tags": "kv", "even": False}][i % 3]
            exact = [s.search(q, k=10, filters=filters, exact=True) for s in stores]
            assert [h.chunk.id for h in exact[0]] == [h.chunk.id for h in exact[1]]
            np.testing.assert_allclose([h.score for h in exact[0]], [h.score for h in exact[1]], atol=1e-5)
            truth = {h.chunk.id for h in exact[0]}
            for name, store in zip(overlap, stores):
                overlap[name] += len(truth & {h.chunk.id for h in store.search(q, k=10, filters=filters)})
        assert exact[0] and queries.shape[0] == 31
        # When the planner filters the HNSW scan's candidates (forced here: on a table this small it
        # prefers an exact plan), too few can pass; the exact rerun then returns all 10.
        narrow = {"lang": "zh", "even": False}  # a sixth of the chunks
        expected = [h.chunk.id for h in stores[0].search(queries[3], k=10, filters=narrow, exact=True)]
        with open_store(f"{postgres_url}?schema={schema}", hnsw=HnswParams(ef_search=1)) as forced:
            forced._db.execute("SET enable_bitmapscan = off")
            forced._db.execute("SET enable_sort = off")
            with forced._db.transaction():
                plan = "\n".join(row[0] for row in forced._db.execute(
                    "EXPLAIN SELECT id FROM chunks WHERE metadata @> %s::jsonb ORDER BY embedding <=> %s LIMIT 26",
                    ['{"lang": "zh"}', queries[3]]).fetchall())
            assert "Index Scan using chunks_embedding" in plan and "Filter" in plan, plan
            assert [h.chunk.id for h in forced.search(queries[3], k=10, filters=narrow)] == expected
        # psycopg prepares a statement run five times, and a prepared plan keeps the settings it
        # was planned under: exact search must still scan every row after many HNSW searches,
        # and HNSW searches must still use the index after many exact ones.
        def index_scans() -> int:
            stores[1]._db.execute("SELECT pg_stat_force_next_flush()")  # the searches' counts, now
            with psycopg.connect(postgres_url, autocommit=True) as conn:
                return conn.execute("SELECT idx_scan FROM pg_stat_user_indexes WHERE schemaname = %s AND "
                                    "indexrelname = 'chunks_embedding'", [schema]).fetchone()[0]

        stores[1]._db.execute("SET plan_cache_mode = force_generic_plan")  # what a larger table gets
        for exact_mode, runs in ((False, 12), (True, 12), (False, 12), (True, 4)):
            before = index_scans()
            for q in queries[:runs]:
                stores[1].search(q, k=10, exact=exact_mode)
            assert index_scans() - before == (0 if exact_mode else runs), exact_mode
        # The approximate query really goes through the HNSW index.
        with stores[1]._db.transaction():
            plan = "\n".join(row[0] for row in stores[1]._db.execute(
                "EXPLAIN SELECT id FROM chunks ORDER BY embedding <=> %s LIMIT 10", [queries[0]]).fetchall())
        assert "Index Scan using chunks_embedding" in plan, plan
        for name, found in overlap.items():  # approximate search: recall@10 against exact
            assert found / (10 * len(queries)) >= 0.9, (name, found)
        assert stores[0].search(vectors[0], k=2, exact=True)[1].chunk.id == \
            stores[1].search(vectors[0], k=2, exact=True)[1].chunk.id
    finally:
        for store in stores:
            store.close()
        with psycopg.connect(postgres_url, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")

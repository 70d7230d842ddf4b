"""Retrieval-augmented generation: embeddings, documents to chunks, vector stores, hybrid
retrieval and grounded answers with citations.

The pieces, each in its own module:

- `types`: `Chunk` (a cited passage with its source and line range) and `Hit` (a chunk a
  retriever returned, with its score).
"""

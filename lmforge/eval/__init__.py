"""Evaluation: perplexity, text metrics, benchmarks, judges and human-evaluation tooling."""

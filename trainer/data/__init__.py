"""Task-agnostic data pipeline: file readers and the bad-row policy -> cached tokenization with the
task's renderer -> token-budget sampler -> varlen (packed) micro-batches.

ingest.py    CSV / parquet / JSONL records, binary-file checks, the bad-row policy
render.py    tokenizer loading and fingerprint, budget truncation helpers
tokenize.py  TokenizedDataset and its content-hash cache
sampler.py   TokenBudgetSampler: per-step rows -> equal micro-batch counts per rank
collate.py   VarlenCollator -> PackedBatch (model inputs apart from bookkeeping), step loader

What a dataset means (schema, labels, prompt, augmentation) lives in trainer/tasks.
Uses the Gemma 2 tokenizer, subject to the Gemma Terms of Use (https://ai.google.dev/gemma/terms).
"""

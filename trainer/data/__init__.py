"""Data pipeline: ingest -> judge prompt -> cached tokenization -> token-budget sampler -> varlen batches.

Uses the Gemma 2 tokenizer, subject to the Gemma Terms of Use (https://ai.google.dev/gemma/terms).
"""
from trainer.data.ingest import ArenaRow, DataError, IngestReport, read_rows
from trainer.data.prompt import PromptBuilder, load_tokenizer
from trainer.data.sampler import MicroBatch, TokenBudgetSampler
from trainer.data.tokenize import TokenizedDataset, load_tokenized
from trainer.data.prepare import load_split, prepare_from_config
from trainer.data.collate import Item, Step, TokenizedTorchDataset, VarlenCollator, make_step_loader

__all__ = ["ArenaRow", "DataError", "IngestReport", "read_rows", "PromptBuilder", "load_tokenizer",
           "MicroBatch", "TokenBudgetSampler", "TokenizedDataset", "load_tokenized", "load_split",
           "prepare_from_config", "Item", "Step", "TokenizedTorchDataset", "VarlenCollator",
           "make_step_loader"]

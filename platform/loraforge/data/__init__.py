"""Data curation: pure batch ops (formats, ops, ledger) and the Ray Data pipeline that chains them.

`loraforge.data.pipeline.run_curate` runs the curate stage; `loraforge.data.io.read_conversations`
loads its output (or a JSONL file) for training.
"""

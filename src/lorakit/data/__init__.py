"""Data: files of rows -> tokenized samples with prompt masking -> (packed) batches.

    train, eval, stats = build_datasets(DataConfig(train="data.jsonl"), tokenizer)
    print(stats)
    for batch in make_batches(train, batch_size=8, pad_token_id=tokenizer.pad_token_id,
                              packing=False, max_seq_len=1024, shuffle=True, seed=0):
        loss = model(**batch_to_device(batch, device)).loss
"""

from lorakit.data.batching import batch_to_device, collate, collate_packed, make_batches, verify_packing
from lorakit.data.build import DataStats, build_datasets
from lorakit.data.config import FORMATS, DataConfig
from lorakit.data.templates import IGNORE_INDEX, render_chat

__all__ = ["DataConfig", "DataStats", "FORMATS", "IGNORE_INDEX", "batch_to_device", "build_datasets", "collate",
           "collate_packed", "make_batches", "render_chat", "verify_packing"]

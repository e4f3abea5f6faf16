"""lorakit models inside other libraries' training loops (transformers' Trainer, TRL's trainers).

Each module here imports the library it integrates with at the top, so import the one you use:
``lorakit.integrations.transformers`` (transformers' ``Trainer``) or ``lorakit.integrations.trl``
(TRL's ``SFTTrainer`` / ``DPOTrainer``). Neither imports peft.
"""

"""OpenAI-compatible HTTP serving of one base model with many LoRA adapters (``lorakit serve``).

FastAPI and uvicorn are imported only when a server is built, so ``import lorakit`` and
``lorakit --help`` stay fast: use ``lorakit.server.run.serve`` / ``lorakit.server.app.create_app``.
"""

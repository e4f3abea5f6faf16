"""Export what was trained: a GGUF model (merged), a GGUF LoRA adapter, an Ollama Modelfile.

    gguf_layout    transformers names -> llama.cpp's names, the q/k row permutation, architecture keys
    gguf_tokenizer the tokenizer as GGUF metadata (vocabulary, merges, special tokens, chat template)
    gguf_model     write a merged model (f16 / q8_0 / q4_0)
    gguf_adapter   write the adapter alone in llama.cpp's LoRA adapter layout
    ollama         the chat template as an Ollama TEMPLATE, and the Modelfile
    run            ``export(...)``: merge, write, Modelfile; what ``lorakit export`` calls
"""

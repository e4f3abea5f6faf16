import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def builtin_model_dir():
    """The built-in SmolLM2-135M-Instruct as a cached transformers directory."""
    from lorakit.models.load import builtin_gguf_path, gguf_to_transformers_dir

    return gguf_to_transformers_dir(builtin_gguf_path("smollm2-135m-instruct"))


@pytest.fixture(scope="session")
def smol_tokenizer(builtin_model_dir):
    """The real SmolLM2 tokenizer (with its chat template)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(builtin_model_dir)


def pytest_terminal_summary(terminalreporter):
    """Print what the long-proof tests counted (kills, generated cases, requests)."""
    from counters import COUNTS

    if COUNTS:
        terminalreporter.write_line("counts: " + ", ".join(f"{k} {v}" for k, v in sorted(COUNTS.items())))

"""lorakit's Trainer / TRL integration runs without peft: peft is a test reference only."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src" / "lorakit"

# sys.modules["peft"] = None is what an environment without peft looks like to every importer:
# `import peft` raises ImportError and importlib.util.find_spec("peft") is None, so transformers'
# and TRL's is_peft_available() say False and they take their no-peft paths too.
SCRIPT = textwrap.dedent("""
    import sys
    sys.modules["peft"] = None
    sys.path[:0] = [{tests!r}, {here!r}]
    from transformers.utils import is_peft_available
    assert not is_peft_available()
    import trainer_flow
    trainer_flow.main(__import__("pathlib").Path({out!r}), {tokenizer!r})
    assert sys.modules["peft"] is None and not [m for m in sys.modules if m.startswith("peft.")]
    print("flow ok without peft")
""")


def test_trainer_and_sft_flow_run_where_peft_cannot_be_imported(tmp_path, builtin_model_dir):
    here = Path(__file__).resolve().parent
    script = SCRIPT.format(tests=str(here.parent), here=str(here), out=str(tmp_path), tokenizer=str(builtin_model_dir))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "flow ok without peft" in done.stdout
    assert (tmp_path / "sft" / "adapter_config.json").is_file()


def test_no_lorakit_module_imports_peft():
    importers = []
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            if any(name == "peft" or name.startswith("peft.") for name in names):
                importers.append(f"{path.relative_to(SRC)}:{node.lineno}")
    assert not importers, importers

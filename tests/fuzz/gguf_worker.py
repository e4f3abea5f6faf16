"""A process that loads GGUF files for the GGUF fuzz suite, one path per stdin line.

It replies one JSON line per path on its original stdout (everything else it prints goes to
stderr): {"ok": true} or {"lorakit": message} or {"other": traceback}, plus "cache": the entries
left in the GGUF cache, which it then empties. Its address space is capped (``FUZZ_GGUF_MEMORY``
bytes, default 4 GiB) so that a file claiming huge sizes fails here, not on the machine.
A crash or a hang of this process is what the suite looks for; the parent watches for both.
"""

import json
import os
import resource
import shutil
import sys
import traceback

limit = int(os.environ.get("FUZZ_GGUF_MEMORY", 4 << 30))
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
replies = os.fdopen(os.dup(1), "w")
os.dup2(2, 1)  # print() and C-level writes to stdout go to stderr
sys.stdout = sys.stderr

import torch  # noqa: E402

from lorakit.errors import LorakitError  # noqa: E402
from lorakit.models.load import cache_dir, load_model  # noqa: E402


def load(path: str) -> dict:
    try:
        model, tokenizer = load_model(path)
        with torch.no_grad():
            model(input_ids=torch.tensor([[0, min(1, model.config.vocab_size - 1)]]))
        tokenizer("hello world")
        return {"ok": True}
    except LorakitError as err:
        return {"lorakit": str(err)}
    except BaseException:  # noqa: BLE001 - any other exception is the finding
        return {"other": traceback.format_exc(limit=-8)}


replies.write(json.dumps({"ready": True}) + "\n")
replies.flush()
for line in sys.stdin:
    result = load(json.loads(line)["path"])
    entries = cache_dir() / "gguf"
    result["cache"] = sorted(p.name for p in entries.iterdir()) if entries.is_dir() else []
    shutil.rmtree(entries, ignore_errors=True)
    replies.write(json.dumps(result) + "\n")
    replies.flush()

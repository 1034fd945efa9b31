"""The documentation's Python examples run as written (so they stay true)."""
import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
DOCS = ["docs/general.md"]


def _blocks():
    for doc in DOCS:
        text = (ROOT / doc).read_text()
        for i, code in enumerate(re.findall(r"```python\n(.*?)```", text, re.S)):
            if "model" in code and "model =" not in code:
                continue                        # a fragment about the reader's own model
            yield pytest.param(code, id=f"{doc}#{i}")


@pytest.mark.parametrize("code", list(_blocks()))
def test_doc_example_runs(code):
    torch.manual_seed(0)
    exec(compile(code, "<doc>", "exec"), {})

"""The README's Python example runs as written."""

from __future__ import annotations

import re

import pytest
from conftest import REPO


@pytest.mark.slow
def test_readme_python_example_runs():
    text = (REPO / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "README.md has no python example"
    for code in blocks:
        namespace: dict = {}
        exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["dF"].shape == namespace["x_t"].shape

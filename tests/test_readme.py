"""The README's Python examples run as written and compute what they claim."""

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_python_blocks_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python example"
    for block in blocks:
        namespace: dict = {}
        exec(compile(block, str(README), "exec"), namespace)  # noqa: S102 - our own README
    assert namespace["logits"].shape == (1, 3, 512)
    assert namespace["tokens"].shape == (1, 4)
    assert namespace["grad"].shape == (1, 3, 512)
    assert namespace["aligned"].shape == (1, 3, 512)

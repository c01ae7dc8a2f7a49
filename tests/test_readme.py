"""The README's library example runs as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example_runs(capsys):
    text = README.read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "README has no python example"
    code = blocks[0]
    ns: dict = {}
    exec(compile(code, "README.md", "exec"), ns)
    scores = ns["scores"]
    assert tuple(scores.shape) == (1000, 100)
    assert bool(scores.isfinite().all())
    # the same-class training digits should dominate the most helpful ones for test 0
    y = ns["y"]
    top = scores[:, 0].topk(20).indices
    assert (y[top] == y[1000]).float().mean() > 0.5

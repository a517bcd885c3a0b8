"""The README's Python example runs as written (on the embedded model) and does what its comments say."""

import re
from pathlib import Path

import numpy as np

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_block() -> str:
    section = README.read_text().split("## Python API", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_python_example_runs_and_keeps_its_promises(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(_python_block(), "README.md", "exec"), scope)  # noqa: S102 - our own documentation
    result, pipe, case = scope["result"], scope["pipe"], scope["case"]
    assert result.images.shape == (1, 64, 64, 3) and result.reconstructions.shape == (1, 64, 64, 3)
    assert result.nfe == 4  # "4 reverse calls decode [source, target] in one batch"
    assert (tmp_path / "out" / "inv.json").is_file()
    assert (tmp_path / "out" / "bench" / "inv4" / "results.json").is_file()
    assert scope["images"].shape == (1, 3, 64, 64)
    st = pipe.settings("icd", "edit")
    assert (st.guidance, st.tau, st.steps) == (1.0, 0.8, 4)  # "guidance 1, tau 0.8, 4 steps"
    outside = ~case.mask
    assert np.abs(result.images[0].astype(int) - case.source.astype(int))[outside].mean() < 20  # background kept

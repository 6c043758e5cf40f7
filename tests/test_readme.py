"""The README's Python snippets run as written: every variable defined, every import real."""
import os
import re
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import write_official_mat

README = Path(__file__).resolve().parents[1] / "README.md"
SNIPPETS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_the_readme_has_snippets():
    assert len(SNIPPETS) >= 2


@pytest.mark.parametrize("index", range(len(SNIPPETS)))
def test_readme_snippet_runs(index, tmp_path, monkeypatch):
    # the release's file is not copied here: one laid out like it (VGG pool5: 512 → 512 → 256) stands in
    write_official_mat(tmp_path / "vae_models" / "caffe_vae_weights_ucf101_split1_vgg19.mat", 512, (512,), 256,
                       np.random.default_rng(0))
    monkeypatch.chdir(tmp_path)
    exec(compile(SNIPPETS[index], f"README.md snippet {index}", "exec"), {"__name__": "readme"})
    assert os.getcwd() == str(tmp_path)

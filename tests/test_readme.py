"""README.md's "Use it from k-diffusion, EDM and diffusers" snippets run as written."""
from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parent.parent / "README.md"
SECTION = "## Use it from k-diffusion, EDM and diffusers"

# diffusers' schedulers call np.array on tensors in a way numpy 2 deprecates (not ours to fix)
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")


def snippets() -> list[str]:
    """The ```python blocks of the section, in order."""
    text = README.read_text()
    assert SECTION in text
    body = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", body, flags=re.S)


def test_the_section_has_its_three_snippets():
    blocks = snippets()
    assert len(blocks) == 3
    assert "k_diffusion" in blocks[0] and "integrations.edm" in blocks[1] and "integrations.diffusers" in blocks[2]


@pytest.mark.parametrize("i", range(3))
def test_snippet_runs(i, monkeypatch, request):
    code = snippets()[i]
    if "k_diffusion" in code:
        from test_conventions import _k_diffusion_sampling  # its released sampling.py, loaded by file

        sampling = _k_diffusion_sampling(monkeypatch)
        sys.modules["k_diffusion"].sampling = sampling
        monkeypatch.setitem(sys.modules, "k_diffusion.sampling", sampling)
    if "diffusers" in code:
        pytest.importorskip("diffusers", reason="the diffusers extra is not installed")
        # a tiny UNet's ops are too small to share: on a busy 2-core machine two OpenMP
        # threads made them ~70x slower (tests/test_diffusers.py, one_thread)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        request.addfinalizer(lambda: torch.set_num_threads(threads))
    scope: dict = {}
    exec(compile(code, f"README.md snippet {i + 1}", "exec"), scope)
    if i == 0:
        import optden

        run = optden.sample(scope["den"], solver="dpmpp2m", schedule=scope["sigmas"].tolist(), x_T=scope["x"],
                            labels=list(range(8)))
        assert float((run.samples - scope["samples"]).norm() / run.samples.norm()) <= 1e-9
    if i == 1:
        assert float(scope["dev"].optimal.mean.max()) < 1e-6
    if i == 2:
        assert scope["images"].shape == (4, 8, 8, 1) and scope["x"].shape == (4, 1, 8, 8)
        assert bool(scope["dev"].optimal.mean.isfinite().all())

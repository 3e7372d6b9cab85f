"""The supported transformers range and the version-dependent entry points (compat.py).

CI runs the scoring, feature-cache, prompt and one end-to-end test on the floor release and on one of
5.18-5.23 as well (.ci/transformers_versions.sh); these tests say what the range is and that the
entries pick the argument the installed release reads."""

import pathlib
import re

import pytest
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from mcvqa.machinery.compat import SUPPORTED_TRANSFORMERS, cache_argument, check_versions, transformers_version, version_problem
from mcvqa.core.modeling import unwrap_vlm

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_requirements_admit_exactly_the_supported_range():
    line = next(l for l in (ROOT / "requirements.txt").read_text().splitlines() if l.startswith("transformers"))
    spec = SpecifierSet(re.split(r"\s+#", line)[0][len("transformers"):])
    floor, ceiling = SUPPORTED_TRANSFORMERS
    assert floor in spec and Version("5.24.0") in spec and ceiling not in spec
    assert Version("4.57.6") not in spec


def test_ci_tests_the_floor_release():
    script = (ROOT / ".ci" / "transformers_versions.sh").read_text() + (ROOT / ".ci" / "run").read_text()
    assert str(SUPPORTED_TRANSFORMERS[0]) in script
    assert re.search(r"5\.(18|19|20|21|22|23)\.\d", script), "one of 5.18-5.23 (cache= was ignored there)"


def test_version_problem_names_the_range_and_the_fix():
    assert version_problem("5.0.0") is None and version_problem("5.24.0") is None
    message = version_problem("4.57.6")
    assert "transformers 4.57.6" in message and ">=5.0,<6" in message and "pip install" in message
    assert version_problem("6.0.0") is not None


def test_a_run_stops_on_an_unsupported_transformers(monkeypatch, capsys):
    import mcvqa.machinery.compat as compat

    assert check_versions()["transformers"] == str(transformers_version())
    assert "[versions] torch" in capsys.readouterr().out
    monkeypatch.setattr(compat, "transformers_version", lambda: Version("4.57.6"))
    with pytest.raises(RuntimeError, match=r"transformers 4\.57\.6 is installed.*Fix: pip install"):
        check_versions(verbose=False)


def test_cache_argument_is_the_keyword_the_installed_decoder_reads(tiny_model):
    """5.24 renamed past_key_values to cache; the decoder's **kwargs swallow the other name silently."""
    import inspect

    decoder = unwrap_vlm(tiny_model("qwen2_5_vl", False)).model.language_model
    name = cache_argument(decoder)
    assert name in inspect.signature(type(decoder).forward).parameters
    assert name == ("cache" if transformers_version() >= Version("5.24.0") else "past_key_values")


def test_the_model_loads_without_hub_kernels(tiny_cfg, hardware):
    """transformers 5.25 kernelizes every model by default, fetching kernel code from the Hub where a kernel
    exists for the device: offline (Kaggle), the load stopped on the GPU (BENCHMARKS.md run 40). On the CPU the
    default still marks the model kernelized, which is what this checks."""
    from mcvqa.core.modeling import load_base_model

    model = load_base_model(tiny_cfg("qwen2_5_vl"), hardware)
    assert getattr(model, "use_kernels", False) is False

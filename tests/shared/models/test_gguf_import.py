"""GGUF import of the real SmolLM2: config, tokenizer and the float32 reference against llama.cpp."""
from __future__ import annotations

import numpy as np
import pytest

from shared.assets import smollm2_gguf
from shared.errors import InvalidArgument
from shared.models.bundle import ModelDir
from shared.models.gguf_import import import_gguf, permute_rows, unpermute_rows
from shared.models.tokenizer import TextTokenizer, gguf_vocabulary


@pytest.fixture(scope="module")
def model(smollm2_dir) -> ModelDir:
    return ModelDir(smollm2_dir)


def test_config_matches_smollm2(model):
    config = model.config
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads,
            config.num_key_value_heads) == (576, 30, 9, 3)
    assert config.tie_word_embeddings and config.vocab_size == 49152
    assert config.parameter_count() == 134_515_008            # ASSETS.md: 134.5M


def test_permutation_round_trips():
    weight = np.arange(12 * 3, dtype=np.float32).reshape(12, 3)
    assert np.array_equal(unpermute_rows(permute_rows(weight, 2), 2), weight)
    assert not np.array_equal(permute_rows(weight, 2), weight)


def test_tokenizer_matches_llama_cpp_on_real_text(model, assets):
    import llama_cpp
    text = (assets / "data" / "eval.txt").read_text()[:20000]
    ours = TextTokenizer(model.tokenizer_path, model.tokenizer_config())
    llm = llama_cpp.Llama(str(smollm2_gguf()), vocab_only=True, verbose=False)
    assert ours.encode(text) == llm.tokenize(text.encode(), add_bos=False, special=False)
    assert ours.bos_id == llm.token_bos() == 1


def test_gguf_vocabulary_round_trips_the_original(model):
    import gguf
    reader = gguf.GGUFReader(smollm2_gguf())
    vocab = gguf_vocabulary(model.tokenizer_path, model.tokenizer_config(), model.config.vocab_size)
    assert vocab["tokens"] == list(reader.fields["tokenizer.ggml.tokens"].contents())
    assert vocab["token_types"] == list(reader.fields["tokenizer.ggml.token_type"].contents())
    assert vocab["merges"] == list(reader.fields["tokenizer.ggml.merges"].contents())
    assert vocab["pre"] == "smollm" and vocab["bos_token_id"] == 1 and vocab["eos_token_id"] == 2


def test_import_refuses_other_architectures(tmp_path):
    import gguf
    path = tmp_path / "other.gguf"
    writer = gguf.GGUFWriter(path, "phi3")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(InvalidArgument) as error:
        import_gguf(path, tmp_path / "out")
    assert error.value.reason == "UNKNOWN_MODEL_FORMAT" and "phi3" in error.value.message
    assert not (tmp_path / "out").exists()


def test_import_refuses_garbage(tmp_path):
    path = tmp_path / "broken.gguf"
    path.write_bytes(b"GGUF" + b"\xff" * 64)
    with pytest.raises(InvalidArgument) as error:
        import_gguf(path, tmp_path / "out")
    assert error.value.reason == "MALFORMED_MODEL"

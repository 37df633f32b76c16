"""Calibration data formats (shared/datasets.py): plain text, JSON Lines of text, JSON Lines of token ids
and `#edgeforge-token-ids` files give the same token stream and the same statistics; bad files are
refused with the field, the line and the offending id."""
from __future__ import annotations

import json

import numpy as np
import pytest

from services.calibrator.stats import CalibrationConfig, calibrate_tokens, tokenizer_of
from shared.datasets import TOKEN_IDS_MAGIC, load_text, load_tokens
from shared.errors import InvalidArgument
from shared.models.bundle import ModelDir

FIELD = "calibration.dataset"
VOCAB = 49152


@pytest.fixture(scope="module")
def model(tiny_model_dir) -> ModelDir:
    return ModelDir(tiny_model_dir)


@pytest.fixture(scope="module")
def text(assets) -> str:
    return (assets / "data" / "calib.txt").read_text()[:20_000]


def write_all_formats(directory, text: str, ids: list[int]) -> dict:
    files = {"text": directory / "calib.txt", "jsonl-text": directory / "calib.jsonl",
             "jsonl-tokens": directory / "calib-tokens.jsonl", "token-ids": directory / "calib.ids"}
    files["text"].write_text(text)
    files["jsonl-text"].write_text(json.dumps({"text": text}) + "\n")
    third = len(ids) // 3
    files["jsonl-tokens"].write_text("".join(json.dumps({"tokens": part}) + "\n\n"
                                             for part in (ids[:third], ids[third:2 * third], ids[2 * third:])))
    lines = [" ".join(map(str, ids[i:i + 17])) for i in range(0, len(ids), 17)]
    files["token-ids"].write_text(TOKEN_IDS_MAGIC + "\n" + "\n".join(lines) + "\n")
    return files


def test_every_format_gives_the_same_tokens_and_statistics(model, text, tmp_path):
    encode = tokenizer_of(model).encode
    ids = encode(text)
    files = write_all_formats(tmp_path, text, ids)
    streams = {kind: load_tokens(path, encode, vocab_size=VOCAB, field=FIELD) for kind, path in files.items()}
    assert all(stream == ids for stream in streams.values())
    config = CalibrationConfig(2, 32)
    reference = calibrate_tokens(model, streams["text"], config)
    for kind in ("jsonl-tokens", "token-ids"):
        other = calibrate_tokens(model, streams[kind], config)
        for (_, a), (_, b) in zip(reference.sites, other.sites):
            assert np.array_equal(a.hessian, b.hessian) and np.array_equal(a.value_range, b.value_range)


def test_text_callers_are_unchanged_and_token_files_are_not_text(text, tmp_path):
    plain = tmp_path / "a.txt"
    plain.write_text(text)
    assert load_text(plain) == text
    records = tmp_path / "a.jsonl"
    records.write_text('{"text": "one"}\n\n{"text": "two"}\n')
    assert load_text(records) == "one\n\ntwo"
    for body in (f"{TOKEN_IDS_MAGIC}\n1 2 3\n", '{"tokens": [1, 2, 3]}\n'):
        path = tmp_path / "ids"
        path.write_text(body)
        with pytest.raises(InvalidArgument, match="holds token ids") as error:
            load_text(path, "evaluation.dataset")
        assert error.value.field == "evaluation.dataset"


@pytest.mark.parametrize("body", ["", "   \n\n", f"{TOKEN_IDS_MAGIC}\n", f"{TOKEN_IDS_MAGIC}\n\n  \n",
                                  '{"tokens": []}\n', '{"text": "  "}\n'])
def test_empty_data_is_insufficient(body, model, tmp_path):
    path = tmp_path / "empty"
    path.write_text(body)
    with pytest.raises(InvalidArgument) as error:
        load_tokens(path, tokenizer_of(model).encode, vocab_size=VOCAB, field=FIELD)
    assert error.value.reason == "INSUFFICIENT_DATA" and error.value.field == FIELD


@pytest.mark.parametrize("body,message", [
    (f"{TOKEN_IDS_MAGIC}\n1 2 3\n4 five 6\n", "line 3: 'five' is not a token id"),
    (f"{TOKEN_IDS_MAGIC}\n1 2 3\n4 1.5\n", "line 3: '1.5' is not a token id"),
    (f"{TOKEN_IDS_MAGIC}\n1 -2 3\n", "line 2: token id -2 is negative"),
    (f"{TOKEN_IDS_MAGIC}\n1 2\n\n3 49152\n", r"line 4: token id 49152 is outside the model's vocabulary \[0, 49152\)"),
    ('{"tokens": [1, 2]}\n{"tokens": [3, 99999]}\n', "line 2: token id 99999 is outside"),
    ('{"tokens": [1, -7]}\n', "line 1: token id -7 is negative"),
    ('{"tokens": [1, "2"]}\n', 'line 1: token id "2" is not an integer'),
    ('{"tokens": [1, true]}\n', "line 1: token id true is not an integer"),
    ('{"tokens": [1, 2.0]}\n', "line 1: token id 2.0 is not an integer"),
    ('{"tokens": "1 2 3"}\n', 'line 1: "tokens" must be a list of integers, got str'),
    ('{"tokens": [1]}\n{"text": "words"}\n', 'line 2 has "text" but earlier lines have "tokens"'),
    ('{"tokens": [1]}\n{"ids": [2]}\n', 'line 2 has no string field "text" and no field "tokens"'),
    ('{"tokens": [1]}\nnot json\n', "line 2 is not JSON"),
])
def test_bad_token_ids_name_the_line(body, message, model, tmp_path):
    path = tmp_path / "bad"
    path.write_text(body)
    with pytest.raises(InvalidArgument, match=message) as error:
        load_tokens(path, tokenizer_of(model).encode, vocab_size=VOCAB, field=FIELD)
    assert error.value.field == FIELD and error.value.message.startswith(FIELD)


def test_text_encoded_outside_the_vocabulary_is_refused(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("words")
    with pytest.raises(InvalidArgument, match=r"token 1 has id 70000, outside the model's vocabulary \[0, 100\)"):
        load_tokens(path, lambda text: [3, 70000], vocab_size=100, field=FIELD)


def test_non_utf8_is_refused(tmp_path):
    path = tmp_path / "a.bin"
    path.write_bytes(b"ok \xff\xfe")
    with pytest.raises(InvalidArgument, match="not UTF-8 text") as error:
        load_tokens(path, lambda text: [], field=FIELD)
    assert error.value.field == FIELD

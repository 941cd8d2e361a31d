"""Bad input gets a clear Python exception, never a crash."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ferrolm import FormatError, Tokenizer, UnknownTokenError


def test_non_str_input(trained):
    with pytest.raises(TypeError, match="text must be a str, got bytes"):
        trained.encode(b"bytes")
    with pytest.raises(TypeError, match="got int"):
        trained.encode_ordinary(3)
    with pytest.raises(TypeError, match="texts\\[1\\] must be a str"):
        trained.encode_batch(["ok", None])
    with pytest.raises(TypeError, match="not a single str"):
        trained.encode_batch("abc")
    with pytest.raises(TypeError):
        trained.pre_tokenize(None)


def test_unknown_and_out_of_range_ids(trained):
    n = trained.n_vocab
    with pytest.raises(UnknownTokenError, match=f"token id {n} is not in the vocabulary"):
        trained.decode([1, n])
    with pytest.raises(KeyError):
        trained.decode([n + 5])
    with pytest.raises(ValueError):
        trained.decode([-1])
    with pytest.raises(UnknownTokenError):
        trained.decode([2**70])
    with pytest.raises(TypeError, match="ids must be ints"):
        trained.decode([1, "a"])
    with pytest.raises(UnknownTokenError):
        trained.decode_single_token_bytes(n)
    with pytest.raises(UnknownTokenError):
        trained.id_to_token(-3)
    with pytest.raises(UnknownTokenError):
        trained.token_to_id("definitely not a token \u4e2d")
    with pytest.raises(UnknownTokenError):
        trained.decode_batch([[1], [n]])
    # numpy and nested inputs work.
    assert trained.decode(np.array(trained.encode("abc"))) == "abc"


def test_special_token_errors(trained):
    with pytest.raises(ValueError, match='disallowed special token "<\\|endoftext\\|>"'):
        trained.encode("x <|endoftext|>")
    with pytest.raises(ValueError, match="not special tokens"):
        trained.encode("x", allowed_special={"<|nope|>"})
    assert trained.encode("x <|endoftext|>", disallowed_special=()) == trained.encode_ordinary("x <|endoftext|>")
    with pytest.raises(ValueError):
        trained.encode_batch(["fine", "<|pad|>"])


def test_malformed_tiktoken_files(tmp_path):
    cases = {
        "empty": b"",
        "no_rank": b"YQ==\n",
        "bad_base64": b"!!!! 0\n",
        "bad_rank": b"YQ== -1\n",
        "binary": b"\xff\xfe\x00garbage",
        "missing_bytes": b"".join(__import__("base64").b64encode(bytes([b])) + b" %d\n" % b for b in range(200)),
        "huge_rank": b"YQ== 4000000000\n",
    }
    for name, data in cases.items():
        p = tmp_path / f"{name}.tiktoken"
        p.write_bytes(data)
        with pytest.raises(FormatError):
            Tokenizer.from_tiktoken(p)
    with pytest.raises(FileNotFoundError):
        Tokenizer.from_tiktoken(tmp_path / "absent.tiktoken")


def test_malformed_hf_json(trained, tmp_path):
    good = json.loads(trained.to_hf_json())
    p = tmp_path / "t.json"
    text = json.dumps(good)
    p.write_text(text[: len(text) // 2])  # truncated
    with pytest.raises(FormatError, match="not valid JSON"):
        Tokenizer.from_hf_json(p)

    def broken(mutate):
        doc = json.loads(json.dumps(good))
        mutate(doc)
        p.write_text(json.dumps(doc))
        with pytest.raises(FormatError) as e:
            Tokenizer.from_hf_json(p)
        return str(e.value)

    assert "WordPiece" in broken(lambda d: d["model"].update(type="WordPiece"))
    assert "merges[0]" in broken(lambda d: d["model"]["merges"].__setitem__(0, "nosuch token"))
    assert "plausible token id" in broken(lambda d: d["model"]["vocab"].update({"a b\u4e2d": 10**9}))
    assert "normalizer" in broken(lambda d: d.update(normalizer={"type": "Precompiled"}))
    assert "add_prefix_space" in broken(lambda d: d["pre_tokenizer"].update(add_prefix_space="yes"))
    assert "pre_tokenizer" in broken(lambda d: d.update(pre_tokenizer={"type": "UnicodeScripts"}))
    # A vocabulary without some single bytes loads: HF drops such bytes (test_tokenizer_gguf.py).
    doc = json.loads(json.dumps(good))
    doc["model"]["vocab"].pop("\u0100")
    p.write_text(json.dumps(doc))
    assert Tokenizer.from_hf_json(p).encode("a\x00b") == trained.encode("a") + trained.encode("b")
    p.write_bytes(b"\xff\xfe")
    with pytest.raises(FormatError):
        Tokenizer.from_hf_json(p)


def test_bad_construction_arguments():
    with pytest.raises(ValueError, match="does not compile"):
        Tokenizer.train(["abc"], 300, pattern="(unclosed")
    with pytest.raises(ValueError, match="too small"):
        Tokenizer.train(["abc"], 100)
    with pytest.raises(TypeError, match="not a single str"):
        Tokenizer.train("some text", 300)
    with pytest.raises(TypeError, match="str \\(text\\) or os.PathLike"):
        Tokenizer.train([b"bytes"], 300)
    with pytest.raises(FileNotFoundError):
        from pathlib import Path

        Tokenizer.train([Path("/nonexistent/file.txt")], 300)
    with pytest.raises(TypeError):
        Tokenizer("not native")
    with pytest.raises(ValueError, match="both have id"):
        Tokenizer.from_ranks({bytes([b]): b for b in range(256)}, special_tokens={"<a>": 300, "<b>": 300})
    with pytest.raises(ValueError, match="already the ordinary token"):
        Tokenizer.from_ranks({bytes([b]): b for b in range(256)}, special_tokens={"<a>": 5})


def test_invalid_utf8_training_file(tmp_path):
    from pathlib import Path

    p = tmp_path / "bad.txt"
    p.write_bytes(b"hello \xff world")
    with pytest.raises(ValueError, match="not valid UTF-8 at byte 6"):
        Tokenizer.train([Path(p)], 300)


def test_padding_arguments(trained):
    with pytest.raises(ValueError, match="padding_side"):
        trained.encode_batch_to_numpy(["a"], padding_side="middle")
    with pytest.raises(ValueError, match="max_length"):
        trained.encode_batch_to_numpy(["a"], max_length=-1)
    ids, lengths = trained.encode_batch_to_numpy([])
    assert ids.shape == (0, 0) and lengths.shape == (0,)

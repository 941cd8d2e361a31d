"""ferrolm as an lm-evaluation-harness backend: ``--model ferrolm``.

lm-eval 0.4.x finds models in its own registry only (no entry points), so the backend is
registered when this module is imported. From the shell, run lm-eval through this module::

    python -m ferrolm.icl.lm_eval_backend --model ferrolm --model_args pretrained=smollm2 --tasks arc_easy

and from Python import it before asking lm-eval for the model::

    import ferrolm.icl.lm_eval_backend  # registers "ferrolm"
    lm_eval.simple_evaluate(model="ferrolm", model_args="pretrained=smollm2", tasks=[...])

Requests are encoded by lm-eval's own :class:`~lm_eval.api.model.TemplateLM` (the context's
trailing whitespace moved to the continuation, the pair encoded together, empty contexts given
the prefix token) with the model's tokenizer as transformers' ``encode(add_special_tokens=False)``
encodes, and scored by :class:`ferrolm.icl.LM` (prefix reuse, batched continuations; scores do not
depend on ``batch_size``). Rolling log-likelihoods use lm-eval's own windows.

``pretrained``: ``smollm2``, a ``.gguf`` file, a Hugging Face Llama/Qwen2 folder (run on
ferrolm's engine), a ferrolm checkpoint, or any other local Hugging Face causal LM folder (run by
transformers behind :class:`ferrolm.icl.LM`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, List, Optional, Tuple

from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from tqdm.auto import tqdm

from .lm import LM

__all__ = ["FerroLMEval", "special_token_ids"]


def special_token_ids(folder: Path, tokenizer) -> Tuple[Optional[int], Optional[int]]:
    """``(bos, eos)`` ids of a Hugging Face model folder as transformers' tokenizer sees them:
    the ``bos_token``/``eos_token`` of ``tokenizer_config.json`` (a string or ``{"content": ...}``),
    looked up in ``tokenizer``; None where the folder names none."""
    path = Path(folder) / "tokenizer_config.json"
    if not path.is_file():
        return None, None
    cfg = json.loads(path.read_text(encoding="utf-8"))
    out: List[Optional[int]] = []
    for name in ("bos_token", "eos_token"):
        t = cfg.get(name)
        t = t.get("content") if isinstance(t, dict) else t
        try:
            out.append(int(tokenizer.token_to_id(t)) if isinstance(t, str) else None)
        except KeyError:
            out.append(None)
    return out[0], out[1]


def _batch_size(value: Any) -> int:
    if value is None or value == "auto" or str(value).startswith("auto"):
        return 16
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"batch_size must be a positive int or 'auto', got {value!r}") from None
    if n < 1:
        raise ValueError(f"batch_size must be a positive int or 'auto', got {value!r}")
    return n


@register_model("ferrolm")
class FerroLMEval(TemplateLM):
    """lm-eval's ``LM`` interface on :class:`ferrolm.icl.LM`.

    Args (``--model_args``):
        pretrained: ``smollm2``, a ``.gguf`` file, a model folder or a ferrolm checkpoint.
        tokenizer: a tokenizer file (default: the model's own).
        batch_size: contexts / continuations per forward (``auto`` = 16); scores do not depend on it.
        max_length: the window (default: the model's).
        max_gen_toks: the default generation budget (256, as lm-eval's hf backend).
        prefix_token_id: the token an empty context becomes (default: bos, else eos).
        layers: keep only the first layers of a Llama (tests).
        dequantize: a GGUF model as float32 (its blocks dequantized) instead of kept quantized.

    Raises:
        FileNotFoundError: no model or no tokenizer there.
    """

    def __init__(
        self,
        pretrained: str = "smollm2",
        tokenizer: Optional[str] = None,
        batch_size: Any = 16,
        max_length: Optional[int] = None,
        max_gen_toks: int = 256,
        prefix_token_id: Optional[int] = None,
        layers: Optional[int] = None,
        device: Optional[str] = None,
        dequantize: Any = False,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        import torch

        from ..recipes.language_model import load_lm

        if device not in (None, "cpu") and not str(device).startswith("cpu"):
            raise ValueError(f"the ferrolm backend runs on the CPU; got device={device!r} (drop --device)")
        if isinstance(dequantize, str):  # model_args arrive as strings: dequantize=True
            if dequantize.lower() not in ("true", "false", "1", "0"):
                raise ValueError(f"dequantize must be true or false, got {dequantize!r}")
            dequantize = dequantize.lower() in ("true", "1")
        model, tok = load_lm(
            pretrained, tokenizer, layers=None if layers is None else int(layers), dequantize=bool(dequantize)
        )
        bos = getattr(tok, "bos_token_id", None)
        eos = getattr(tok, "eos_token_id", None)
        if Path(str(pretrained)).is_dir():
            bos2, eos2 = special_token_ids(Path(str(pretrained)), tok)
            bos, eos = (bos if bos is not None else bos2), (eos if eos is not None else eos2)
        eot = eos if eos is not None else (tok.special_tokens.get("<|endoftext|>"))
        if prefix_token_id is None:
            prefix_token_id = bos if bos is not None else eot
        if prefix_token_id is None:
            raise ValueError(
                f"the tokenizer of {pretrained} has no bos, eos or <|endoftext|> token for empty contexts; "
                "pass --model_args prefix_token_id=ID"
            )
        self._eot = eot if eot is not None else int(prefix_token_id)
        self.tokenizer = tok
        self.lm = LM(
            model.eval(),
            tok,
            max_length=None if max_length is None else int(max_length),
            batch_size=_batch_size(batch_size),
            prefix_token_id=int(prefix_token_id),
        )
        if self.lm.max_length is None:
            raise ValueError(f"{pretrained} has no window; pass --model_args max_length=N")
        self.max_gen_toks = int(max_gen_toks)
        self._device = torch.device("cpu")

    # ------------------------------------------------------------- lm-eval's hooks

    @property
    def eot_token_id(self) -> int:
        return int(self._eot)

    @property
    def prefix_token_id(self) -> int:
        return self.lm.prefix_token_id

    @property
    def max_length(self) -> int:
        return int(self.lm.max_length)  # type: ignore[arg-type]

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, **kwargs: Any) -> List[int]:
        """The ids of ``string`` with no bos added (transformers' ``add_special_tokens=False``)."""
        return self.lm.encode(string)

    def tok_decode(self, tokens: List[int], **kwargs: Any) -> str:
        return self.tokenizer.decode(list(tokens))

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs: Any) -> List[Tuple[float, bool]]:
        """``(logprob, is_greedy)`` of ``(key, context ids, continuation ids)`` requests."""
        scores = self.lm.loglikelihood([(ctx, cont) for _, ctx, cont in requests])
        out = []
        for (key, _, _), r in zip(requests, scores):
            pair = (r.logprob, r.is_greedy)
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, pair)
            out.append(pair)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> List[float]:
        """The log-likelihood of each whole text, in lm-eval's disjoint windows (each token
        predicted once; the first from the prefix token)."""
        windows, owner = [], []
        for i, (text,) in enumerate(tqdm([r.args for r in requests], disable=disable_tqdm, desc="rolling windows")):
            for ctx, cont in map(
                lm_utils.make_disjoint_window,
                lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(text),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                ),
            ):
                windows.append((None, ctx, cont))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (lp, _) in zip(owner, self._loglikelihood_tokens(windows)):
            totals[i] += lp
        for r, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", r.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> List[str]:
        """Greedy continuations cut at the request's stop strings (and the eos), as lm-eval's
        hf backend cuts them; requests with sampling options raise."""
        eos = self.tok_decode([self.eot_token_id])
        out = []
        for r in tqdm(requests, disable=disable_tqdm, desc="generate_until"):
            context, gen_kwargs = r.args
            kw = normalize_gen_kwargs(dict(gen_kwargs), self.max_gen_toks)
            until = handle_stop_sequences(kw.pop("until", None), eos=eos)
            n = int(kw.pop("max_gen_toks"))
            if kw.get("do_sample") or float(kw.get("temperature") or 0.0) > 0:
                raise ValueError(
                    f"the ferrolm backend decodes greedily; got do_sample={kw.get('do_sample')}, "
                    f"temperature={kw.get('temperature')} (use --gen_kwargs do_sample=False)"
                )
            text = self.lm.generate_until([(context, until, n)])[0]
            text = postprocess_generated_text(text, until, None)
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
            out.append(text)
        return out


def main(argv: Optional[List[str]] = None) -> None:
    """lm-eval's command line with ``--model ferrolm`` registered."""
    import sys

    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0]] + list(argv)
    cli_evaluate()


if __name__ == "__main__":
    main()

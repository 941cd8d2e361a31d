"""Tasks and prompts for in-context learning: examples loaded from JSONL / CSV / memory, and
templates that render demonstrations and a query the same way every time.

A template is plain ``str.format`` fields over an example's fields (``{input}``,
``{output}``/``{label}``, and any extra column); classification templates map labels to
label words (a verbalizer). Rendering never adds or strips whitespace on its own: the prompt
is exactly ``instruction + demo_1 + separator + ... + demo_k + separator + query``.

Example:
    >>> t = Template(demo="Review: {input}\\nSentiment:{label}", query="Review: {input}\\nSentiment:",
    ...              separator="\\n\\n", label_words={0: " negative", 1: " positive"})
    >>> t.render([Example("great", 1)], Example("awful", 0))
    'Review: great\\nSentiment: positive\\n\\nReview: awful\\nSentiment:'
"""

from __future__ import annotations

import csv
import io
import json
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

from .._io import PathLike, read_text

__all__ = ["Example", "Template", "load_examples"]


@dataclass(frozen=True)
class Example:
    """One task example: ``input``, ``output`` (a label or a target text) and extra fields."""

    input: str
    output: Any = None
    fields: Mapping[str, Any] = field(default_factory=dict)

    def values(self) -> Dict[str, Any]:
        """All fields by name; ``label`` is an alias of ``output``."""
        d = dict(self.fields)
        d["input"] = self.input
        d["output"] = self.output
        d.setdefault("label", self.output)
        return d


def _from_record(rec: Mapping[str, Any], where: str, input_key: str, output_key: Optional[str]) -> Example:
    if not isinstance(rec, Mapping):
        raise ValueError(f"{where}: expected an object with fields, got {type(rec).__name__}")
    if input_key not in rec:
        raise ValueError(f"{where}: missing field {input_key!r} (fields: {sorted(rec)})")
    keys = [output_key] if output_key else ["output", "label"]
    out_key = next((k for k in keys if k in rec), None)
    if out_key is None:
        raise ValueError(f"{where}: missing field {' or '.join(map(repr, keys))} (fields: {sorted(rec)})")
    extra = {k: v for k, v in rec.items() if k not in (input_key, out_key)}
    return Example(str(rec[input_key]), rec[out_key], extra)


def load_examples(
    source: Union[PathLike, Sequence[Mapping[str, Any]]], input_key: str = "input", output_key: Optional[str] = None
) -> List[Example]:
    """Examples from a ``.jsonl`` / ``.csv`` file or a list of dicts.

    Args:
        input_key: the field holding the input text. output_key: the field holding the
            output (default: ``output``, else ``label``).

    Raises:
        FileNotFoundError; ValueError naming the line of a malformed JSON line or a record
        without the input or output field.
    """
    if isinstance(source, (list, tuple)):
        return [_from_record(r, f"record {i}", input_key, output_key) for i, r in enumerate(source)]
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"no such dataset file: {path}")
    out: List[Example] = []
    text = read_text(path)
    if path.suffix.lower() == ".csv":
        return _csv_examples(path, text, input_key, output_key)
    with io.StringIO(text) as f:
        for i, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i}: not valid JSON ({e.msg} at column {e.colno})") from None
            out.append(_from_record(rec, f"{path}:{i}", input_key, output_key))
    return out


def _csv_examples(path: Path, text: str, input_key: str, output_key: Optional[str]) -> List[Example]:
    """The rows of a CSV file as examples; a row whose cell count differs from the header's is
    a ValueError naming ``file:line`` (not a missing output or cells under the key None)."""
    reader = csv.reader(io.StringIO(text, newline=""))
    header = next(reader, None)
    if header is None:
        raise ValueError(f"{path} is empty; expected a header row naming the columns")
    out: List[Example] = []
    line = reader.line_num + 1  # where the next row starts (a quoted cell may span lines)
    for row in reader:
        if row:  # blank lines are skipped, as csv.DictReader does
            if len(row) != len(header):
                raise ValueError(
                    f"{path}:{line}: the row has {len(row)} cells but the header has {len(header)} "
                    f"({', '.join(header)}); quote cells that contain commas"
                )
            out.append(_from_record(dict(zip(header, row)), f"{path}:{line}", input_key, output_key))
        line = reader.line_num + 1
    return out


@dataclass(frozen=True)
class Template:
    """How demonstrations and the query become one prompt.

    Args:
        demo: format of a demonstration, e.g. ``"Q: {input}\\nA: {output}"``.
        query: format of the query (without its answer), e.g. ``"Q: {input}\\nA:"``.
        separator: between demonstrations and before the query.
        instruction: text at the very start (may be empty).
        label_words: label -> the words the model should continue with (classification).
            ``{label}`` / ``{output}`` in ``demo`` render the label word exactly as given, so
            put its leading space in the word (``" positive"``) and none in the template
            (``"...Sentiment:{label}"``); the query then ends at ``"Sentiment:"`` and each
            choice is scored as the continuation ``" positive"`` / ``" negative"``.
    """

    demo: str = "{input}\n{output}"
    query: str = "{input}\n"
    separator: str = "\n\n"
    instruction: str = ""
    label_words: Optional[Mapping[Any, str]] = None

    def __post_init__(self) -> None:
        for name in ("demo", "query", "separator", "instruction"):
            if not isinstance(getattr(self, name), str):
                raise TypeError(f"Template.{name} must be a str")
        for name in ("demo", "query"):
            try:
                parsed = list(string.Formatter().parse(getattr(self, name)))
            except ValueError as e:
                raise ValueError(f"Template.{name} is not a valid format string: {e}") from None
            for _, fname, spec, _ in parsed:
                if fname is not None and not fname.isidentifier():  # no {}, {0}, {input.attr}, {input[0]}
                    raise ValueError(
                        f"Template.{name} has the field {{{fname}}}: fields are plain names such as {{input}} or "
                        "{label} (no positions, attributes or indexing); write a literal brace as {{ or }}"
                    )
                if spec and "{" in spec:
                    raise ValueError(f"Template.{name} has a nested field in the format spec {spec!r}")
        if self.label_words is not None and len(self.label_words) == 0:
            raise ValueError(
                "Template.label_words is empty: classification needs a word for each label (at least one choice)"
            )

    def fields(self, which: str) -> List[str]:
        """The field names ``demo`` or ``query`` refers to."""
        return [f for _, f, _, _ in string.Formatter().parse(getattr(self, which)) if f]

    def _values(self, ex: Example) -> Dict[str, Any]:
        v = ex.values()
        if self.label_words is not None and ex.output is not None:
            if ex.output not in self.label_words:
                raise ValueError(
                    f"label {ex.output!r} has no label word; label_words has {sorted(map(repr, self.label_words))}"
                )
            v["output"] = v["label"] = self.label_words[ex.output]
        return v

    def _format(self, which: str, ex: Example) -> str:
        v = self._values(ex)
        try:
            return getattr(self, which).format(**v)
        except KeyError as e:
            raise ValueError(
                f"Template.{which} refers to field {e.args[0]!r}, which the example lacks (fields: {sorted(v)})"
            ) from None

    def render_demo(self, ex: Example) -> str:
        return self._format("demo", ex)

    def render_query(self, ex: Example) -> str:
        return self._format("query", ex)

    def render(self, demos: Sequence[Example], query: Example) -> str:
        """``instruction + demo_1 + separator + ... + demo_k + separator + query``."""
        parts = [self.render_demo(d) for d in demos] + [self.render_query(query)]
        return self.instruction + self.separator.join(parts)

    def choices(self) -> List[Any]:
        """The labels, in the order of ``label_words``."""
        if self.label_words is None:
            raise ValueError("this template has no label_words (needed for classification)")
        return list(self.label_words)

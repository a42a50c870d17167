"""Caption tokenisation for the COCO metrics: a pure-Python approximation of the Stanford PTBTokenizer as
pycocoevalcap runs it (`-preserveLines -lowerCase`, then its punctuation tokens removed), and the Java path.

What is unusual:
  * pycocoevalcap drops these tokens after tokenising: '' ' `` ` -LRB- -RRB- -LCB- -RCB- . ? ! , : - -- ... ;
    so most punctuation disappears; clitics are split off ("don't" -> "do n't", "man's" -> "man 's").
  * The Python version ("ptb-approx") keeps hyphenated and slashed words whole, keeps decimal and grouped numbers
    ("3.5", "1,000"), dotted abbreviations ("u.s.") and a few titles ("mr.", "etc.") whole, splits other symbols
    ($ % # & + = ...) into their own tokens, and writes brackets as -lrb- -rrb- -lsb- -rsb- -lcb- -rcb- (lower-cased
    by Java, hence *not* removed by pycocoevalcap's upper-case list). On ordinary captions (and on OFA's
    punctuation-stripped ones) it gives the Java tokens exactly; tests/metrics check a list of cases.
  * `tokenize(..., backend="auto")` uses Java when `java` is on PATH and pycocoevalcap is installed.
"""
from __future__ import annotations

import re
import shutil

PTB_REMOVED = {"''", "'", "``", "`", "-lrb-", "-rrb-", "-lcb-", "-rcb-", ".", "?", "!", ",", ":", "-", "--",
               "...", ";"}
_CLITIC = re.compile(r"(?<=\w)(n't|'s|'m|'re|'ve|'ll|'d)\b")
_CANT = re.compile(r"\b(can)(not)\b")
_ABBREV = r"(?:mr|mrs|ms|dr|st|jr|sr|etc|vs|inc|co|ltd|mt|ft|approx)\.(?!\w)"
_TOKEN = re.compile(r"""
    (?:[a-z]\.){2,}                         # dotted abbreviation u.s.
  | """ + _ABBREV + r"""                  # mr. etc.
  | \d+(?:[.,:/]\d+)+                       # 3.5  1,000  10:30  1/2
  | n't | '(?:s|m|re|ve|ll|d)\b            # clitics (split off above)
  | \w+(?:[-/&']\w+)*                       # words, hyphenated or slashed words
  | \.\.\.+ | --+                           # ellipsis, dashes
  | \S                                      # any other single symbol
""", re.X)
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}


def ptb_tokenize_py(text: str) -> list[str]:
    """One caption -> PTB-style tokens with pycocoevalcap's punctuation tokens removed (lower-cased)."""
    t = text.lower().replace("\u2019", "'").replace("\u201c", '"').replace("\u201d", '"')
    t = _CANT.sub(r"\1 \2", t)
    t = _CLITIC.sub(r" \1", t)
    out = []
    for tok in _TOKEN.findall(t):
        if tok in PTB_REMOVED or tok == '"' or set(tok) <= {".", "-"}:
            continue
        out.append(_BRACKETS.get(tok, tok))
    return out


def java_available() -> bool:
    if shutil.which("java") is None:
        return False
    try:
        import pycocoevalcap.tokenizer.ptbtokenizer  # noqa: F401
    except ImportError:
        return False
    return True


def _tokenize_java(captions: dict[object, list[str]]) -> dict[object, list[str]]:
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    keys = list(captions)
    keymap = {str(i): k for i, k in enumerate(keys)}         # PTBTokenizer wants plain keys
    inp = {str(i): [{"caption": c} for c in captions[k]] for i, k in enumerate(keys)}
    out = PTBTokenizer().tokenize(inp)
    return {keymap[i]: v for i, v in out.items()}


def tokenize(captions: dict[object, list[str]], backend: str = "auto") -> tuple[dict[object, list[str]], str]:
    """{key: [caption, ...]} -> ({key: [space-joined tokens, ...]}, backend used).

    backend: "python" (ptb-approx), "java" (pycocoevalcap's PTBTokenizer), "auto" (java when available),
    "none" (whitespace split of lower-cased text: OFA's validation-time CIDEr on punctuation-stripped text)."""
    if backend == "auto":
        backend = "java" if java_available() else "python"
    if backend == "java":
        return _tokenize_java(captions), "ptb-java"
    if backend == "python":
        return {k: [" ".join(ptb_tokenize_py(c)) for c in v] for k, v in captions.items()}, "ptb-approx"
    if backend == "none":
        return {k: [" ".join(c.lower().split()) for c in v] for k, v in captions.items()}, "whitespace"
    raise ValueError(f"tokenizer backend must be auto, python, java or none, got {backend!r}")

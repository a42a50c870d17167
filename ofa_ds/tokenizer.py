"""OFA text tokenizer: text <-> *fairseq dictionary indices* (the ids the OFA checkpoints were trained with).

What is unusual compared with a plain GPT-2 / BERT tokenizer (contract: OFA reference, section 2):

* The ids are fairseq ``Dictionary`` indices, not GPT-2 ids.  English text goes through GPT-2 byte-level BPE (the
  ``tokenizers`` package, checked in the tests against a pure-Python GPT-2 merge loop), and each GPT-2 id ``g`` is then
  looked up as the *string* ``str(g)`` in ``assets/bpe/dict.txt``: index = 4 + line number.  Indices 0..3 are
  ``<s> <pad> </s> <unk>``; after dict.txt come ``<mask>``, 8192 ``<code_N>`` and 1000 ``<bin_N>`` symbols
  (59457 in all; 30325 for the BERT-Chinese dictionary ``lang="zh"``).
* Literal ``<bin_N>``, ``<code_N>`` and ``<mask>`` substrings in the text are not BPE'd: they map straight to their
  indices (as OFA does with ``encode_text(..., use_bpe=False)``).  Whitespace right before such a token is only a
  separator and is dropped; text after it keeps its leading space (``"<bin_4> person"`` -> ``<bin_4>``, ``Ġperson``).
  An unknown literal (``<bin_5000>``) becomes ``<unk>`` like fairseq's ``encode_line``.
* ``decode`` writes such symbols (and ``<unk>``, ``madeupword*``, and ``<s>``/``</s>`` when not skipped) literally,
  preceded by one space unless at the start, so that ``encode(decode(ids)) == ids`` for ordinary sequences.
* The CN ``dict.txt`` has lines whose symbol is U+2028 in ``vocab.txt``; it is parsed by splitting on ``\\n`` only.
  CN decoding follows HF ``BertTokenizer``: wordpieces joined by spaces (``" ##"`` removed), then the usual
  ``clean_up_tokenization`` (so Chinese characters come back space-separated, as in OFA).
"""
from __future__ import annotations

import functools
import os
import re
from typing import Iterable, List, Optional, Sequence

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

NUM_BINS = 1000
CODE_DICT_SIZE = 8192
_ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
_LITERAL_RE = re.compile(r"<(?:bin|code)_\d+>|<mask>")
_CLEANUP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
            (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


def bin_index(v: float, max_image_size: float = 512, num_bins: int = NUM_BINS) -> int:
    """Quantise a pixel coordinate of the resized image: round(v / max_image_size * (num_bins - 1)), clamped."""
    b = int(round(float(v) / max_image_size * (num_bins - 1)))
    return min(max(b, 0), num_bins - 1)


def box_to_bin_tokens(box: Sequence[float], max_image_size: float = 512, num_bins: int = NUM_BINS) -> str:
    """``(x0, y0, x1, y1)`` in resized-image pixels -> ``"<bin_a> <bin_b> <bin_c> <bin_d>"``."""
    if len(box) != 4:
        raise ValueError(f"box must have 4 coordinates (x0, y0, x1, y1), got {len(box)}")
    return " ".join(f"<bin_{bin_index(v, max_image_size, num_bins)}>" for v in box)


def _read_fairseq_dict(path: str) -> List[str]:
    """Symbols of a fairseq dict.txt (``<symbol> <count>``, split on the last space; lines split on '\\n' only)."""
    with open(path, encoding="utf-8", newline="") as f:
        lines = f.read().split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line.rstrip("\r").rsplit(" ", 1)[0] for line in lines]


def _gpt2_byte_decoder() -> dict:
    """Inverse of GPT-2's byte -> printable-unicode map."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    mapping, n = {}, 0
    for b in range(256):
        if b in keep:
            mapping[chr(b)] = b
        else:
            mapping[chr(256 + n)] = b
            n += 1
    return mapping


class OFATokenizer:
    bos, pad, eos, unk = 0, 1, 2, 3
    num_bins = NUM_BINS
    code_dict_size = CODE_DICT_SIZE

    def __init__(self, lang: str = "en"):
        if lang not in ("en", "zh"):
            raise ValueError(f"lang must be 'en' or 'zh', got {lang!r}")
        self.lang = lang
        sub = "bpe" if lang == "en" else "bert_cn"
        base = _read_fairseq_dict(os.path.join(_ASSETS, sub, "dict.txt"))
        self.symbols: List[str] = (["<s>", "<pad>", "</s>", "<unk>"] + base + ["<mask>"]
                                   + [f"<code_{i}>" for i in range(CODE_DICT_SIZE)]
                                   + [f"<bin_{i}>" for i in range(NUM_BINS)])
        self._index = {}
        for i, s in enumerate(self.symbols):
            self._index.setdefault(s, i)
        self.vocab_size = len(self.symbols)
        self.mask = 4 + len(base)
        self.code_offset = self.vocab_size - NUM_BINS - CODE_DICT_SIZE
        self.bin_offset = self.vocab_size - NUM_BINS
        if lang == "en":
            tk = Tokenizer(models.BPE.from_file(os.path.join(_ASSETS, sub, "encoder.json"),
                                                os.path.join(_ASSETS, sub, "vocab.bpe")))
            tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
            tk.decoder = decoders.ByteLevel()
            vocab = tk.get_vocab()
            self._g2s = [""] * len(vocab)  # GPT-2 id -> its byte-level string ('Ġwhat')
            for s, g in vocab.items():
                self._g2s[g] = s
            self._g2f = [self.unk] * len(vocab)  # GPT-2 id -> fairseq index
            self._f2g = [-1] * self.vocab_size  # fairseq index -> GPT-2 id (-1: not a BPE symbol)
            for i, s in enumerate(base):
                if s.isdigit() and int(s) < len(vocab):
                    self._g2f[int(s)] = 4 + i
                    self._f2g[4 + i] = int(s)
            self._byte_dec = _gpt2_byte_decoder()
        else:
            vocab_txt = os.path.join(_ASSETS, sub, "vocab.txt")
            with open(vocab_txt, encoding="utf-8", newline="") as f:
                words = f.read().split("\n")
            wp_vocab = {}
            for i, w in enumerate(words):
                if w:
                    wp_vocab.setdefault(w, i)
            tk = Tokenizer(models.WordPiece(wp_vocab, unk_token="[UNK]", max_input_chars_per_word=100))
            # BERT-Chinese defaults with do_lower_case=True: clean text, split CJK chars, lowercase + strip accents.
            tk.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                                       strip_accents=None, lowercase=True)
            tk.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        self._tk = tk

    # ---------------------------------------------------------------- symbols
    def __len__(self) -> int:
        return self.vocab_size

    def index(self, symbol: str) -> int:
        return self._index.get(symbol, self.unk)

    def is_bin(self, i: int) -> bool:
        return self.bin_offset <= int(i) < self.vocab_size

    def is_code(self, i: int) -> bool:
        return self.code_offset <= int(i) < self.bin_offset

    def code_to_id(self, c: int) -> int:
        if not 0 <= int(c) < CODE_DICT_SIZE:
            raise ValueError(f"image code {c} outside [0, {CODE_DICT_SIZE})")
        return self.code_offset + int(c)

    def id_to_code(self, i: int) -> int:
        if not self.is_code(i):
            raise ValueError(f"index {i} is not an image-code token")
        return int(i) - self.code_offset

    # ---------------------------------------------------------------- encode
    def _encode_plain(self, text: str) -> List[int]:
        if not text:
            return []
        enc = self._tk.encode(text, add_special_tokens=False)
        if self.lang == "en":
            g2f = self._g2f
            return [g2f[g] for g in enc.ids]
        return [self._index.get(t, self.unk) for t in enc.tokens]

    def encode(self, text: str, max_len: Optional[int] = None) -> List[int]:
        """Text -> fairseq indices, without bos/eos; truncated to the first ``max_len`` when given."""
        if not isinstance(text, str):
            raise TypeError(f"OFATokenizer.encode expects a str, got {type(text).__name__}")
        ids: List[int] = []
        pos = 0
        for m in _LITERAL_RE.finditer(text):
            ids += self._encode_plain(text[pos:m.start()].rstrip())
            ids.append(self._index.get(m.group(), self.unk))
            pos = m.end()
        ids += self._encode_plain(text[pos:])
        return ids if max_len is None else ids[:max_len]

    def encode_batch(self, texts: Iterable[str], max_len: Optional[int] = None) -> List[List[int]]:
        return [self.encode(t, max_len) for t in texts]

    # ---------------------------------------------------------------- decode
    def _bpe_to_text(self, gids: List[int]) -> str:
        bd = self._byte_dec
        return bytes(bd[c] for g in gids for c in self._g2s[g]).decode("utf-8", errors="replace")

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        """Fairseq indices -> text (pad always dropped, bos/eos dropped when ``skip_special``)."""
        drop = {self.pad, self.bos, self.eos} if skip_special else {self.pad}
        ids = [int(i) for i in ids]
        if self.lang == "zh":
            toks = [self.symbols[i] if 0 <= i < self.vocab_size else "<unk>" for i in ids if i not in drop]
            out = " ".join(toks).replace(" ##", "").strip()
            for a, b in _CLEANUP:
                out = out.replace(a, b)
            return out
        out, run = "", []
        for i in ids:
            if i in drop:
                continue
            g = self._f2g[i] if 0 <= i < self.vocab_size else -1
            if g >= 0:
                run.append(g)
                continue
            if run:
                out += self._bpe_to_text(run)
                run = []
            sym = self.symbols[i] if 0 <= i < self.vocab_size else "<unk>"
            out += (" " if out and not out[-1].isspace() else "") + sym
        if run:
            out += self._bpe_to_text(run)
        return out

    # ---------------------------------------------------------------- word starts (BART span masking)
    def is_word_start(self, ids: Iterable[int]) -> List[bool]:
        """Fairseq's ``is_beginning_of_word``: nspecial (0..3) and madeupword* are starts; a BPE token is one when its
        text starts with a space ('Ġ'); <mask>/<code_N>/<bin_N> decode to themselves, so they are not (as in OFA)."""
        res = []
        for i in ids:
            i = int(i)
            if i < 4:
                res.append(True)
                continue
            sym = self.symbols[i]
            if sym.startswith("madeupword"):
                res.append(True)
            elif self.lang == "en":
                g = self._f2g[i]
                res.append(g >= 0 and self._g2s[g].startswith("Ġ"))
            else:
                res.append(not sym.startswith("##"))
        return res

    # ---------------------------------------------------------------- boxes
    def box_to_ids(self, box: Sequence[float], max_image_size: float = 512) -> List[int]:
        return [self.bin_offset + bin_index(v, max_image_size) for v in box]

    def ids_to_box(self, ids: Sequence[int], max_image_size: float = 512, w_ratio: float = 1.0,
                   h_ratio: float = 1.0) -> List[float]:
        """4 bin tokens -> (x0, y0, x1, y1) in original-image pixels: b / (num_bins - 1) * max_image_size / ratio."""
        ids = [int(i) for i in ids][:4]  # like OFA, non-bin predictions are not rejected (they give junk boxes)
        if len(ids) != 4:
            raise ValueError(f"expected 4 bin tokens, got {ids}")
        vals = [(i - self.bin_offset) / (NUM_BINS - 1) * max_image_size for i in ids]
        return [vals[0] / w_ratio, vals[1] / h_ratio, vals[2] / w_ratio, vals[3] / h_ratio]


def get_tokenizer(lang: str = "en") -> OFATokenizer:
    """Shared, cached tokenizer (built once per process and language; data loaders should call this)."""
    return _cached_tokenizer(lang)


@functools.lru_cache(maxsize=None)
def _cached_tokenizer(lang: str) -> OFATokenizer:
    return OFATokenizer(lang)

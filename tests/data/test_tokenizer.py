"""OFATokenizer: reference test vectors (docs/ofa.md#tokenization), vocabulary layout, literal special tokens,
boxes, CN."""
import json
import os
import random

import pytest

from ofa_ds.tokenizer import OFATokenizer, bin_index, box_to_bin_tokens, get_tokenizer

BPE_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "ofa_ds", "assets", "bpe")


@pytest.fixture(scope="module")
def tok():
    return get_tokenizer("en")


@pytest.fixture(scope="module")
def zh():
    return get_tokenizer("zh")


VECTORS = [
    (" what does the image describe?", [99, 473, 5, 2274, 6190, 116]),
    (' what is the complete text of " "?', [99, 16, 5, 1498, 2788, 9, 22, 22, 116]),
    (' which region does the text " a man " describe?', [61, 976, 473, 5, 2788, 22, 10, 313, 22, 6190, 116]),
    (" what is the image in the middle part?", [99, 16, 5, 2274, 11, 5, 1692, 233, 116]),
    (" what are the objects in the image?", [99, 32, 5, 8720, 11, 5, 2274, 116]),
    ("  what does the region describe? region:", [1437, 99, 473, 5, 976, 6190, 116, 976, 35]),
    (" what is the complete image? caption: a dog", [99, 16, 5, 1498, 2274, 116, 3747, 35, 10, 2335]),
    (" yes", [4420]), (" no", [117]), (" maybe", [2085]),
]


@pytest.mark.parametrize("text,ids", VECTORS)
def test_reference_vectors(tok, text, ids):
    assert tok.encode(text) == ids
    assert tok.decode(ids) == text


def test_caption_prompt_and_layout(tok):
    assert OFATokenizer().encode(" what does the image describe?") == [99, 473, 5, 2274, 6190, 116]
    assert (tok.bos, tok.pad, tok.eos, tok.unk) == (0, 1, 2, 3)
    assert tok.symbols[:5] == ["<s>", "<pad>", "</s>", "<unk>", "13"]
    assert tok.symbols[50261:50264] == ["madeupword0000", "madeupword0001", "madeupword0002"]
    assert (tok.vocab_size, len(tok), tok.mask, tok.code_offset, tok.bin_offset) == (59457, 59457, 50264, 50265, 58457)
    assert (tok.num_bins, tok.code_dict_size) == (1000, 8192)
    assert tok.code_offset == tok.vocab_size - 8192 - 1000 and tok.bin_offset == tok.vocab_size - 1000
    assert tok.index("<mask>") == 50264 and tok.index("<code_5>") == 50270 and tok.index("<bin_17>") == 58474
    assert tok.symbols[58474] == "<bin_17>" and tok.symbols[-1] == "<bin_999>" and tok.index("nope") == 3
    assert tok.code_to_id(5) == 50270 and tok.id_to_code(50270) == 5
    assert tok.is_bin(58457) and tok.is_bin(59456) and not tok.is_bin(58456) and not tok.is_bin(3)
    with pytest.raises(ValueError):
        tok.code_to_id(8192)
    assert get_tokenizer() is get_tokenizer("en")


def test_literal_special_tokens(tok):
    prompt = "  what does the region describe? region: <bin_1> <bin_2> <bin_3> <bin_4>"
    assert tok.encode(prompt) == [1437, 99, 473, 5, 976, 6190, 116, 976, 35, 58458, 58459, 58460, 58461]
    assert tok.decode(tok.encode(prompt)) == prompt
    # detection-style target: bins then " {class}" with its own leading space
    assert tok.encode("<bin_0> <bin_1> <bin_2> <bin_999> person") == [58457, 58458, 58459, 59456,
                                                                       tok.encode(" person")[0]]
    assert tok.encode("<code_0><code_8191> <mask>") == [50265, 58456, 50264]
    assert tok.encode("<bin_1000> <bin_01>") == [3, 3]  # unknown literals -> <unk>, like fairseq encode_line
    assert tok.encode("<bin_x>") == tok._encode_plain("<bin_x>")  # not a literal: BPE'd
    assert tok.decode([0, 99, 2, 1, 1], skip_special=False) == "<s> what </s>"
    assert tok.decode([0, 99, 2, 1, 1]) == " what"


def test_max_len_batch_and_bad_input(tok):
    assert tok.encode(" what does the image describe?", max_len=3) == [99, 473, 5]
    assert tok.encode_batch([" yes", " no", ""]) == [[4420], [117], []]
    for bad in (None, b" yes", 5, [" yes"]):
        with pytest.raises(TypeError, match="expects a str"):
            tok.encode(bad)
    with pytest.raises(ValueError):
        OFATokenizer(lang="fr")


ROUND_TRIP = ["", " ", "hello", " a dog on a skateboard.", "Ünïcödé façade — naïve café", " 日本語のテキスト",
              " 😀🎉 emoji 👩‍👩‍👧", "tabs\tand\nnewlines\r\n", "   many   spaces   ", "مرحبا بالعالم",
              "<|endoftext|>", " a <mask> cat", "x <code_7> y <bin_500> z"]


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size and i != 3 for i in ids)
    assert tok.decode(ids) == text


def test_decode_partial_bytes_and_torch(tok):
    import torch
    ids = tok.encode(" 😀")
    assert len(ids) > 1
    assert isinstance(tok.decode(ids[:-1]), str)  # incomplete UTF-8 -> replacement char, no crash
    assert tok.decode(torch.tensor([0] + ids + [2])) == " 😀"


def test_word_starts(tok):
    ids = tok.encode(" hello world antidisestablishmentarianism")
    starts = tok.is_word_start(ids)
    assert starts[:3] == [True, True, True] and len(ids) > 3 and not any(starts[3:])
    assert tok.is_word_start([0, 1, 2, 3, 50261]) == [True] * 5
    assert tok.is_word_start(tok.encode("hello")) == [False]
    assert tok.is_word_start([tok.mask, 50265, 58457]) == [False] * 3  # decode to '<...>', as in OFA's fairseq


def test_boxes(tok):
    assert bin_index(0) == 0 and bin_index(512) == 999 and bin_index(600) == 999 and bin_index(-3) == 0
    assert box_to_bin_tokens([0, 0, 512, 512]) == "<bin_0> <bin_0> <bin_999> <bin_999>"
    rng = random.Random(0)
    width = 512 / 999
    for _ in range(100):
        x0, x1 = sorted(rng.uniform(0, 512) for _ in range(2))
        y0, y1 = sorted(rng.uniform(0, 512) for _ in range(2))
        box = [x0, y0, x1, y1]
        ids = tok.box_to_ids(box)
        assert ids == tok.encode(box_to_bin_tokens(box)) and all(tok.is_bin(i) for i in ids)
        assert all(abs(a - b) <= width / 2 + 1e-9 for a, b in zip(tok.ids_to_box(ids), box))
        # original image 640x480 squashed to 512x512: decode with per-axis ratios
        wr, hr = 512 / 640, 512 / 480
        orig = tok.ids_to_box(ids, w_ratio=wr, h_ratio=hr)
        assert all(abs(o - b / r) <= width / 2 / r + 1e-9 for o, b, r in zip(orig, box, (wr, hr, wr, hr)))
    assert tok.ids_to_box([58457, 58457, 59456, 59456]) == [0.0, 0.0, 512.0, 512.0]


# ---------------------------------------------------------------- Chinese
def test_zh_layout(zh):
    assert (zh.vocab_size, zh.mask, zh.code_offset, zh.bin_offset) == (30325, 21132, 21133, 29325)
    assert [zh.index(s) for s in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")] == [4, 104, 105, 106, 107]
    assert zh.symbols[4 + 343] == "" and zh.symbols[4 + 13502] == "##"  # the U+2028 lines of vocab.txt


def test_zh_encode(zh):
    text = "图片描述了什么内容?"
    ids = zh.encode(text)
    assert len(ids) == len(text) and all(4 <= i < 21132 and i != 104 for i in ids)
    out = zh.decode([0] + ids + [2])
    assert out == "图 片 描 述 了 什 么 内 容?" and out.replace(" ", "") == text
    assert zh.encode("HELLO Café") == zh.encode("hello cafe")  # do_lower_case + accent stripping
    assert zh.encode("这段文字<bin_3>") == zh.encode("这段文字") + [29328]
    assert zh.encode("\u2028") == [] and zh.encode("☃️🦄") == [104] and zh.encode("☃ 🦄") == [104, 104]
    ids = zh.encode(" playing 好")
    assert [zh.symbols[i] for i in ids] == ["play", "##ing", "好"] and zh.is_word_start(ids) == [True, False, True]
    assert zh.decode(ids) == "playing 好"


# ---------------------------------------------------------------- pure-Python GPT-2 reference
def _gpt2_reference():
    regex = pytest.importorskip("regex")
    encoder = json.load(open(os.path.join(BPE_DIR, "encoder.json"), encoding="utf-8"))
    merges = open(os.path.join(BPE_DIR, "vocab.bpe"), encoding="utf-8").read().split("\n")[1:]
    ranks = {tuple(m.split()): r for r, m in enumerate(merges) if m}
    printable = [b for b in range(256) if 33 <= b <= 126 or 161 <= b <= 172 or 174 <= b <= 255]
    others = [b for b in range(256) if b not in printable]
    byte_map = {**{b: chr(b) for b in printable}, **{b: chr(256 + k) for k, b in enumerate(others)}}
    pat = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")

    def bpe(word):
        parts = list(word)
        while len(parts) > 1:
            pair = min(zip(parts, parts[1:]), key=lambda p: ranks.get(p, float("inf")))
            if pair not in ranks:
                break
            merged, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == pair:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        return parts

    def encode(text):
        return [encoder[p] for w in pat.findall(text) for p in bpe("".join(byte_map[b] for b in w.encode("utf-8")))]
    return encode


REF_STRINGS = [
    " what does the image describe?", "  what", "Hello, World!", "I'm can't won't they'll we've you'd she's",
    "THEY'RE 'S 'LL", "12345 678.90 3,000,000", "abc123def 4ever", "   leading", "trailing   ", "a  b   c",
    "line1\nline2\n\nline3", "tab\tseparated\tvalues", "\r\n windows", "\u00a0non-breaking\u00a0space",
    "\u3000ideographic",
    "naïve café résumé", "Straße Ärger Öl", "Привет, мир!", "Γειά σου Κόσμε", "שלום עולם", "مرحبا", "नमस्ते दुनिया",
    "你好，世界！", "こんにちは世界", "안녕하세요", "ไทย ภาษา", "😀😃😄 emoji", "👩‍👩‍👧 family", "🇫🇷 flag",
    "e\u0301 combining",
    "~!@#$%^&*()_+`-=[]{}|;:,./<>?", "...!!!???", "--double--dash--", "http://example.com/a?b=c&d=e",
    "email@example.com", "C++ and C# and F#", "x² + y³ = z½", "Ⅻ roman ⅷ", "١٢٣ arabic digits", "snake_case_name",
    "camelCaseName", "ALLCAPS WORD", "a" * 60, " " * 7, "\u200bzero\u200bwidth", "<|endoftext|>", "madeupword0000",
    "'", "'s'", "  \n  ", "🦄🦄🦄unicorn", "ǅ titlecase", "\x00\x01 control", "mixed 中文 and English 123",
]


def test_library_matches_reference_bpe(tok):
    ref = _gpt2_reference()
    assert len(REF_STRINGS) >= 50
    for s in REF_STRINGS:
        expected = [tok._g2f[g] for g in ref(s)]
        assert tok.encode(s) == expected, s
        assert tok.decode(expected) == s, s

"""Import speed: rows/s of `python -m ofa_ds.data import ...` on generated inputs in the public formats, with the
images kept as their bytes and shrunk with --max-side. Rows go to benchmarks/results/import.csv (with this machine's
fp32 GEMM peak measured in the same run: timings from different machines are not comparable).

    python benchmarks/bench_import.py [--images 200] [--text-rows 100000] [--csv import.csv]

Images are 640x480 JPEGs (COCO's typical size; ImageNet's 500x375): 5 captions, 3 VQA questions with 10 answers and
2 referring expressions per image; the text importers
(gigaword, GLUE QQP) read line pairs / rows of a few words. Timing is in-process, from the first record read to the
last file renamed (Python start-up excluded).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
from contextlib import redirect_stderr

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from benchmarks.common import append_csv, base_row, gemm_peak_gflops  # noqa: E402
from ofa_ds.data.__main__ import main as data_main  # noqa: E402


def _jpeg(rng, path: str, w: int = 640, h: int = 480) -> None:
    a = (rng.random((h // 8, w // 8, 3)) * 255).astype(np.uint8)
    Image.fromarray(a).resize((w, h), Image.BILINEAR).save(path, quality=90)


def make_karpathy(root: str, n: int) -> str:
    rng = np.random.default_rng(0)
    os.makedirs(os.path.join(root, "train2014"), exist_ok=True)
    images = []
    for i in range(n):
        name = f"COCO_train2014_{i:012d}.jpg"
        _jpeg(rng, os.path.join(root, "train2014", name))
        images.append({"filepath": "train2014", "filename": name, "imgid": i, "cocoid": i, "split": "train",
                       "sentences": [{"raw": f"a photo number {i} with thing {k}.", "sentid": 5 * i + k}
                                     for k in range(5)]})
    path = os.path.join(root, "dataset_coco.json")
    with open(path, "w") as f:
        json.dump({"images": images, "dataset": "coco"}, f)
    return path


def make_vqa(root: str, n: int) -> tuple[str, str]:
    """VQA v2 questions/annotations over the caption importer's COCO images: 3 questions per image, 10 answers."""
    qs, anns = [], []
    for i in range(n):
        for k in range(3):
            qid = 10 * i + k
            qs.append({"image_id": i, "question": f"what color is thing {k}?", "question_id": qid})
            answers = [{"answer": ("red", "blue", "green")[(j + k) % 3], "answer_confidence": "yes", "answer_id": j + 1}
                       for j in range(10)]
            anns.append({"question_id": qid, "image_id": i, "question_type": "what color is the",
                         "answer_type": "other", "multiple_choice_answer": answers[0]["answer"], "answers": answers})
    q, a = os.path.join(root, "questions.json"), os.path.join(root, "annotations.json")
    with open(q, "w") as f:
        json.dump({"questions": qs}, f)
    with open(a, "w") as f:
        json.dump({"annotations": anns}, f)
    return q, a


def make_refcoco(root: str, n: int) -> str:
    """refs(unc).p + instances.json over the caption importer's COCO images: 2 expressions per image."""
    import pickle
    folder = os.path.join(root, "refcoco")
    os.makedirs(folder, exist_ok=True)
    refs = [{"ref_id": i, "ann_id": 1000 + i, "image_id": i, "split": "train", "category_id": 1,
             "file_name": f"COCO_train2014_{i:012d}_{1000 + i}.jpg", "sent_ids": [2 * i, 2 * i + 1],
             "sentences": [{"sent": f"left thing {i}", "raw": f"Left thing {i}", "tokens": ["left", "thing"],
                            "sent_id": 2 * i + k} for k in range(2)]} for i in range(n)]
    with open(os.path.join(folder, "refs(unc).p"), "wb") as f:
        pickle.dump(refs, f, protocol=2)
    inst = {"images": [{"id": i, "file_name": f"COCO_train2014_{i:012d}.jpg", "width": 640, "height": 480}
                       for i in range(n)],
            "annotations": [{"id": 1000 + i, "image_id": i, "bbox": [10.0, 20.0, 200.0, 100.0], "category_id": 1}
                            for i in range(n)],
            "categories": [{"id": 1, "name": "thing"}]}
    with open(os.path.join(folder, "instances.json"), "w") as f:
        json.dump(inst, f)
    return folder


def make_imagenet(root: str, n: int) -> tuple[str, str]:
    rng = np.random.default_rng(1)
    os.makedirs(root, exist_ok=True)
    words = os.path.join(root, "synset_words.txt")
    with open(words, "w") as f:
        f.write("n01440764 tench, Tinca tinca\nn01443537 goldfish, Carassius auratus\n")
    for k, syn in enumerate(("n01440764", "n01443537")):
        os.makedirs(os.path.join(root, "train", syn), exist_ok=True)
        for i in range(n // 2):
            _jpeg(rng, os.path.join(root, "train", syn, f"{syn}_{i}.JPEG"), 500, 375)
    return words, os.path.join(root, "train")


def make_gigaword(root: str, n: int) -> tuple[str, str]:
    src, tgt = os.path.join(root, "train.src.txt"), os.path.join(root, "train.tgt.txt")
    with open(src, "w") as a, open(tgt, "w") as b:
        for i in range(n):
            a.write(f"the council said on monday that item {i} of the budget would be cut by half .\n")
            b.write(f"council cuts item {i}\n")
    return src, tgt


def make_qqp(root: str, n: int) -> str:
    d = os.path.join(root, "QQP")
    os.makedirs(d, exist_ok=True)
    for split, rows in (("train", n), ("dev", max(1, n // 10))):
        with open(os.path.join(d, f"{split}.tsv"), "w") as f:
            f.write("id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n")
            for i in range(rows):
                f.write(f"{i}\t{2 * i}\t{2 * i + 1}\thow do i learn python {i}?\twhat is the best way to learn "
                        f"python {i}?\t{i % 2}\n")
    return root


def timed(argv: list[str], out: str) -> tuple[float, int]:
    """Seconds and rows written of one import."""
    err = io.StringIO()
    t0 = time.perf_counter()
    with redirect_stderr(err):
        code = data_main(["import", *argv, "--out", out])
    dt = time.perf_counter() - t0
    if code != 0:
        raise RuntimeError(f"import {' '.join(argv)} failed ({code}): {err.getvalue()[-500:]}")
    summary = [line for line in err.getvalue().splitlines() if line.startswith("rows written:")][-1]
    return dt, int(summary.split()[2])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=200, help="images per image importer")
    p.add_argument("--text-rows", type=int, default=100_000)
    p.add_argument("--csv", default="import.csv")
    a = p.parse_args()
    peak = gemm_peak_gflops()
    with tempfile.TemporaryDirectory() as tmp:
        karpathy = make_karpathy(os.path.join(tmp, "coco"), a.images)
        questions, annotations = make_vqa(os.path.join(tmp, "coco"), a.images)
        refs = make_refcoco(tmp, a.images)
        words, train = make_imagenet(os.path.join(tmp, "imagenet"), a.images)
        src, tgt = make_gigaword(tmp, a.text_rows)
        glue = make_qqp(tmp, a.text_rows)
        cases = [
            ("coco_karpathy", ["coco_karpathy", "--annotations", karpathy, "--images", os.path.join(tmp, "coco")]),
            ("vqa_v2", ["vqa_v2", "--train-questions", questions, "--train-annotations", annotations, "--images",
                        os.path.join(tmp, "coco"), "--min-answer-count", "1"]),
            ("refcoco", ["refcoco", "--dataset", "refcoco", "--annotations", refs, "--images",
                         os.path.join(tmp, "coco", "train2014")]),
            ("imagenet", ["imagenet", "--synset-words", words, "--split-dir", f"train={train}"]),
            ("gigaword", ["gigaword", "--source", src, "--target", tgt, "--split", "train"]),
            ("glue_qqp", ["glue", "--task", "qqp", "--glue-dir", glue]),
        ]
        for name, argv in cases:
            for max_side in ([None] if name in ("gigaword", "glue_qqp") else [None, 256]):
                extra = ["--max-side", str(max_side)] if max_side else []
                out = os.path.join(tmp, f"out_{name}_{max_side}")
                dt, rows = timed(argv[:1] + extra + argv[1:], out)
                row = {**base_row(), "threads": torch.get_num_threads(), "gemm_peak_gflops": peak, "importer": name,
                       "max_side": max_side or "", "rows": rows, "seconds": round(dt, 3),
                       "rows_per_s": round(rows / dt, 1)}
                print(row, flush=True)
                append_csv(a.csv, row)
    return 0


if __name__ == "__main__":
    sys.exit(main())

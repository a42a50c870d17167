"""launch/evaluate.py's remaining tasks in-process: Gigaword (text only, beam 6 + ROUGE), ImageNet (all-candidate
over class names with a bos-only prompt) and GLUE (CoLA: constrained last-position argmax, accuracy + MCC) on small
hand-written TSVs; main() prints the metrics JSON last."""
import json

from PIL import Image

from launch.evaluate import main as evaluate_main
from ofa_ds.checkpoint import export_folder
from ofa_ds.data.images import encode_base64_image
from tests.generation.conftest import tiny_model


def test_gigaword_and_imagenet(tmp_path, capsys):
    ckpt = str(tmp_path / "ckpt")
    export_folder(tiny_model(), ckpt)
    giga = tmp_path / "giga.tsv"
    giga.write_text("police arrested five men on friday\tpolice arrest five\n"
                    "stocks rose sharply in early trading\tstocks rise\n"
                    "the <unk> team won the cup\tteam wins cup\n")
    rc = evaluate_main(["--task", "gigaword", "--checkpoint", ckpt, "--data", str(giga), "--out",
                        str(tmp_path / "g"), "--batch-size", "2", "--gen-args", '{"max_len_b": 5}'])
    assert rc == 0
    m = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert m["n"] == 3 and {"rouge1", "rouge2", "rougeL"} <= set(m) and m["task"] == "gigaword"
    preds = json.load(open(tmp_path / "g" / "predictions.json"))
    assert [p["ref"] for p in preds] == ["police arrest five", "stocks rise", "team wins cup"]
    classes = {"rugby ball": 0, "goldfish": 1, "tench": 2}
    (tmp_path / "classes.json").write_text(json.dumps(classes))
    rows = []
    for i, (name, color) in enumerate([("goldfish", (250, 120, 0)), ("tench", (30, 90, 30))]):
        b64 = encode_base64_image(Image.new("RGB", (40, 40), color))
        rows.append(f"{b64}\t{i + 1}\t{name}")
    (tmp_path / "imnet.tsv").write_text("\n".join(rows) + "\n")
    rc = evaluate_main(["--task", "imagenet", "--checkpoint", ckpt, "--data", str(tmp_path / "imnet.tsv"),
                        "--out", str(tmp_path / "i"), "--ans2label", str(tmp_path / "classes.json"),
                        "--patch-image-size", "32"])
    assert rc == 0
    m = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    preds = json.load(open(tmp_path / "i" / "predictions.json"))
    assert m["n"] == 2 and all(p["answer"] in classes for p in preds)
    assert [p["gold"] for p in preds] == ["goldfish", "tench"]
    assert m["acc"] == sum(p["answer"] == p["gold"] for p in preds) / 2
    cola = tmp_path / "cola.tsv"
    cola.write_text("0\tthe cat sat on the mat\t1\n1\tcat the mat on sat\t0\n2\tdogs bark\t1\n")
    rc = evaluate_main(["--task", "cola", "--checkpoint", ckpt, "--data", str(cola), "--out", str(tmp_path / "c")])
    assert rc == 0
    m = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    preds = json.load(open(tmp_path / "c" / "predictions.json"))
    assert [p["gold"] for p in preds] == ["yes", "no", "yes"] and all(p["answer"] in ("yes", "no") for p in preds)
    assert m["n"] == 3 and "mcc" in m and m["acc"] == sum(p["answer"] == p["gold"] for p in preds) / 3

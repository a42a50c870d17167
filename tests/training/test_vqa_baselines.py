"""The default run's VQA baselines: always the majority answer, and the question-only prior (each training question's
most frequent answer), the best a model that never looks at the image can score on repeated questions."""
from ofa_ds.training import evaluate


def _tsv(tmp_path, rows):
    p = tmp_path / "vqa_train.tsv"
    p.write_text("".join(f"{i}\t{i}\t{q}\t{a}\tobj\timg\n" for i, (q, a) in enumerate(rows)))
    return str(p)


def test_question_prior_and_majority(tmp_path):
    rows = [("how many shapes are there?", "1.0|!+2")] * 3 + [("how many shapes are there?", "1.0|!+3")] + \
           [("What color is the circle?", "0.6|!+red&&1.0|!+blue")] * 2 + [("what color is the circle", "1.0|!+red")]
    b = evaluate.vqa_baselines(_tsv(tmp_path, rows))
    assert b.majority == "2"                                     # best answer per row: 2,2,2,3,blue,blue,red
    assert b.by_question == {"how many shapes are there": "2", "what color is the circle": "blue"}
    recs = [{"pred_answer": "x", "ref": {"2": 1.0}, "question": "how many shapes are there?"},
            {"pred_answer": "x", "ref": {"red": 1.0}, "question": "what color is the circle?"},
            {"pred_answer": "x", "ref": {"blue": 1.0}, "question": "what color is the  circle?"},
            {"pred_answer": "x", "ref": {"2": 0.3}, "question": "never seen in training?"}]   # -> majority
    out = evaluate.summarise("vqa", recs, b, tok=None)
    assert out["vqa_majority_baseline"] == (1.0 + 0 + 0 + 0.3) / 4
    assert out["vqa_question_prior_baseline"] == (1.0 + 0 + 1.0 + 0.3) / 4
    assert out["vqa_acc"] == 0.0
    plain = evaluate.summarise("vqa", recs, "2", tok=None)             # a plain majority string: no prior reported
    assert plain["vqa_majority_baseline"] == out["vqa_majority_baseline"]
    assert "vqa_question_prior_baseline" not in plain


def test_accuracy_by_answer_type(tmp_path):
    import json
    import pytest
    types = tmp_path / "type2ans.json"
    types.write_text(json.dumps({"color": ["red", "blue"], "how many": ["2", "3"], "other": ["red", "2", "left"]}))
    rows = [("how many shapes?", "1.0|!+2"), ("what color?", "1.0|!+red")]
    b = evaluate.vqa_baselines(_tsv(tmp_path, rows), str(types))
    assert b.answer_type == {"red": "color", "blue": "color", "2": "how many", "3": "how many"}
    recs = [{"pred_answer": "red", "ref": {"red": 1.0}, "question": "what color?"},
            {"pred_answer": "red", "ref": {"blue": 1.0, "red": 0.3}, "question": "what color?"},   # best ref: blue
            {"pred_answer": "2", "ref": {"2": 1.0}, "question": "how many shapes?"},
            {"pred_answer": "2", "ref": {"left": 1.0}, "question": "which side?"}]                  # untyped: other
    out = evaluate.summarise("vqa", recs, b, tok=None)
    assert out["vqa_acc_color"] == (1.0 + 0.3) / 2
    assert out["vqa_acc_how_many"] == 1.0
    assert out["vqa_acc_other"] == 0.0
    assert out["vqa_acc"] == (1.0 + 0.3 + 1.0 + 0.0) / 4
    assert not any(k.startswith("vqa_acc_") for k in evaluate.summarise("vqa", recs, evaluate.vqa_baselines(
        _tsv(tmp_path, [("q", "1.0|!+2")])), tok=None))                                          # no types file
    types.write_text(json.dumps({"color": ["red"], "shape": ["red"]}))
    with pytest.raises(ValueError, match="'red' is listed under both 'color' and 'shape'"):
        evaluate.load_answer_types(str(types))

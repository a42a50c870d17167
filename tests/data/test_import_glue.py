"""GLUE importer: the official TSVs of the seven tasks (headers, CoLA without one, MRPC's byte order mark, MNLI's
many columns, unbalanced quotes) -> OFA's column layouts, which validate and load with each task's default
columns; bad records are skipped with file:line; test files without labels are left out with a note."""
import pytest

from ofa_ds.data import DataConfig, DataStream
from ofa_ds.data.__main__ import main

MNLI_TRAIN_HEAD = ("index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\tsentence1_parse\t"
                   "sentence2_parse\tsentence1\tsentence2\tlabel1\tgold_label")
MNLI_DEV_HEAD = ("index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\tsentence1_parse\t"
                 "sentence2_parse\tsentence1\tsentence2\tlabel1\tlabel2\tlabel3\tlabel4\tlabel5\tgold_label")


def _mnli(i, s1, s2, gold, dev=False):
    votes = [gold] * (5 if dev else 1)
    return "\t".join([str(i), "31193", f"{i}n", "government", "( x )", "( y )", "(ROOT x)", "(ROOT y)", s1, s2,
                      *votes, gold])


# task -> (GLUE folder, {file: text}, {output file: expected rows}, skip reasons)
CASES = {
    "cola": ("CoLA", {
        "train.tsv": "gj04\t1\t\tOur friends won't buy this analysis, let alone the next one we propose.\n"
                     "gj04\t0\t*\tThey drank the pub.\n"
                     "gj04\t1\t\t   \n"
                     "gj04\t2\t\tA label CoLA does not have.\n"
                     "gj04\t1\tonly three columns\n",
        "dev.tsv": "gj04\t1\t\tThe sailors rode the breeze clear of the rocks.\r\n",
        "test.tsv": "index\tsentence\n0\tBill whistled past the house.\n"},
        {"cola_train.tsv": [["0", "Our friends won't buy this analysis, let alone the next one we propose.", "1"],
                            ["1", "They drank the pub.", "0"]],
         "cola_dev.tsv": [["0", "The sailors rode the breeze clear of the rocks.", "1"]]},
        {"empty text": 1, "unknown label": 1, "wrong column count": 1}),
    "sst2": ("SST-2", {
        "train.tsv": "sentence\tlabel\nhide new secretions from the parental units \t0\n"
                     "the greatest musicians \t1\n\t1\n",
        "dev.tsv": "sentence\tlabel\nit 's a charming and often affecting journey . \t1\n"},
        {"sst2_train.tsv": [["hide new secretions from the parental units", "0"], ["the greatest musicians", "1"]],
         "sst2_dev.tsv": [["it 's a charming and often affecting journey .", "1"]]},
        {"empty text": 1}),
    "mrpc": ("MRPC", {
        "train.tsv": "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
                     "1\t702876\t702977\tAmrozi accused his brother , whom he called \" the witness \" .\t"
                     "Referring to him as only \" the witness \" , Amrozi accused his brother .\n"
                     "0\t2108705\t2108831\tYucaipa owned Dominick 's before selling the chain .\t"
                     "Yucaipa bought Dominick 's in 1995 .\n",
        "dev.tsv": "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
                   "1\t1355540\t1355592\tHe said the foodservice pie business doesn 't fit .\t"
                   "The foodservice pie business does not fit .\n",
        "msr_paraphrase_test.txt": "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
                                   "1\t1089874\t1089925\tPCCW 's chief operating officer quit .\t"
                                   "The chief operating officer of PCCW quit .\n"},
        {"mrpc_train.tsv": [["Amrozi accused his brother , whom he called \" the witness \" .",
                             "Referring to him as only \" the witness \" , Amrozi accused his brother .", "1"],
                            ["Yucaipa owned Dominick 's before selling the chain .",
                             "Yucaipa bought Dominick 's in 1995 .", "0"]],
         "mrpc_dev.tsv": [["He said the foodservice pie business doesn 't fit .",
                           "The foodservice pie business does not fit .", "1"]],
         "mrpc_test.tsv": [["PCCW 's chief operating officer quit .", "The chief operating officer of PCCW quit .",
                            "1"]]},
        {}),
    "qqp": ("QQP", {
        "train.tsv": "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n"
                     "133273\t213221\t213222\tHow is the life of a math student?\t"
                     "Which level of prepration is enough for the exam \"jlpt5?\t0\n"
                     "402555\t536040\t536041\tHow do I control my horny emotions?\t"
                     "How do you control your horniness?\t1\n"
                     "1\t2\t3\tA question whose pair got lost\t0\n",
        "dev.tsv": "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n"
                   "201359\t303345\t303346\tWhy are African-Americans so beautiful?\t"
                   "Why are hispanics so beautiful?\t0\n"},
        {"qqp_train.tsv": [["133273", "213221", "213222", "How is the life of a math student?",
                            "Which level of prepration is enough for the exam \"jlpt5?", "0"],
                           ["402555", "536040", "536041", "How do I control my horny emotions?",
                            "How do you control your horniness?", "1"]],
         "qqp_dev.tsv": [["201359", "303345", "303346", "Why are African-Americans so beautiful?",
                          "Why are hispanics so beautiful?", "0"]]},
        {"wrong column count": 1}),
    "mnli": ("MNLI", {
        "train.tsv": MNLI_TRAIN_HEAD + "\n"
                     + _mnli(0, "Conceptually cream skimming has two basic dimensions.",
                             "Product and geography are what make cream skimming work.", "neutral") + "\n"
                     + _mnli(1, "you know during the season", "You lose the things.", "entailment") + "\n"
                     + _mnli(2, "One of our number will carry out your instructions.", "A member will go.",
                             "contradiction") + "\n"
                     + _mnli(3, "An unlabelled pair.", "Nobody agreed.", "-") + "\n",
        "dev_matched.tsv": MNLI_DEV_HEAD + "\n" + _mnli(0, "The new rights are nice enough", "Everyone really likes "
                                                        "the newest benefits", "neutral", dev=True) + "\n",
        "dev_mismatched.tsv": MNLI_DEV_HEAD + "\n" + _mnli(0, "Your contribution helped make it possible.",
                                                           "Your contributions were of no help.", "contradiction",
                                                           dev=True) + "\n",
        "test_matched.tsv": "index\tpromptID\n0\t31349\n"},
        {"mnli_train.tsv": [["Conceptually cream skimming has two basic dimensions.",
                             "Product and geography are what make cream skimming work.", "0"],
                            ["you know during the season", "You lose the things.", "1"],
                            ["One of our number will carry out your instructions.", "A member will go.", "2"]],
         "mnli_dev.tsv": [["The new rights are nice enough", "Everyone really likes the newest benefits", "0"]],
         "mnli_dev_mismatched.tsv": [["Your contribution helped make it possible.",
                                      "Your contributions were of no help.", "2"]]},
        {"unknown label": 1}),
    "rte": ("RTE", {
        "train.tsv": "index\tsentence1\tsentence2\tlabel\n"
                     "0\tNo Weapons of Mass Destruction Found in Iraq Yet.\tWeapons of Mass Destruction Found in Iraq."
                     "\tnot_entailment\n"
                     "1\tA place of sorrow, after Pope John Paul II died, became a place of celebration.\t"
                     "Pope Benedict XVI is the new leader of the Roman Catholic Church.\tentailment\n",
        "dev.tsv": "index\tsentence1\tsentence2\tlabel\n0\tDana Reeve died of lung cancer.\t"
                   "Christopher Reeve had an accident.\tnot_entailment\n"},
        {"rte_train.tsv": [["0", "No Weapons of Mass Destruction Found in Iraq Yet.",
                            "Weapons of Mass Destruction Found in Iraq.", "not_entailment"],
                           ["1", "A place of sorrow, after Pope John Paul II died, became a place of celebration.",
                            "Pope Benedict XVI is the new leader of the Roman Catholic Church.", "entailment"]],
         "rte_dev.tsv": [["0", "Dana Reeve died of lung cancer.", "Christopher Reeve had an accident.",
                          "not_entailment"]]},
        {}),
    "qnli": ("QNLI", {
        "train.tsv": "index\tquestion\tsentence\tlabel\n"
                     "0\tWhen did the third Digimon series begin?\tUnlike the two seasons before it, the third "
                     "season was darker.\tnot_entailment\n"
                     "1\tWhich missile batteries often have individual launchers?\tWhere the launchers are "
                     "separated, a missile battery may have several.\tentailment\n",
        "dev.tsv": "index\tquestion\tsentence\tlabel\n0\tWhat came into force after the new constitution was "
                   "herald?\tAs of that day, the new constitution came into force.\tentailment\n"},
        {"qnli_train.tsv": [["0", "When did the third Digimon series begin?",
                             "Unlike the two seasons before it, the third season was darker.", "not_entailment"],
                            ["1", "Which missile batteries often have individual launchers?",
                             "Where the launchers are separated, a missile battery may have several.", "entailment"]],
         "qnli_dev.tsv": [["0", "What came into force after the new constitution was herald?",
                           "As of that day, the new constitution came into force.", "entailment"]]},
        {}),
}


def _write(tmp_path, task):
    folder, files, _, _ = CASES[task]
    d = tmp_path / "glue_data" / folder
    d.mkdir(parents=True)
    for name, text in files.items():
        (d / name).write_bytes(text.encode("utf-8"))
    return tmp_path / "glue_data"


def _read(path):
    return [line.split("\t") for line in path.read_text(encoding="utf-8").split("\n")[:-1]]


@pytest.mark.parametrize("task", sorted(CASES))
def test_task_rows_validate_and_load(task, tmp_path, tok, capsys):
    root = _write(tmp_path, task)
    out = tmp_path / "out"
    assert main(["import", "glue", "--task", task, "--glue-dir", str(root), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    _, files, expected, skips = CASES[task]
    assert sorted(p.name for p in out.iterdir()) == sorted(expected)
    for name, rows in expected.items():
        assert _read(out / name) == rows, name
        assert main(["validate", "--task", task, str(out / name)]) == 0
    summary = err.strip().splitlines()[-1]
    want = ", ".join(f"{k} {v}" for k, v in sorted(skips.items())) or "none"
    assert summary.endswith(f"skipped: {sum(skips.values())} ({want})")
    assert ("not imported" in err) == any(n.startswith("test") for n in files)
    train, dev = out / f"{task}_train.tsv", out / f"{task}_dev.tsv"
    cfg = DataConfig(task=task, data=f"{train},{dev}", batch_size=8, prompt_type="src", shuffle=False)
    batch = next(iter(DataStream(cfg, tokenizer=tok)))
    assert batch["target"].shape[0] == len(expected[train.name])


def test_bad_records_name_file_and_line(tmp_path, capsys):
    root = _write(tmp_path, "cola")
    assert main(["import", "glue", "--task", "cola", "--glue-dir", str(root / "CoLA"), "--out",
                 str(tmp_path / "a")]) == 0
    err = capsys.readouterr().err
    assert "CoLA/train.tsv:5 has 3 columns, expected 4" in err
    assert "CoLA/train.tsv:4 ('2')" in err and "CoLA/train.tsv:3" in err


def test_lines_end_at_newline_only_and_bad_bytes_are_skipped(tmp_path, capsys):
    d = tmp_path / "SST-2"
    d.mkdir()
    (d / "train.tsv").write_bytes("sentence\tlabel\na\u2028b \x85c\t1\n".encode() + b"caf\xe9\t0\nok\t1\n")
    assert main(["import", "glue", "--task", "sst2", "--glue-dir", str(d), "--out", str(tmp_path / "o")]) == 0
    # one record, not three: U+2028 and \x85 stay inside the sentence (the TSV writer turns them into spaces)
    assert _read(tmp_path / "o" / "sst2_train.tsv") == [["a b c", "1"], ["ok", "1"]]
    assert "text not UTF-8 1" in capsys.readouterr().err


def test_deterministic_and_errors(tmp_path, capsys):
    root = _write(tmp_path, "mnli")
    for out in ("a", "b"):
        assert main(["import", "glue", "--task", "mnli", "--glue-dir", str(root), "--out", str(tmp_path / out)]) == 0
    for name in ("mnli_train.tsv", "mnli_dev.tsv", "mnli_dev_mismatched.tsv"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    capsys.readouterr()
    assert main(["import", "glue", "--task", "rte", "--glue-dir", str(tmp_path / "nope"), "--out",
                 str(tmp_path / "c")]) == 2
    assert "nope" in capsys.readouterr().err
    assert main(["import", "glue", "--task", "rte", "--glue-dir", str(root), "--out", str(tmp_path / "c")]) == 2
    assert "no GLUE rte files" in capsys.readouterr().err
    (root / "MNLI" / "train.tsv").write_text("index\tsentence1\tlabel\n0\ta\tneutral\n")
    assert main(["import", "glue", "--task", "mnli", "--glue-dir", str(root), "--out", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "MNLI/train.tsv: header lacks column(s) sentence2, gold_label" in err
    assert not (tmp_path / "d" / "mnli_train.tsv").exists() and not list((tmp_path / "d").glob("*.part"))

"""DataConfig JSON round trip, candidate files (.json / restricted .pkl), task pickling for spawned workers."""
import json
import os
import pickle

import numpy as np
import pytest

from ofa_ds.data import TASKS, DataConfig, make_task
from ofa_ds.data.text import load_candidates


def test_dataconfig_json_roundtrip_and_unknown_keys():
    c = DataConfig(task="vqa", data="a.tsv,b.tsv", selected_cols="0,5,2,3,4", batch_size=3)
    assert DataConfig.from_json(c.to_json()) == c
    assert c.paths() == ["a.tsv", "b.tsv"] and c.cols() == [0, 5, 2, 3, 4]
    with pytest.raises(ValueError, match="batchsize"):
        DataConfig.from_dict({"batchsize": 3})


def test_registry_names():
    assert set(TASKS) == {"caption", "vqa", "refcoco", "snli_ve", "imagenet", "gigaword", "image_gen", "pretrain",
                          "cola", "sst2", "mrpc", "qqp", "mnli", "rte", "qnli"}
    with pytest.raises(KeyError, match="unknown task"):
        make_task(DataConfig(task="nope"))


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_candidates_json_list_and_pickle(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps(["no", "yes"]))
    assert load_candidates(str(tmp_path / "a.json")) == {"no": 0, "yes": 1}
    with open(tmp_path / "a.pkl", "wb") as f:
        pickle.dump({"red": 0, "two dogs": 1}, f)
    assert load_candidates(str(tmp_path / "a.pkl")) == {"red": 0, "two dogs": 1}
    with open(tmp_path / "evil.pkl", "wb") as f:
        pickle.dump({"x": Evil()}, f)
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        load_candidates(str(tmp_path / "evil.pkl"))


def test_task_pickles_without_tokenizer_copy(tok, img64):
    t = make_task(DataConfig(task="vqa", patch_image_size=16), "train", tok)
    blob = pickle.dumps(t)
    assert len(blob) < 100_000
    t2 = pickle.loads(blob)
    assert t2.tok is tok
    row = ["1", img64, "what?", "1.0|!+yes", ""]
    assert t2.build(row, 0, np.random.default_rng(0)).target == t.build(row, 0, np.random.default_rng(0)).target

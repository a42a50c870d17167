"""The official .pt format can only express what OFA's own code can rebuild: a model whose ResNet stem is not a
resnet50/101/152 (the `debug` preset's one-block stages) is refused with a message, not written as a file that
loads back broken."""
import pytest

from ofa_ds.checkpoint import CheckpointError, save_official
from ofa_ds.config import preset
from ofa_ds.model import OFAModel


def test_nonstandard_resnet_is_refused(tmp_path):
    model = OFAModel(preset("debug"))
    with pytest.raises(CheckpointError, match="resnet_layers"):
        save_official(model, str(tmp_path / "debug.pt"))
    assert not (tmp_path / "debug.pt").exists()

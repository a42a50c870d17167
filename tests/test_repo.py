"""Repository contracts: the README Quickstart is two commands and .ci/run runs the README's test command;
the model package never imports deepspeed or torch.distributed; `kernels` is installed only as ofa_ds.kernels."""
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read(*p):
    with open(os.path.join(ROOT, *p)) as f:
        return f.read()


def test_quickstart_has_two_commands_and_ci_runs_the_test_one():
    readme = _read("README.md")
    block = re.search(r"## Quickstart\s+```bash\n(.*?)```", readme, re.S).group(1).strip().splitlines()
    assert len(block) == 2
    assert "deepspeed launch/pretrain.py" in block[0]
    ci = [line.strip() for line in _read(".ci", "run").splitlines()]
    assert block[1].strip() in ci


def test_model_package_is_single_device():
    for dirpath, _, files in os.walk(os.path.join(ROOT, "ofa_ds", "model")):
        for name in files:
            if name.endswith(".py"):
                text = _read(dirpath, name)
                assert not re.search(r"^\s*(import|from)\s+(deepspeed|torch\.distributed)", text, re.M), name


def test_kernels_not_installed_top_level():
    setup = _read("setup.py")
    assert '"ofa_ds.kernels": "kernels"' in setup
    assert not re.search(r"packages=.*['\"]kernels['\"]", setup)

"""`train.compile`: the model that the DeepSpeed engine runs, through `torch.compile` (inductor, CPU and GPU).

What is unusual:
  * What is compiled is a set of regions, not the whole model: every encoder layer, every decoder layer and the
    ResNet stem, each by `nn.Module.compile()` (in place: parameter names, state dicts and checkpoints are unchanged,
    and DeepSpeed's hooks stay on the same modules). The layers of one stack share their code, so Dynamo
    compiles a layer once and reuses it for the others (a whole-model compile traces every layer separately and
    breaks at the model's data-dependent Python anyway: the duplicate-image check, the "any padding?" tests, the
    packed logits). The Triton attention and LayerNorm are torch custom ops (ofa_ds/kernels), so they sit inside
    the compiled graphs as opaque calls.
  * ZeRO-3 is refused (`check_zero_stage`): its per-module hooks gather and release each parameter in place between
    forward and backward, and the compiled graphs keep the parameters as saved tensors, so the backward fails with
    "modified by an inplace operation" (measured on two CPU ranks). ZeRO 0-2 leave the parameters alone.
    DeepSpeed's own `engine.compile()` compiles the whole module with the same `module.compile()`, so it meets the
    same problem; its DeepCompile backend (which compiles the gathers themselves) is GPU-only and is not used.
  * Inductor on CPU generates C++ and needs a C++ compiler. Without one, `compile_model` prints why and leaves the
    model eager (the run still trains); `check_cpu_compiler` is the test.
  * Shapes vary from batch to batch (sequence lengths, image counts): after the first new shape Dynamo recompiles
    the region once with dynamic sizes (`dynamic=None`, PyTorch's default), not once per shape.
  * Held-out evaluation runs the compiled layers eagerly (`eager_unless(False)` around it in the trainer): greedy
    decoding with a growing cache would recompile a region for every variant of its inputs and spend more time
    compiling than the few evaluation batches take.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile

import torch
from torch import nn


def check_cpu_compiler() -> str | None:
    """None when inductor can build C++ here, else a one-line reason. Tries the compiler inductor would use ($CXX,
    else g++/clang++/c++) on a two-line program."""
    names = [os.environ["CXX"]] if os.environ.get("CXX") else ["g++", "clang++", "c++"]
    cxx = next((shutil.which(n) for n in names if shutil.which(n)), None)
    if cxx is None:
        return (f"no C++ compiler found ({'$CXX=' + names[0] if os.environ.get('CXX') else ', '.join(names)} not on "
                "PATH); inductor needs one on CPU: install g++ (apt-get install g++) or set CXX")
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "t.cpp")
        with open(src, "w") as f:
            f.write("#include <cmath>\nint main() { return (int) std::sqrt(0.0); }\n")
        try:
            p = subprocess.run([cxx, src, "-O1", "-o", os.path.join(tmp, "t")], capture_output=True, text=True,
                               timeout=120)
        except (OSError, subprocess.TimeoutExpired) as e:
            return f"the C++ compiler {cxx} does not run: {e}"
        if p.returncode != 0:
            return f"the C++ compiler {cxx} fails on a two-line program: {p.stderr.strip()[-300:]}"
    return None


def regions(model: nn.Module) -> list[nn.Module]:
    """The modules `compile_model` compiles: the ResNet stem (if any), every encoder and decoder layer."""
    out: list[nn.Module] = []
    enc, dec = getattr(model, "encoder", None), getattr(model, "decoder", None)
    if enc is not None and getattr(enc, "embed_images", None) is not None:
        out.append(enc.embed_images)
    for stack in (enc, dec):
        if stack is not None:
            out.extend(stack.layers)
    if not out:
        raise TypeError(f"train.compile: {type(model).__name__} has no encoder/decoder layers to compile")
    return out


def compile_model(model: nn.Module, device: torch.device, *, backend: str = "inductor", log=sys.stderr) -> bool:
    """Compile the regions of `model` in place (see the header). Returns False, after saying why on `log`, when
    the model stays eager (inductor on a CPU without a working C++ compiler)."""
    if backend == "inductor" and device.type == "cpu":
        why = check_cpu_compiler()
        if why is not None:
            print(f"train.compile: {why}; training continues without compiling", file=log, flush=True)
            return False
    for m in regions(model):
        m.compile(backend=backend)
    return True


def eager_unless(compiled: bool):
    """A context in which compiled regions run their eager code (`torch.compiler.set_stance("force_eager")`) unless
    `compiled`; a no-op on torch builds without set_stance (< 2.6), where they stay compiled."""
    if compiled or not hasattr(torch.compiler, "set_stance"):
        return contextlib.nullcontext()
    return torch.compiler.set_stance("force_eager")


def check_zero_stage(ds_config) -> None:
    """Raise ConfigMismatch when the ds_config (a path or a dict) partitions parameters (ZeRO-3): see the header."""
    from ofa_ds.training.ds_config import ConfigMismatch, zero_stage
    from ofa_ds.training.pipeline_strategy import raw_ds_config
    if zero_stage(raw_ds_config(ds_config)) >= 3:
        where = ds_config if isinstance(ds_config, str) else "ds_config"
        raise ConfigMismatch(f"{where}: zero_optimization.stage = 3 together with train.compile=true; ZeRO-3 "
                             "re-gathers parameters in place between forward and backward, which the compiled "
                             "graphs' saved tensors do not allow. Use ZeRO 0-2 or train.compile=false.")

"""`train.compile`: the model that the DeepSpeed engine runs, through `torch.compile` (inductor, CPU and GPU).

What is unusual:
  * What is compiled is a set of regions, not the whole model: every encoder layer, every decoder layer and the
    ResNet, each in place (parameter names, state dicts and checkpoints are unchanged, and DeepSpeed's hooks stay on
    the same modules): by `nn.Module.compile()` under ZeRO 0-2, as below under ZeRO-3. The layers of one stack share
    their code, so Dynamo compiles a layer once and reuses it for the others (a whole-model compile traces every
    layer separately and breaks at the model's data-dependent Python anyway: the duplicate-image check, the "any
    padding?" tests, the packed logits). The Triton attention and LayerNorm are torch custom ops (ofa_ds/kernels),
    so they sit inside the compiled graphs as opaque calls.
  * Under ZeRO-3 the same regions are compiled another way (`compile_zero3`). `nn.Module.compile()` would put
    DeepSpeed's per-submodule hooks inside the compiled code: every Linear's gather hook is a graph break, the graphs
    are fragments between them, DeepSpeed's own hooks are traced and recompiled until Dynamo's recompile limit, and
    the first step compiles for minutes; the debug recipe's backward then failed at step 9 with "modified by an
    inplace operation" (two CPU ranks). Instead each region becomes a DeepSpeed ZeRO-3 leaf module: one hook gathers
    all its parameters before its forward and releases them after it, one gathers them again before its backward,
    and no hook sits inside it. Only the region's `forward` is compiled, so these hooks run eagerly around one graph
    per region in which the parameters are ordinary, already gathered inputs (no graph breaks). The price is
    DeepSpeed's granularity: a whole layer's (or the ResNet's) parameters are live at once instead of one Linear's.
  * DeepSpeed reduces a leaf's gradients in a full backward hook, which fires once the gradients of the region's
    inputs exist. The ResNet's input (the images) needs no gradient, so the hook would fire before the parameter
    gradients: a forward pre-hook (`_input_requires_grad`) makes such an input a leaf that requires a gradient. The
    only extra work is the first convolution's gradient with respect to the images, which is discarded.
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


def _input_requires_grad(module: nn.Module, args: tuple):
    """Forward pre-hook of a ZeRO-3 region: a first input that needs no gradient (the images entering the ResNet)
    becomes a leaf that does, so DeepSpeed's leaf-module backward hook fires after the region's parameter
    gradients exist (see the header)."""
    x = args[0] if args else None
    if module.training and torch.is_grad_enabled() and torch.is_tensor(x) and x.is_floating_point() \
            and not x.requires_grad:
        return (x.detach().requires_grad_(), *args[1:])
    return None


def compile_zero3(model: nn.Module, backend: str) -> list[nn.Module]:
    """Make every region a DeepSpeed ZeRO-3 leaf module and compile its `forward` (see the header); must run before
    `deepspeed.initialize`, which registers DeepSpeed's hooks. Returns the regions."""
    from deepspeed.utils import z3_leaf_module
    out = regions(model)
    for m in out:
        m._z3_leaf = True                     # what deepspeed.utils.set_z3_leaf_module(s) sets, per instance
        if not z3_leaf_module(m):
            raise RuntimeError(f"train.compile: DeepSpeed does not take {type(m).__name__} as a ZeRO-3 leaf module")
        m.register_forward_pre_hook(_input_requires_grad)
        m.forward = torch.compile(m.forward, backend=backend)
    return out


def compile_model(model: nn.Module, device: torch.device, *, backend: str = "inductor", zero3: bool = False,
                  log=sys.stderr) -> bool:
    """Compile the regions of `model` in place (see the header; `zero3`: the model is partitioned by ZeRO-3 and not
    yet wrapped by DeepSpeed). Returns False, after saying why on `log`, when the model stays eager (inductor on a
    CPU without a working C++ compiler)."""
    if backend == "inductor" and device.type == "cpu":
        why = check_cpu_compiler()
        if why is not None:
            print(f"train.compile: {why}; training continues without compiling", file=log, flush=True)
            return False
    if zero3:
        compile_zero3(model, backend)
        return True
    for m in regions(model):
        m.compile(backend=backend)
    return True


def eager_unless(compiled: bool):
    """A context in which compiled regions run their eager code (`torch.compiler.set_stance("force_eager")`) unless
    `compiled`; a no-op on torch builds without set_stance (< 2.6), where they stay compiled."""
    if compiled or not hasattr(torch.compiler, "set_stance"):
        return contextlib.nullcontext()
    return torch.compiler.set_stance("force_eager")

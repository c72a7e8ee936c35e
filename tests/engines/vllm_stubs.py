"""Stand-ins for the packages vLLM's EPLB import chain drags in on this CPU test machine.

``vllm.distributed.eplb.eplb_state`` imports ``vllm.config`` (model configs: transformers,
huggingface_hub, safetensors), and ``vllm.distributed.stateless_coordinator`` pulls in attention
backends, multimodal input handling (PIL, pybase64), HTTP clients (aiohttp, requests) and the
structured-output grammars (llguidance, xgrammar). None of them takes part in EPLB: the maps,
``EplbModelState`` and ``rearrange_expert_weights_inplace`` are plain torch. They are too heavy to
install next to a CPU torch, so each is replaced by an empty module whose attributes are
placeholder classes (enough for class bodies, annotations and subclassing at import time).

``vllm._C`` (compiled kernels) is not stubbed: vLLM logs that it is missing and goes on.
Everything under ``vllm`` itself is the real code.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import types

#: Top-level packages replaced by placeholders (and every submodule under them).
STUBBED = ("transformers", "huggingface_hub", "safetensors", "aiohttp", "requests", "PIL",
           "pybase64", "llguidance", "xgrammar")


class _Placeholder(type):
    """A class whose attributes, subscripts and unions are placeholder classes too."""

    def __getattr__(cls, name: str) -> type:
        if name.startswith("__"):
            raise AttributeError(name)
        return _Placeholder(name, (), {})

    def __getitem__(cls, item: object) -> type:
        return cls

    def __or__(cls, other: object) -> type:
        return cls

    def __ror__(cls, other: object) -> type:
        return cls


class _StubModule(types.ModuleType):
    def __getattr__(self, name: str) -> type:
        if name.startswith("__"):
            raise AttributeError(name)
        value = _Placeholder(name, (), {})
        setattr(self, name, value)
        return value


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname: str, path: object, target: object = None):
        if fullname.split(".")[0] in STUBBED:
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        module = _StubModule(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        pass


def install() -> None:
    """Put the placeholders in front of the real import system (once per process, before vLLM
    is imported). They win even where the real package is installed, so the test does not
    depend on what else the shared environment holds."""
    if not any(isinstance(f, _StubFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _StubFinder())

"""Import SGLang's real EPLB modules on a CPU-only machine without SGLang's server stack.

SGLang is installed with ``--no-deps`` (see requirements-engines.txt). Its EPLB modules
(``sglang.srt.eplb.expert_location``, ``expert_location_updater``, ``expert_location_dispatch``,
``expert_distribution``), ``sglang.srt.runtime_context``, ``sglang.srt.server_args`` and
``sglang.srt.plugins`` are imported for real. Only these, which their imports drag in and which
have nothing to do with EPLB, are replaced before the first import:

- the ``sglang`` and ``sglang.srt.configs`` package ``__init__`` files (the frontend language API
  and HF-transformers patches; every model's HF config class): the packages are made without
  running them, their submodules load from the real files;
- third-party modules imported at the top of ``sglang.srt.utils.common`` for GPU kernels, images
  and HTTP: ``triton``, ``PIL``, ``starlette``, ``requests`` (do-nothing stand-ins, only where
  they are not installed, and only while SGLang's modules are imported: taken away afterwards);
- ``sglang.srt.model_executor.forward_batch_info`` (the batch class of the model executor; the
  recorder only names ``ForwardBatch``/``ForwardMode``), ``sglang.srt.observability
  .metrics_collector`` (Prometheus collectors) and ``sglang.srt.model_loader`` (the model
  registry: :func:`get_model_architecture` answers with :class:`TinyMoeForCausalLM`, a model with
  ``num_layers`` layers of which the first ``first_dense`` are dense).

``torch.cpu`` lacks ``empty_cache`` and ``is_current_stream_capturing``, which SGLang's recorder
calls through ``torch.get_device_module()`` (it assumes an accelerator); CPU answers (nothing to
free, never capturing) are added when missing.
"""

from __future__ import annotations

import enum
import os
import importlib.machinery
import sys
import types
from pathlib import Path
from unittest import mock

import torch

_THIRD_PARTY_STUBS = ("triton", "PIL", "starlette", "requests")


class _EmptyModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Answers imports of the names in ``_THIRD_PARTY_STUBS`` with do-anything modules (last
    on ``sys.meta_path``: only when no installed module answers)."""

    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in _THIRD_PARTY_STUBS:
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        module = mock.MagicMock(name=spec.name)
        module.__path__, module.__spec__, module.__name__, module.__all__ = [], spec, spec.name, []
        return module

    def exec_module(self, module) -> None:
        pass


def _package_without_init(name: str, directory: Path) -> None:
    module = types.ModuleType(name)
    module.__path__ = [str(directory)]
    module.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
    module.__spec__.submodule_search_locations = [str(directory)]
    sys.modules[name] = module


class ModelShape:
    """The model the fake registry describes: ``num_layers`` engine layers, the first
    ``first_dense`` dense, ``num_logical_experts`` routed experts."""

    num_layers = 5
    first_dense = 2
    num_logical_experts = 8


class TinyMoeForCausalLM:
    """Stands in for a model class: SGLang asks it for its expert-location config."""

    @classmethod
    def get_model_config_for_expert_location(cls, hf_config):
        from sglang.srt.eplb.expert_location import ModelConfigForExpertLocation
        return ModelConfigForExpertLocation(num_layers=hf_config.num_hidden_layers,
                                            num_logical_experts=hf_config.n_routed_experts)


class TinyModelConfig:
    """What ``ExpertLocationMetadata`` reads of SGLang's ``ModelConfig``: its ``hf_config``."""

    def __init__(self) -> None:
        self.hf_config = types.SimpleNamespace(num_hidden_layers=ModelShape.num_layers,
                                               n_routed_experts=ModelShape.num_logical_experts)


def _install_stubs() -> None:
    import importlib.util
    spec = importlib.util.find_spec("sglang")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("sglang is not installed (see requirements-engines.txt)")
    root = Path(list(spec.submodule_search_locations)[0])
    sys.meta_path.append(_THIRD_PARTY_FINDER)  # last: an installed module of that name wins
    _package_without_init("sglang", root)
    _package_without_init("sglang.srt.configs", root / "srt" / "configs")

    batch = types.ModuleType("sglang.srt.model_executor.forward_batch_info")

    class ForwardMode(enum.IntEnum):
        EXTEND = 1
        DECODE = 2
        SPLIT_PREFILL = 3

    class ForwardBatch:
        forward_mode = ForwardMode.DECODE

    batch.ForwardMode, batch.ForwardBatch = ForwardMode, ForwardBatch
    sys.modules[batch.__name__] = batch

    metrics = types.ModuleType("sglang.srt.observability.metrics_collector")
    metrics.STAT_LOGGER_ROLE_EXPERT_DISPATCH = "expert_dispatch"
    metrics.ExpertDispatchCollector = type("ExpertDispatchCollector", (), {})
    metrics.resolve_collector_class = lambda role, default_cls: default_cls
    sys.modules[metrics.__name__] = metrics

    loader = types.ModuleType("sglang.srt.model_loader")
    loader.__path__ = []
    loader.get_model_architecture = lambda model_config: (TinyMoeForCausalLM, "TinyMoe")
    sys.modules[loader.__name__] = loader

    moe = types.ModuleType("sglang.srt.layers.moe")
    moe.__path__ = []
    moe.get_moe_a2a_backend = lambda: types.SimpleNamespace(is_megamoe=lambda: False)
    sys.modules[moe.__name__] = moe

    if not hasattr(torch.cpu, "empty_cache"):
        torch.cpu.empty_cache = lambda: None
    if not hasattr(torch.cpu, "is_current_stream_capturing"):
        torch.cpu.is_current_stream_capturing = lambda: False


_THIRD_PARTY_FINDER = _EmptyModules()
_installed = False


def _drop_third_party_stand_ins() -> None:
    """Once SGLang's modules hold what they imported, take the stand-ins away again, so that
    other code in this process sees those packages as missing, as they are."""
    if _THIRD_PARTY_FINDER in sys.meta_path:
        sys.meta_path.remove(_THIRD_PARTY_FINDER)
    for name in list(sys.modules):
        module = sys.modules[name]
        if name.split(".")[0] in _THIRD_PARTY_STUBS and isinstance(module, mock.MagicMock):
            del sys.modules[name]


def import_sglang(cpu_engine: bool = True) -> None:
    """Install the stand-ins (once) and import SGLang's EPLB modules for real. ``cpu_engine``:
    set SGLang's own CPU-engine switch (its ``get_device()`` answers "cpu"; read once, cached)."""
    global _installed
    if not _installed:
        if cpu_engine:
            os.environ["SGLANG_USE_CPU_ENGINE"] = "1"
        _install_stubs()
        _installed = True
    import sglang.srt.eplb.expert_distribution  # noqa: F401
    import sglang.srt.eplb.expert_location  # noqa: F401
    import sglang.srt.eplb.expert_location_dispatch  # noqa: F401
    import sglang.srt.eplb.expert_location_updater  # noqa: F401
    import sglang.srt.plugins.hook_registry  # noqa: F401
    import sglang.srt.server_args  # noqa: F401
    _drop_third_party_stand_ins()


def publish_runtime(ep_rank: int, ep_size: int, nnodes: int, num_redundant: int,
                    dispatch: str | None = "static", device: str = "cpu") -> None:
    """Publish SGLang's process config for EP rank ``ep_rank`` of ``ep_size``, as a server
    started with ``--tp-size ep_size --ep-size ep_size --nnodes nnodes
    --ep-num-redundant-experts num_redundant --ep-dispatch-algorithm dispatch
    --expert-distribution-recorder-mode stat --device DEVICE`` would, plus ``--moe-a2a-backend
    deepep --deepep-mode normal`` for ``static`` dispatch (SGLang allows static only with an a2a
    backend) and no a2a backend otherwise; without the server's resolution pass, which loads the
    model's HF config."""
    import_sglang()
    from sglang.srt.runtime_context import get_context, get_parallel
    from sglang.srt.server_args import ServerArgs

    a2a = {"moe_a2a_backend": "deepep", "deepep_mode": "normal"} if dispatch == "static" else {}
    args = ServerArgs(model_path="tiny-moe", device=device, tp_size=ep_size, ep_size=ep_size,
                      nnodes=nnodes, ep_num_redundant_experts=num_redundant,
                      ep_dispatch_algorithm=dispatch, expert_distribution_recorder_mode="stat",
                      expert_distribution_recorder_buffer_size=-1, **a2a)
    get_context().set_server_args(args)
    get_parallel().override_permanently(tp_rank=ep_rank, moe_ep_rank=ep_rank)

"""The swappable parts and the typed config: every config group's choice implements its interface, bad
values fail at the boundary naming their key, and a policy written outside the engine plugs in by config."""

from __future__ import annotations

import ast
import pickle
from pathlib import Path

import pytest
import torch
from conftest import PROMPTS

from engine import LLM, SamplingParams
from engine.config import CONFIG_DIR, EngineConfig, compose_config, group_choices
from engine.errors import APIError
from engine.kernels.paged import DecodeStep, PagedAttentionBase
from engine.kv_manager import KVManager
from engine.openai_protocol import sampling_params
from engine.policies.base import AdmissionPolicy
from engine.prefix_cache import PrefixCache
from engine.quant.base import QuantScheme
from engine.quant.int8 import Int8Format
from engine.sequence import Sequence

INTERFACES = {"attention": PagedAttentionBase, "cache": PrefixCache, "scheduler": AdmissionPolicy, "quant": QuantScheme}


@pytest.mark.parametrize("group", sorted(INTERFACES))
def test_every_choice_of_a_group_implements_its_interface(group):
    choices = group_choices(group)
    assert len(choices) >= 2
    for choice in choices:
        cfg = compose_config(**{group: choice})
        component = cfg.scheduler.policy if group == "scheduler" else getattr(cfg, group)
        assert issubclass(component.resolve(), INTERFACES[group]), f"{group}={choice}"
    if group == "scheduler":
        assert {"fcfs", "lpm", "priority"} <= set(choices)


def test_model_yaml_files_hold_only_what_the_engine_reads():
    # `model.name` used to be there and nothing read it; every key now reaches ModelSettings.
    for path in (CONFIG_DIR / "model").glob("*.yaml"):
        cfg = compose_config(model=path.stem)
        assert cfg.model.max_model_len is None


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ({"page_size": 0}, "kv_cache.page_size"),
        ({"num_pages": 1}, "kv_cache.num_pages"),
        ({"kv_cache.window_pages": "no"}, "kv_cache.window_pages"),
        ({"compile.warmup": "eager"}, "compile.warmup"),
        ({"compile.batch_buckets": []}, "compile.batch_buckets"),
        ({"parallel.tp": 0}, "parallel.tp"),
        ({"parallel.nnodes": 3, "parallel.tp": 4}, "parallel.nnodes"),
        ({"max_num_seqs": 0}, "scheduler.max_running_requests"),
        ({"max_num_batched_tokens": -1}, "scheduler.max_num_batched_tokens"),
        ({"dtype": "int3"}, "dtype"),
        ({"device": "tpu"}, "device"),
        ({"server.port": 70000}, "server.port"),
        ({"cache": {"_target_": "engine.no_such_module.Cache"}}, "cache._target_"),
    ],
)
def test_bad_config_values_fail_at_the_boundary_naming_the_key(override, key):
    with pytest.raises(ValueError, match=rf"invalid {key}="):
        compose_config(**override)


def test_typed_config_is_frozen_and_survives_pickling():
    cfg = compose_config(scheduler="lpm", cache="none", page_size=8)
    assert isinstance(cfg, EngineConfig) and cfg.kv_cache.page_size == 8
    with pytest.raises(AttributeError):
        cfg.kv_cache.page_size = 4  # type: ignore[misc]
    assert pickle.loads(pickle.dumps(cfg)) == cfg  # what spawned engine and tensor-parallel processes receive


def _seq(i: int, priority: int = 0, preempted: bool = False) -> Sequence:
    seq = Sequence(f"r{i}", [1, 2, 3], SamplingParams(priority=priority), arrival=i)
    seq.num_preemptions = int(preempted)
    return seq


def test_priority_policy_orders_by_priority_then_arrival_with_preempted_first():
    from engine.policies.fcfs import FCFS
    from engine.policies.priority import Priority

    waiting = [_seq(0, 5), _seq(1, 0), _seq(2, 1), _seq(3, 0), _seq(4, 9, preempted=True)]
    assert [s.seq_id for s in Priority().order(waiting, None)] == ["r4", "r1", "r3", "r2", "r0"]
    assert FCFS().order(waiting, None) == waiting


def _one_at_a_time(tiny_qwen3, **overrides) -> LLM:
    return LLM(
        str(tiny_qwen3), dtype=torch.float32, enforce_eager=True, progress_bar=False, max_num_seqs=1, **overrides
    )


def _finish_order(llm: LLM, requests: list[tuple[str, str, SamplingParams]]) -> list[str]:
    """Add every (seq_id, prompt, params) before the first step, then step to the end."""
    for seq_id, prompt, params in requests:
        llm.engine.add_sequence(seq_id, llm.tokenizer.encode(prompt), params)
    finished = []
    while llm.engine.has_unfinished():
        finished += [o.seq_id for o in llm.engine.step() if o.finished]
    return finished


def test_priority_scheduler_admits_lower_values_first(tiny_qwen3):
    llm = _one_at_a_time(tiny_qwen3, scheduler="priority")
    requests = [
        (name, PROMPTS[0], SamplingParams(max_tokens=2, temperature=0, priority=priority))
        for name, priority in [("low", 7), ("high", -1), ("mid", 3)]
    ]
    assert _finish_order(llm, requests) == ["high", "mid", "low"]


class LongestPromptFirst(AdmissionPolicy):
    """A policy defined outside the engine: the README's "Adding a scheduler policy" in one class."""

    def order(self, waiting: list[Sequence], kv: KVManager) -> list[Sequence]:
        return sorted(waiting, key=lambda s: -s.num_prompt_tokens)


def test_a_policy_from_another_module_plugs_in_through_the_config(tiny_qwen3):
    llm = _one_at_a_time(tiny_qwen3, **{"scheduler.policy": {"_target_": f"{__name__}.LongestPromptFirst"}})
    assert isinstance(llm.engine.scheduler.policy, LongestPromptFirst)
    params = SamplingParams(max_tokens=1, temperature=0)
    requests = [("short", PROMPTS[0], params), ("long", PROMPTS[3], params), ("mid", PROMPTS[7][:40], params)]
    assert _finish_order(llm, requests) == ["long", "mid", "short"]


class PlainW8A8(Int8Format):
    """A format defined outside the engine: int8 with one activation digit everywhere."""

    name = "test-w8a8"

    def build(self, float_module, module):
        built = super().build(float_module, module)
        if hasattr(built, "digits"):
            built.digits = 1
        return built


def test_a_weight_format_from_another_module_plugs_in_through_the_config(tiny_qwen3):
    """A new format is one class and one scheme naming it (configs/quant/int8.yaml's shape)."""
    overrides = {"quant": "int8", "quant.format": f"{__name__}.PlainW8A8"}
    llm = LLM(str(tiny_qwen3), dtype="float32", enforce_eager=True, progress_bar=False, **overrides)
    linears = [m for m in llm.engine.model.modules() if type(m).__name__ == "Int8Linear"]
    assert linears and all(m.digits == 1 for m in linears)
    assert len(llm.generate_outputs([[1, 2, 3]], max_tokens=3, temperature=0)[0].outputs[0].token_ids) == 3


def test_priority_in_a_request_body_reaches_sampling_params():
    assert sampling_params({"priority": -3}, chat=True).priority == -3
    with pytest.raises(APIError) as e:
        sampling_params({"priority": "high"}, chat=False)
    assert e.value.param == "priority"


def test_attend_routes_decode_steps_to_the_decode_path():
    calls = []

    class Recorder(PagedAttentionBase):
        def prepare(self, batch):
            return "prefill-meta"

        def forward(self, cache, q, k, v, meta, window=0, scale=None):
            calls.append(("forward", meta, window, scale))
            return q

        def decode(self, cache, q, k, v, meta, window=0, scale=None):
            calls.append(("decode", meta, window, scale))
            return q

    backend = Recorder([q := torch.zeros(1, 1, 4)], [q], 16)
    backend.attend(backend.layer_cache(0), q, q, q, DecodeStep(backend.prepare_decode(None)))
    backend.attend(backend.layer_cache(0), q, q, q, backend.prepare(None), window=8, scale=0.25)
    # A layer's window and scale reach the backend; no scale means 1/sqrt(head_dim).
    assert calls == [("decode", "prefill-meta", 0, 0.5), ("forward", "prefill-meta", 8, 0.25)]

    class Incomplete(PagedAttentionBase):
        def prepare(self, batch):
            return None

        def forward(self, layer, q, k, v, meta):
            return q

    with pytest.raises(TypeError, match="decode"):
        Incomplete([], [], 16)


def import_graph() -> dict[str, set[str]]:
    """Every import of engine/, kernels/ (as engine.kernels) and server.py, lazy and TYPE_CHECKING ones too,
    as module -> the project modules it imports."""
    root = Path(__file__).resolve().parent.parent
    files = [root / "server.py", *root.glob("engine/**/*.py"), *root.glob("kernels/*.py")]

    def name_of(path: Path) -> str:
        parts = list(path.relative_to(root).with_suffix("").parts)
        parts = ["engine", *parts] if parts[0] == "kernels" else parts
        return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)

    modules = {name_of(f): f for f in files}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*parent, base] if base else parent)
                found.add(base)
                found.update(f"{base}.{a.name}" for a in node.names)
        graph[name] = {m for m in found if m in modules and m != name}
    return graph


def test_the_project_has_no_import_cycle():
    """No chain of imports leads back to where it started (two were hidden behind lazy imports: the engine and
    its ranks through exit_with_parent; the tokenizer and the HTTP error class through the tool-call parser)."""
    graph = import_graph()
    assert {"engine.llm_engine", "engine.kernels.paged", "server"} <= set(graph)  # the walk sees the project
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        for dep in sorted(graph[module]):
            assert dep not in path, "import cycle: " + " -> ".join([*path[path.index(dep) :], dep])
            if dep not in done:
                visit(dep, [*path, dep])
        done.add(module)

    for module in sorted(graph):
        visit(module, [module])

"""Every command the README shows, run in a smoke size, so the README cannot drift from the code.

Commands are read from the README itself (its bash blocks, the commands in its tables, and the Python
example). Each runs as written, with its model swapped for the tiny test checkpoint, compilation off, the
workload shrunk and outputs sent to a temporary folder; servers are started, asked for /health (and one
completion) and stopped. The install commands are the exception: `.ci/run` runs the test one verbatim,
and the server one differs from it only by what it starts, which is run here.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from live_server import ROOT, free_port, wait_ready

README = (ROOT / "README.md").read_text()
pytestmark = pytest.mark.slow

# Overrides that make each experiment a smoke run (applied over the command's own values).
SMOKE = {
    "offline_throughput.py": {"bench.num_requests": "4", "bench.input_len": "[4,8]", "bench.output_len": "[2,4]"},
    "matmul_bound.py": {"bench.num_requests": "4", "bench.input_len": "[4,8]", "bench.output_len": "[2,4]"},
    "prefix_sharing.py": {"bench.num_requests": "2", "bench.shared_prefix_len": "32", "bench.suffix_len": "[2,4]",
                          "bench.output_len": "2"},
    "serving_benchmark.py": {"bench.num_requests": "4", "bench.input_len": "[4,8]", "bench.output_len": "[2,4]"},
    "roofline.py": {"bench.batch_sizes": "[1,2]", "bench.steps": "2", "bench.context_len": "16",
                    "bench.bandwidth_mb": "16"},
    "server_startup.py": {},
    "soak.py": {"bench.clients": "4", "bench.duration_s": "2", "bench.distinct_prompts": "4"},
    "grammar_backends.py": {"bench.num_schemas": "3", "bench.steps": "4", "bench.batch_sizes": "[1,2]"},
    "structured_overhead.py": {"bench.batch": "4", "bench.decode_steps": "2", "bench.rounds": "1"},
    "scale_out.py": {"bench.replicas": "[1]", "bench.policies": "[round_robin]", "bench.prefixes": "1",
                     "bench.questions": "2", "bench.prefix_words": "8", "bench.max_tokens": "2",
                     "bench.overhead_rounds": "1"},
    "moe_overhead.py": {"bench.batch_sizes": "[1,2]", "bench.steps": "2", "bench.context_len": "8",
                        "bench.shape.hidden_size": "32", "bench.shape.num_hidden_layers": "2", "bench.num_experts": "4",
                        "bench.num_experts_per_tok": "2", "bench.moe_intermediate_size": "16"},
    "spec_decode.py": {"bench.llama_cpp": "false", "bench.new_tokens": "4", "bench.batch": "2", "bench.repeats": "1"},
    "gguf_types.py": {"model.path": "null", "bench.types": "[Q8_0]"},  # null: the embedded SmolLM2 GGUF
    "batch_invariance.py": {"bench.prompt_tokens": "4", "bench.new_tokens": "3", "bench.batch": "2",
                            "bench.prefill_tokens": "16", "bench.arrivals": "2", "bench.arrival_prompt_tokens": "4",
                            "bench.repeats": "1", "bench.check_prompts": "2", "bench.check_tokens": "2"},
    "overlap.py": {"bench.prompt_tokens": "4", "bench.new_tokens": "3", "bench.batch": "2",
                   "bench.prefill_tokens": "16", "bench.arrivals": "2", "bench.arrival_prompt_tokens": "4",
                   "bench.repeats": "1", "bench.check_prompts": "2", "bench.check_tokens": "2"},
    "cpu_vs_llamacpp.py": {"bench.llama_cpp": "false", "bench.modes": "[auto,int8]", "bench.prompt_tokens": "4",
                           "bench.new_tokens": "3", "bench.batch": "2", "bench.prefill_tokens": "16",
                           "bench.repeats": "1", "bench.fidelity_tokens": "2"},
}  # fmt: skip


OWN_SMOKE_TEST = {"gpu_report.py"}  # not a Hydra app: test_gpu_report_smoke_run runs it


def shell_commands() -> list[str]:
    """Logical lines of the README's bash blocks (continuations joined, comments dropped)."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip().removesuffix("&").strip()  # a trailing & only backgrounds it
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


def table_commands() -> list[str]:
    return [c for c in re.findall(r"\| `([^`|]+)` \|", README) if "python " in c]


def with_overrides(args: list[str], overrides: dict[str, str]) -> list[str]:
    """`args` with each `key=value` of `overrides` replacing the command's own value or appended."""
    out = [a for a in args if a.split("=", 1)[0] not in overrides]
    return out + [f"{k}={v}" for k, v in overrides.items()]


def split(command: str) -> tuple[dict[str, str], list[str]]:
    """Leading VAR=value assignments (with $(mktemp -d) made a real folder) and the argv."""
    env, args = {}, shlex.split(command)
    while args and re.fullmatch(r"[A-Z_]+=.*", args[0]):
        key, value = args.pop(0).split("=", 1)
        env[key] = subprocess.check_output(["mktemp", "-d"], text=True).strip() if value == "$(mktemp" else value
        if value == "$(mktemp":
            args.pop(0)  # the "-d)" half of the substitution
    return env, args


def run(args: list[str], env: dict[str, str], timeout: float = 600) -> str:
    # Without pytest-xdist's variables: a pytest started here is not one of its workers (pytest-benchmark
    # switches itself off inside one).
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")}, **env}
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{shlex.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


def experiment_runs(tiny: Path, tmp: Path) -> list[tuple[list[str], dict[str, str]]]:
    runs = []
    for command in shell_commands() + table_commands():
        env, args = split(command)
        if len(args) < 2 or args[0] != "python" or not args[1].startswith("experiments/"):
            continue
        script = Path(args[1]).name
        if script in OWN_SMOKE_TEST:
            continue
        overrides = {
            "model.path": str(tiny),
            "compile.enabled": "false",
            "device": "cpu",
            "hydra.run.dir": str(tmp / f"run{len(runs)}"),
            "hydra.sweep.dir": str(tmp / f"sweep{len(runs)}"),
            **SMOKE[script],
        }
        if "kv_cache.memory_mb" in command:
            overrides["kv_cache.memory_mb"] = "64"
        if "spec.model.path" in command:  # a draft model shares the target's tokenizer
            overrides["spec.model.path"] = str(tiny)
        runs.append(([sys.executable, *with_overrides(args[1:], overrides)], env))
    return runs


def test_the_readme_lists_the_commands_this_test_knows(tiny_qwen3, tmp_path):
    scripts = {Path(a[1]).name for a, _ in experiment_runs(tiny_qwen3, tmp_path)}
    assert scripts == set(SMOKE), "an experiment was added to or dropped from the README: update SMOKE"
    assert any(c.startswith("python server.py") for c in shell_commands())
    assert any("-m pytest tests/benchmarks" in c for c in shell_commands())


def test_ci_runs_the_readme_test_command_in_a_fresh_venv():
    test_command = next(c for c in shell_commands() if "pytest" in c and "pip install" in c)
    ci = (ROOT / ".ci" / "run").read_text()
    assert test_command in ci.splitlines()
    assert ci.index("python3 -m venv") < ci.index("source") < ci.index(test_command)


def test_experiment_commands(tiny_qwen3, tmp_path):
    # Two at a time, one thread each: the smoke runs are mostly interpreter start-up, imports and Hydra, on one
    # core (one after another they took 378 s of CI's 70 minutes).
    runs = [(args, {**env, "OMP_NUM_THREADS": "1"}) for args, env in experiment_runs(tiny_qwen3, tmp_path)]
    with ThreadPoolExecutor(max_workers=2) as pool:
        for out in pool.map(lambda r: run(*r), runs):
            assert "Traceback" not in out, out[-2000:]
    pngs = list(tmp_path.rglob("*.png"))
    assert len(pngs) >= 4, "each experiment with a plot should have drawn it"


def test_benchmark_commands(tiny_qwen3, tmp_path):
    env = {"ENGINE_BENCH_MODEL": str(tiny_qwen3), "ENGINE_BENCH_EAGER": "1"}
    for command in shell_commands():
        if "-m pytest tests/benchmarks" in command:
            args = [sys.executable, *shlex.split(command)[1:], f"--benchmark-storage=file://{tmp_path}", "-p",
                    "no:cacheprovider"]  # fmt: skip
            run(args, env)


def server_args(command: str, tiny: Path, port: int, tmp: Path) -> list[str]:
    args = shlex.split(command.split("&&")[-1])
    overrides = {"model.path": str(tiny), "compile.enabled": "false", "server.port": str(port),
                 "hydra.run.dir": str(tmp)}  # fmt: skip
    return [sys.executable, *with_overrides(args[1:], overrides)]


def test_server_commands(tiny_qwen3, tmp_path):
    for i, command in enumerate(c for c in shell_commands() if "python server.py" in c and "parallel." not in c):
        port = free_port()
        args = server_args(command, tiny_qwen3, port, tmp_path / str(i))
        if "--cfg" in args:
            assert "model:" in run(args, {})
            continue
        proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_ready(proc, url)
            key = re.search(r"server\.api_key=(\S+)", command)
            headers = {"Authorization": f"Bearer {key.group(1)}"} if key else {}
            r = httpx.post(f"{url}/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, headers=headers)
            assert r.status_code == 200, (command, r.text)
        finally:
            proc.send_signal(signal.SIGTERM)
            out, _ = proc.communicate(timeout=20)
        assert proc.returncode == 0 and "Traceback" not in out, out


def test_multi_node_commands(tiny_qwen3, tmp_path):
    """The two-node example, both nodes on this machine (loopback instead of 10.0.0.1)."""
    node0, node1 = [c for c in shell_commands() if "parallel.nnodes=2" in c]
    port, rendezvous = free_port(), str(free_port())
    local = {"parallel.master_addr": "127.0.0.1", "parallel.master_port": rendezvous}
    server = with_overrides(server_args(node0, tiny_qwen3, port, tmp_path / "node0"), local)
    worker = with_overrides([sys.executable, *shlex.split(node1)[1:]], {**local, "model.path": str(tiny_qwen3)})
    procs = [subprocess.Popen(a, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for a in (worker, server)]  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(procs[1], url, timeout=300)
        assert len(httpx.get(f"{url}/health").json()["tp_rank_pids"]) == 1  # node 0's other rank
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "Hi", "max_tokens": 3}, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    finally:
        procs[1].send_signal(signal.SIGTERM)
        deadline = time.time() + 30
        for p in procs:
            try:
                p.wait(max(1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0], [p.stdout.read()[-2000:] for p in procs]


def test_python_examples(tiny_qwen3, tmp_path):
    """The Python blocks, with the tiny model (LLM() would load and compile SmolLM2); the scheduler-policy
    example is saved as the module it shows and selected through the config, as the README says."""
    blocks = re.findall(r"```python\n(.*?)```", README, re.S)
    assert len(blocks) >= 3
    for code in blocks:
        if "(AdmissionPolicy)" in code:
            module = re.search(r"# engine/policies/(\w+)\.py", code).group(1)
            (tmp_path / f"{module}.py").write_text(code)
            name = re.search(r"class (\w+)\(AdmissionPolicy\)", code).group(1)
            code = (f"import sys; sys.path.insert(0, {str(tmp_path)!r})\nfrom engine import LLM\n"
                    f"llm = LLM({str(tiny_qwen3)!r}, enforce_eager=True, **{{'scheduler.policy': "
                    f"{{'_target_': '{module}.{name}'}}}})\nprint(type(llm.engine.scheduler.policy).__name__)\n"
                    "print(llm.generate(['a b c', 'a'], max_tokens=2))")  # fmt: skip
        code = code.replace("LLM()", f"LLM({str(tiny_qwen3)!r}, enforce_eager=True)")
        if "OpenAI(" in code:
            out = run_against_server(code, tiny_qwen3, tmp_path)
        else:
            out = run([sys.executable, "-c", code], {})
        assert out.count("\n") >= 2, out  # each block prints what it computed


def run_against_server(code: str, tiny: Path, tmp: Path) -> str:
    """An `openai` SDK block against a server of the tiny model under the embedded model's id, which the
    block names as the README tells clients to."""
    port = free_port()
    name = re.search(r'model="([^"]+)"', code).group(1)
    args = server_args("python server.py", tiny, port, tmp / "sdk") + [f"model.served_model_name={name}"]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(proc, url)
        assert httpx.get(f"{url}/v1/models").json()["data"][0]["id"] == name
        return run([sys.executable, "-c", code.replace("http://127.0.0.1:8000", url)], {})
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=20)


def test_gpu_report_smoke_run(tiny_qwen3, tmp_path):
    """experiments/gpu_report.py's stages in tiny sizes on CPU: each runs and reports its figure."""
    out = tmp_path / "gpu"
    run([sys.executable, "experiments/gpu_report.py", "--smoke", "--model", str(tiny_qwen3), "--out", str(out)], {})
    report = json.loads((out / "report.json").read_text())
    assert report["tests"]["rc"] == 0, report["tests"]
    assert report["start_cold"]["first_token_s"] > 0 and report["start_warm"]["first_token_s"] > 0
    assert report["throughput"]["tokens_per_s"] > 0 and report["batch1"]["tokens_per_s"] > 0
    assert report["throughput_overlap"]["tokens_per_s"] > 0


def test_gateway_commands(tiny_qwen3, tmp_path):
    """The scaling-out block as written: two replicas on their ports, the gateway in front, a request through it."""
    block = next(b for b in re.findall(r"```bash\n(.*?)```", README, re.S) if "sglang_router" in b)
    lines = [line.split("  #")[0].strip().removesuffix("&").strip() for line in block.splitlines() if line.strip()]
    procs = []
    try:
        for i, command in enumerate(c for c in lines if c.startswith("python server.py")):
            port = int(re.search(r"server\.port=(\d+)", command).group(1))
            procs.append(subprocess.Popen(server_args(command, tiny_qwen3, port, tmp_path / str(i)), cwd=ROOT,
                                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))  # fmt: skip
            wait_ready(procs[-1], f"http://127.0.0.1:{port}")
        router = shlex.split(next(c for c in lines if "sglang_router" in c))
        port = router[router.index("--port") + 1]
        procs.append(
            subprocess.Popen([sys.executable, *router[1:]], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        )
        url = f"http://127.0.0.1:{port}"
        deadline, models = time.time() + 60, []
        while time.time() < deadline and not models:
            try:
                models = httpx.get(f"{url}/v1/models", timeout=1).json().get("data")
            except (httpx.HTTPError, ValueError):
                time.sleep(0.5)
        body = {"model": models[0]["id"], "prompt": "Hi", "max_tokens": 2}  # the gateway requires `model`
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2, r.text
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(30)

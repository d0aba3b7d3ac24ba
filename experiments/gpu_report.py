"""One command for a lent GPU: correctness tests on CUDA, start-up (cold and warm), nano-vllm's workload, and
batch-1 decode (and nano-vllm's workload again with `overlap=true`, in the time left), each stage under its own
timeout with a progress line every few seconds, into one JSON.

    python experiments/gpu_report.py --out /tmp/gpu               # the H200 run (about 8 minutes)
    python experiments/gpu_report.py --smoke --out /tmp/gpu-smoke # tiny sizes on CPU (a test runs this)

Each stage is a subprocess (a crash or a hang costs that stage, not the report). The throughput stage is
experiments/offline_throughput.py on nano-vllm's workload (256 requests, prompts and outputs of U[100, 1024]
tokens, ignore_eos) with a Qwen3-0.6B-shaped random checkpoint in bf16.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROGRESS_S = 5.0

# The step sizes of nano-vllm's and Mini-SGLang's offline benchmarks (max_num_seqs 256+, 16k-token prefill
# steps), and a pool that holds every request at its longest.
GPU_ENGINE = [
    "device=cuda", "model=qwen3", "model.path=random-qwen3-0.6b", "model.max_model_len=2048",
    "scheduler.max_running_requests=256", "scheduler.max_num_batched_tokens=16384", "kv_cache.memory_mb=61440",
]  # fmt: skip
SMOKE_ENGINE = [
    "device=cpu", "dtype=float32", "compile.enabled=false", "kv_cache.memory_mb=64",
    "scheduler.max_num_batched_tokens=64",
]  # fmt: skip

# First token after start: build the engine, then one request. Prints the seconds since the process began.
FIRST_TOKEN = """
import os, sys, time
from engine import LLM
from engine.config import compose_overrides
llm = LLM(config=compose_overrides(sys.argv[1:]))
llm.generate([[11, 22, 33, 44]], max_tokens=1, temperature=0)
print("FIRST_TOKEN_S", time.time() - float(os.environ["REPORT_T0"]))
"""


# Where a decode step's time goes at 256 rows: the engine's own steps (no frontend), timed, then profiled.
PROFILE = """
import random, sys, time, torch
from torch.profiler import ProfilerActivity, profile
from engine import LLM, SamplingParams
from engine.config import compose_overrides
rows = int(sys.argv.pop()) if sys.argv[-1].isdigit() else 256
engine = LLM(config=compose_overrides(sys.argv[1:])).engine
rng = random.Random(0)
longest = engine.max_model_len
for i in range(rows):  # nano-vllm's prompts, decoding until the context is full
    prompt = [rng.randrange(100, 1000) for _ in range(rng.randint(min(100, longest // 4), min(1024, longest // 2)))]
    params = SamplingParams(max_tokens=longest - len(prompt), temperature=0, ignore_eos=True)
    engine.add_sequence(f"p{i}", prompt, params)
t, steps = time.perf_counter(), 0
while engine.scheduler.waiting:
    engine.step()
    steps += 1
print("PREFILL_STEPS", steps, "SECONDS", time.perf_counter() - t)
for _ in range(10):
    engine.step()
sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
sync()
t = time.perf_counter()
for _ in range(30):
    engine.step()
sync()
print("DECODE_STEP_MS", (time.perf_counter() - t) / 30 * 1000, "ROWS", len(engine.scheduler.running))
graphs = engine.runner.decode_graphs
if graphs is not None:  # the captured graph alone: the device's share of a step
    replay = graphs.replays[graphs.bucket(len(engine.scheduler.running))]
    sync()
    t = time.perf_counter()
    for _ in range(30):
        replay()
    sync()
    print("GRAPH_REPLAY_MS", (time.perf_counter() - t) / 30 * 1000)
activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
with profile(activities=activities) as prof:
    for _ in range(5):
        engine.step()
sort = "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
print(prof.key_averages().table(sort_by=sort, row_limit=20, max_name_column_width=60))
print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=20, max_name_column_width=60))
"""


def run_stage(name: str, args: list[str], timeout: float, log_dir: Path, env: dict[str, str] | None = None) -> dict:
    """Run `args`, echoing its lines and a progress line when it is silent; kill its process group at the
    timeout. Returns rc, seconds and the output's tail."""
    if timeout < 10:
        print(f"== {name}: skipped (the report's time budget is spent)", flush=True)
        return {"rc": None, "skipped": True, "tail": []}
    print(f"== {name}: {' '.join(args)} (timeout {timeout:.0f} s)", flush=True)
    start = time.time()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "REPORT_T0": str(start), **(env or {})}
    proc = subprocess.Popen(
        args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    lines: list[str] = []
    last = [time.time()]

    def read() -> None:
        with open(log_dir / f"{name}.log", "w") as log:
            for line in proc.stdout:
                lines.append(line.rstrip())
                log.write(line)
                print(f"  [{name} {time.time() - start:5.0f}s] {line.rstrip()}"[:400], flush=True)
                last[0] = time.time()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    timed_out = False
    while proc.poll() is None:
        time.sleep(1)
        if time.time() - start > timeout:
            timed_out = True
            os.killpg(proc.pid, signal.SIGKILL)
            break
        if time.time() - last[0] > PROGRESS_S:
            print(f"  [{name} {time.time() - start:5.0f}s] (running)", flush=True)
            last[0] = time.time()
    proc.wait()
    reader.join(5)
    result = {"rc": proc.returncode, "seconds": round(time.time() - start, 1), "timed_out": timed_out}
    print(f"== {name}: rc={proc.returncode} in {result['seconds']} s{' (timed out)' if timed_out else ''}", flush=True)
    return {**result, "tail": lines[-15:]}


def _path() -> str:
    """PYTHONPATH with experiments/ first (for `import workloads`)."""
    return os.pathsep.join(p for p in (str(ROOT / "experiments"), os.environ.get("PYTHONPATH", "")) if p)


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def value(lines: list[str], key: str) -> float | None:
    found = [line.split(key, 1)[1].split()[0] for line in lines if key in line]
    return float(found[-1]) if found else None


def throughput(name: str, overrides: list[str], timeout: float, out: Path, env: dict[str, str]) -> dict:
    run_dir = Path(tempfile.mkdtemp(prefix=f"gpu-report-{name}-"))  # only the logs and the JSON go to --out
    args = [sys.executable, "experiments/offline_throughput.py", *overrides, f"hydra.run.dir={run_dir}"]
    result = run_stage(name, args, timeout, out, env)
    rows = (run_dir / "results.jsonl").read_text().splitlines() if (run_dir / "results.jsonl").exists() else []
    if rows:
        row = json.loads(rows[-1])
        result.update({k: row[k] for k in ("tokens_per_s", "output_tokens", "requests", "load_s") if k in row})
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for report.json and the stages' logs")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on CPU, to check the script itself")
    parser.add_argument("--model", default=None, help="smoke: a checkpoint to use instead of the random 0.6B")
    parser.add_argument("--budget", type=float, default=480, help="seconds for all stages; later ones are skipped")
    a = parser.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    deadline = time.time() + a.budget
    report: dict = {"smoke": a.smoke, "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    engine = SMOKE_ENGINE + ([f"model.path={a.model}"] if a.model else []) if a.smoke else GPU_ENGINE

    def left(want: float) -> float:
        return min(want, deadline - time.time())

    def save() -> None:
        (a.out / "report.json").write_text(json.dumps(report, indent=1))

    import torch

    report["torch"] = torch.__version__
    report["gpu"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    # The checkpoint is built once (20-30 s on the GPU machine) before anything is timed.
    if not a.smoke or not a.model:
        prep = "import workloads; print(workloads.random_qwen3_checkpoint())"
        stage = run_stage("checkpoint", [sys.executable, "-c", prep], left(120), a.out, {"PYTHONPATH": _path()})
        engine = [o for o in engine if not o.startswith("model.path")] + [f"model.path={stage['tail'][-1]}"]
    # The figures first (a slow compilation must not cost them), the tests with the time left.
    cache = tempfile.mkdtemp(prefix="inductor-")  # cold: an empty inductor cache; warm: the same one again
    for kind in ("cold", "warm"):
        stage = run_stage(
            f"start_{kind}", [sys.executable, "-c", FIRST_TOKEN, *engine], left(150), a.out,
            env={"TORCHINDUCTOR_CACHE_DIR": cache},
        )  # fmt: skip
        report[f"start_{kind}"] = {**stage, "first_token_s": value(stage["tail"], "FIRST_TOKEN_S")}
        save()
    if report["start_warm"].get("first_token_s") is None:  # compiling failed or ran out of time: eager graphs
        engine.append("compile.enabled=false")
        report["eager_fallback"] = True
    env = {"TORCHINDUCTOR_CACHE_DIR": cache}
    workload = ["bench.num_requests=256", "bench.input_len=[100,1024]", "bench.output_len=[100,1024]"]
    batch1 = ["bench.num_requests=1", "bench.input_len=[32,32]", "bench.output_len=[512,512]"]
    if a.smoke:
        workload = ["bench.num_requests=6", "bench.input_len=[4,16]", "bench.output_len=[4,8]"]
        batch1 = ["bench.num_requests=1", "bench.input_len=[4,4]", "bench.output_len=[8,8]"]
    report["throughput"] = throughput("throughput", [*engine, *workload], left(180), a.out, env)
    save()
    report["batch1"] = throughput("batch1", [*engine, *batch1], left(60), a.out, env)
    save()
    tests = ["tests/test_correctness.py", "tests/test_decode_attention.py", "tests/test_gpu_step.py"]
    # Smoke: one CPU test of the Triton kernel (interpreted), enough to see the stage work.
    selection = ["-k", "step_attention_matches and triton"] if a.smoke else ["--device", "cuda"]
    pytest = [sys.executable, "-m", "pytest", "-q", "-m", "not slow", *tests, *selection]
    report["tests"] = run_stage("tests", pytest, left(150), a.out)
    save()
    rows = ["8"] if a.smoke else []
    stage = run_stage("profile", [sys.executable, "-c", PROFILE, *engine, *rows], left(120), a.out, env)
    found = _lines(a.out / "profile.log")
    figures = {"decode_step_ms": "DECODE_STEP_MS", "graph_replay_ms": "GRAPH_REPLAY_MS", "prefill_s": "SECONDS"}
    report["profile"] = {**stage, **{k: value(found, key) for k, key in figures.items()}}
    save()
    # Last, with what time is left: the same workload with overlap scheduling (engine/overlap.py).
    overlapped = [*engine, *workload, "overlap=true"]
    report["throughput_overlap"] = throughput("throughput_overlap", overlapped, left(180), a.out, env)
    report["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    save()
    print(json.dumps({k: v if not isinstance(v, dict) else {x: y for x, y in v.items() if x != "tail"}
                      for k, v in report.items()}, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()

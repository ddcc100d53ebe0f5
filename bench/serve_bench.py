"""Benchmark of ``bayeslora serve``: decoding throughput (confidence vs plain generation, S posterior samples) and a
bounded load test over loopback. Writes a Markdown report (with the command, hardware and versions) and JSON.

    python bench/serve_bench.py --model smollm2-135m --run RUN_DIR --out docs/results/serve.md

docs/results/serve.md was made with an MLE run trained for 3 steps (its weights do not change the cost)::

    flock /tmp/bayeslora-cpu.lock bayeslora train --model smollm2-135m --dataset arith --max-steps 3 \
        --batch-size 4 --save-every 0 --out /tmp/serve-bench/mle
    flock /tmp/bayeslora-cpu.lock python bench/serve_bench.py --model smollm2-135m --run /tmp/serve-bench/mle \
        --max-tokens 32 --repeats 5 --samples 4,10 --clients 16 --duration 30 --load-max-tokens 8

Everything runs in this process: the server is uvicorn in a thread bound to 127.0.0.1 on a free port, and it is
stopped at the end. Every phase is bounded by a request count or a duration.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

PROMPT = [{"role": "user", "content": "Explain in two sentences why the sky is blue."}]


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def _plain_generate(run, prompt_ids: list[int], max_tokens: int) -> int:
    """transformers ``generate`` (greedy, KV cache, no scores): the plain-generation baseline."""
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = run.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                                 min_new_tokens=max_tokens, do_sample=False, pad_token_id=run.tokenizer.pad_token_id)
    return out.shape[1] - ids.shape[1]


def _service_generate(service, prompt_ids: list[int], max_tokens: int, samples: int, seed: int = 0) -> int:
    """The server's decoding loop (mean predictive, per-token entropy/epistemic, confidence), stop tokens off."""
    from bayeslora.serve.generation import DecodeParams

    params = DecodeParams(max_tokens=max_tokens, temperature=0.0, n_samples=samples)
    return service._generate(prompt_ids, params, [], torch.Generator().manual_seed(seed)).confidence.n_tokens


def _http_generate(client, url: str, model: str, max_tokens: int) -> int:
    r = client.post(f"{url}/v1/chat/completions", json={"model": model, "messages": PROMPT, "max_tokens": max_tokens,
                                                        "temperature": 0})
    r.raise_for_status()
    return r.json()["usage"]["completion_tokens"]


def _interleaved(paths: dict, repeats: int) -> dict[str, float]:
    """Median tokens/s of each path, the paths taking turns so that load from other jobs hits them alike."""
    rates: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(repeats):
        for name, fn in paths.items():
            t0 = time.perf_counter()
            n = fn()
            rates[name].append(n / (time.perf_counter() - t0))
    return {name: statistics.median(r) for name, r in rates.items()}


def _load_test(url: str, model: str, clients: int, duration: float, max_tokens: int) -> dict:
    """``clients`` threads send chat completions back to back until ``duration`` seconds have passed."""
    import httpx

    stop_at = time.monotonic() + duration
    latencies: list[float] = []
    errors: list[str] = []
    tokens = [0]
    lock = threading.Lock()

    def client_loop(k: int) -> None:
        with httpx.Client(trust_env=False, timeout=300) as client:
            i = 0
            while time.monotonic() < stop_at:
                body = {"model": model, "messages": [{"role": "user", "content": f"Client {k}, request {i}: hello"}],
                        "max_tokens": max_tokens, "temperature": 0.7, "seed": i}
                t0 = time.perf_counter()
                try:
                    r = client.post(f"{url}/v1/chat/completions", json=body)
                    ok = r.status_code == 200 and 0.0 <= r.json()["choices"][0]["confidence"]["score"] <= 1.0
                except Exception as exc:  # noqa: BLE001 - counted and reported
                    ok, r = False, exc
                with lock:
                    if ok:
                        latencies.append(time.perf_counter() - t0)
                        tokens[0] += r.json()["usage"]["completion_tokens"]
                    else:
                        errors.append(str(getattr(r, "status_code", r)))
                i += 1

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client_loop, range(clients)))
    wall = time.perf_counter() - t0
    return {"clients": clients, "duration_s": round(wall, 1), "requests": len(latencies), "errors": len(errors),
            "error_samples": errors[:5], "max_tokens": max_tokens,
            "p50_s": round(_percentile(latencies, 50), 3) if latencies else None,
            "p99_s": round(_percentile(latencies, 99), 3) if latencies else None,
            "mean_s": round(statistics.mean(latencies), 3) if latencies else None,
            "req_per_s": round(len(latencies) / wall, 2), "tokens_per_s": round(tokens[0] / wall, 1)}


def _gaussian_posterior(run, std: float) -> None:
    """Make the run's LoRA A factors Gaussian (std ``std``): the shape and cost of a BLoB-style posterior."""
    from bayeslora.peft_ext import GaussianLoraA, replace_lora_A

    replace_lora_A(run.model, lambda name, lin: GaussianLoraA(lin, torch.full_like(lin.weight, std),
                                                             std_fn=lambda r: r, trainable=False))


def _environment() -> dict:
    import transformers

    try:
        cpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        cpu = next((line.split(":", 1)[1].strip() for line in cpu.splitlines() if line.startswith("Model name")), "?")
    except OSError:
        cpu = platform.processor()
    return {"cpu": cpu, "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="base model spec")
    p.add_argument("--run", default=None, help="run directory (the MLE adapter); default: the base model with "
                   "an untrained default LoRA adapter")
    p.add_argument("--max-tokens", type=int, default=32, help="tokens per throughput request")
    p.add_argument("--repeats", type=int, default=5, help="requests per throughput path (interleaved, median)")
    p.add_argument("--samples", default="4,10", help="posterior sample counts S to compare with S=1")
    p.add_argument("--posterior-std", type=float, default=0.05, help="std of the Gaussian LoRA A posterior")
    p.add_argument("--clients", type=int, default=16, help="concurrent load-test clients")
    p.add_argument("--duration", type=float, default=30.0, help="load-test duration (s)")
    p.add_argument("--load-max-tokens", type=int, default=8, help="tokens per load-test request")
    p.add_argument("--out", default="docs/results/serve.md", help="Markdown report (JSON next to it)")
    args = p.parse_args(argv)

    from bayeslora.serve import InferenceService, ServeSettings
    from bayeslora.serve.protocol import ChatMessage
    from bayeslora.serve.server import background_server

    settings = ServeSettings(queue_size=max(64, 2 * args.clients), max_tokens=max(args.max_tokens, 512))
    service = InferenceService.load(args.run, args.model if args.run is None else None, settings)
    if args.run is None:  # an untrained default LoRA adapter: the same compute as a trained MLE adapter
        from bayeslora.methods import AdapterConfig

        service.run.model = service.run.method.prepare(service.run.model, AdapterConfig()).eval()
    prompt_ids = service.chat_prompt([ChatMessage(**m) for m in PROMPT])
    service.stop_ids = frozenset()  # count exactly max_tokens tokens, as generate(min_new_tokens=...) does
    results: dict = {"env": _environment(), "model": args.model, "run": args.run, "method": service.method_name,
                     "prompt_tokens": len(prompt_ids), "max_tokens": args.max_tokens, "repeats": args.repeats}
    import httpx

    M = args.max_tokens
    _plain_generate(service.run, prompt_ids, 4), _service_generate(service, prompt_ids, 4, 1)  # warm-up
    with background_server(settings, service) as url, httpx.Client(trust_env=False, timeout=600) as client:
        t = _interleaved({"plain": lambda: _plain_generate(service.run, prompt_ids, M),
                          "service": lambda: _service_generate(service, prompt_ids, M, 1),
                          "http": lambda: _http_generate(client, url, service.model_id, M)}, args.repeats)
        load = _load_test(url, service.model_id, args.clients, args.duration, args.load_max_tokens)
    results["throughput"] = {"plain_generate_tok_s": round(t["plain"], 2), "service_confidence_tok_s":
                             round(t["service"], 2), "http_confidence_tok_s": round(t["http"], 2),
                             "ratio_service_vs_plain": round(t["service"] / t["plain"], 3),
                             "ratio_http_vs_plain": round(t["http"] / t["plain"], 3)}
    results["load_test"] = load
    _gaussian_posterior(service.run, args.posterior_std)
    sample_counts = [1] + [int(x) for x in args.samples.split(",") if x and int(x) > 1]
    rates = _interleaved({S: (lambda S=S: _service_generate(service, prompt_ids, M, S)) for S in sample_counts},
                         args.repeats)
    results["posterior_samples"] = {f"S={S}": {"tok_s": round(rates[S], 2), "cost_vs_S1": round(rates[1] / rates[S], 2)}
                                    for S in sample_counts}
    write_report(Path(args.out), results, argv if argv is not None else sys.argv[1:])
    print(json.dumps(results, indent=2))
    return 0


def write_report(out: Path, r: dict, argv: list[str]) -> None:
    from bayeslora.io_utils import atomic_write_text

    env, t, load = r["env"], r["throughput"], r["load_test"]
    command = "python bench/serve_bench.py " + " ".join(shlex.quote(a) for a in argv)
    lines = [
        "# `bayeslora serve`: throughput and load", "",
        f"Generated by `bench/serve_bench.py` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.", "",
        f"- command: `{command}`",
        f"- hardware: {env['cpu']}, {env['torch_threads']} torch threads (2 cores, shared with other jobs)",
        f"- versions: Python {env['python']}, torch {env['torch']}, transformers {env['transformers']}",
        (f"- model: `{r['model']}`, run: `{r['run']}` (method `{r['method']}`), prompt {r['prompt_tokens']} tokens, "
         f"{r['max_tokens']} generated tokens per request (greedy, stop tokens off), {r['repeats']} interleaved "
         "requests per path, median tokens/s"), "",
        "## Decoding throughput (one request at a time)", "",
        "| path | tokens/s | ratio vs plain |", "|---|---:|---:|",
        f"| plain `model.generate` (greedy, KV cache) | {t['plain_generate_tok_s']} | 1.00 |",
        (f"| service decoding with confidence (in-process) | {t['service_confidence_tok_s']} | "
         f"{t['ratio_service_vs_plain']} |"),
        f"| `POST /v1/chat/completions` over loopback HTTP | {t['http_confidence_tok_s']} | {t['ratio_http_vs_plain']} |",
        "", "## Posterior samples decoded as one batch (Gaussian LoRA A posterior, BLoB-shaped)", "",
        "S = 1 here runs the same stochastic layers outside a sampling context (the posterior mean).", "",
        "| S | tokens/s | cost vs S=1 |", "|---|---:|---:|",
        *[f"| {k[2:]} | {v['tok_s']} | {v['cost_vs_S1']} |" for k, v in r["posterior_samples"].items()],
        "", "## Load test (loopback, bounded)", "",
        (f"{load['clients']} concurrent clients sending `/v1/chat/completions` (max_tokens {load['max_tokens']}, "
         f"temperature 0.7) back to back for {load['duration_s']} s, served by one worker from the bounded queue:"), "",
        "| requests | errors | p50 latency (s) | p99 latency (s) | requests/s | tokens/s |",
        "|---:|---:|---:|---:|---:|---:|",
        (f"| {load['requests']} | {load['errors']} | {load['p50_s']} | {load['p99_s']} | {load['req_per_s']} | "
         f"{load['tokens_per_s']} |"), "",
        "Latency includes queueing: with one worker, p50 is about (clients x service time per request).", "",
    ]
    atomic_write_text(out, "\n".join(lines))
    atomic_write_text(out.with_suffix(".json"), json.dumps(r, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())

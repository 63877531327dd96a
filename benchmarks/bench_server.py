"""The server under load on loopback: continuous batching against the same requests one at a time.

Starts `idefics2 serve` in a subprocess (so its CPU and memory are its own) and drives it from a
light asyncio client in this process (its CPU share of the wall time is reported, as the clients
share the machine's cores with the server). All in one run, so the ratios compare like with like
on a shared, noisy machine. Phases:

- throughput: `--clients` concurrent clients x `--per-client` requests, against the same requests
  sent one at a time; every answer must equal its one-at-a-time answer (greedy). Workload "long":
  64 new tokens, images drawn from a pool of 16; "short": 16 new tokens, every image different.
  Requests/s, p50/p95/p99 latency and time to first token.
- disconnect: 64 streaming clients, half of which leave after their first tokens; the rest must be
  answered, the server's CPU idle within a second of the last leaving, a new request answered.
- refusals: a 30 MB body (413) and a 13000x13000 PNG header (400) sent while a stream runs: the
  largest gap between the stream's tokens, against its gaps without them; then an admitted
  9000x9000 image.
- rss: server RSS after 100 and after 1,000 small requests.

    .venv/bin/python benchmarks/bench_server.py --model small        # ~166M config, random weights
    .venv/bin/python benchmarks/bench_server.py --model shipped --phases throughput,disconnect,refusals,rss
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


# ------------------------------------------------------------------------------------------ setup
def small_model_folder(out: Path) -> Path:
    """The generation benchmark's ~166M config with its deterministic random weights, and the
    Hub-like processor files of the test fixture."""
    from bench_generate import PRESETS, build

    model = build("ours", PRESETS["small"], "cpu", __import__("torch").float32)
    model.save_pretrained(out)
    for f in (ROOT / "tests" / "fixtures" / "hub-like-tokenizer").iterdir():
        shutil.copy(f, out / f.name)
    return out


def photo_pool(count: int, distinct: bool) -> list[str]:
    """`count` data URIs of photos (skimage's), each one different when `distinct` (a different
    crop), else cycling through 16."""
    import skimage.data
    from PIL import Image

    photos = [Image.fromarray(getattr(skimage.data, n)()).convert("RGB") for n in
              ("astronaut", "coffee", "chelsea", "rocket")]
    uris = []
    for i in range(count if distinct else 16):
        base = photos[i % 4]
        w, h = base.size
        crop = base.crop((i % 13, (i // 13) % 11, w - (i % 7), h - (i // 7) % 5)).resize((320 + i % 16 * 8, 240))
        buf = io.BytesIO()
        crop.save(buf, "PNG")
        uris.append("data:image/png;base64," + base64.b64encode(buf.getvalue()).decode())
    return [uris[i % len(uris)] for i in range(count)]


def start_server(model: str | None, port: int, max_batch: int, max_len: int) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "idefics2.cli", "serve", "--port", str(port), "--max-batch-size", str(max_batch),
           "--max-model-len", str(max_len), "--max-queue", "512"]
    if model:
        cmd += ["--model", model]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.3)
    proc.kill()
    raise SystemExit("the server did not start")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024
    return float("nan")


# ----------------------------------------------------------------------------------------- client
def chat(text: str, image: str | None, max_tokens: int, **extra: Any) -> dict[str, Any]:
    content: list[dict[str, Any]] = [{"type": "text", "text": text}]
    if image:
        content.insert(0, {"type": "image_url", "image_url": {"url": image}})
    return {"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens, "min_tokens": max_tokens,
            "temperature": 0, **extra}


async def stream_one(client: httpx.AsyncClient, url: str, body: dict[str, Any],
                     leave_after: int | None = None) -> dict[str, Any]:
    """One streamed request: its text, latency, time to first token and token arrival times."""
    start = time.perf_counter()
    text, stamps = [], []
    async with client.stream("POST", url, json={**body, "stream": True}) as response:
        if response.status_code != 200:
            return {"status": response.status_code}
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line.endswith("[DONE]"):
                continue
            delta = json.loads(line[6:])["choices"][0]["delta"].get("content")
            if delta:
                stamps.append(time.perf_counter())
                text.append(delta)
                if leave_after is not None and len(stamps) >= leave_after:
                    break
    end = time.perf_counter()
    return {"status": 200, "text": "".join(text), "latency": end - start,
            "ttft": (stamps[0] - start) if stamps else float("nan"), "stamps": stamps}


def percentiles(values: list[float]) -> str:
    q = statistics.quantiles(values, n=100, method="inclusive")
    return f"{q[49]:.2f} / {q[94]:.2f} / {q[98]:.2f}"


async def throughput(url: str, workload: str, clients: int, per_client: int) -> dict[str, Any]:
    max_tokens, distinct = (64, False) if workload == "long" else (16, True)
    images = photo_pool(clients * per_client, distinct)
    bodies = [chat(f"Question {i}: what is in the photo?", images[i], max_tokens) for i in range(len(images))]
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=clients + 4)) as client:
        await stream_one(client, url, bodies[0])  # warm-up (not counted)
        results: dict[str, Any] = {}
        for mode in ("one at a time", "concurrent"):
            cpu, wall = time.process_time(), time.perf_counter()
            if mode == "one at a time":
                answers = [await stream_one(client, url, b) for b in bodies]
            else:
                async def worker(k: int) -> list[dict[str, Any]]:
                    return [await stream_one(client, url, bodies[k * per_client + j]) for j in range(per_client)]
                answers = [a for part in await asyncio.gather(*(worker(k) for k in range(clients))) for a in part]
            wall = time.perf_counter() - wall
            results[mode] = {"answers": answers, "wall": wall, "client_cpu": (time.process_time() - cpu) / wall}
    alone, together = results["one at a time"]["answers"], results["concurrent"]["answers"]
    same = sum(a["text"] == b["text"] for a, b in zip(alone, together))
    rows = []
    for mode, r in results.items():
        answers = r["answers"]
        rows.append(f"| {workload} | {mode} | {len(answers) / r['wall']:.2f} | "
                    f"{percentiles([a['latency'] for a in answers])} | {percentiles([a['ttft'] for a in answers])} | "
                    f"{r['client_cpu']:.0%} |")
    ratio = results["one at a time"]["wall"] / results["concurrent"]["wall"]
    return {"rows": rows, "ratio": ratio, "same": f"{same}/{len(alone)}"}


async def disconnects(url: str, pid: int, image: str) -> str:
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=80)) as client:
        body = chat("Describe the photo.", image, 48)
        runs = [stream_one(client, url, body, leave_after=2 if i % 2 else None) for i in range(64)]
        answers = await asyncio.gather(*runs)
        kept = [a for i, a in enumerate(answers) if i % 2 == 0]
        answered = sum(a["status"] == 200 and len(a["stamps"]) > 0 for a in kept)
        before = cpu_seconds(pid)
        await asyncio.sleep(1.0)
        idle = cpu_seconds(pid) - before
        start = time.perf_counter()
        fresh = await stream_one(client, url, chat("Hi", None, 4))
        return (f"64 streaming clients, 32 leave after 2 tokens: {answered}/32 others answered; server CPU in the "
                f"second after: {idle:.2f} s; a new request then took {time.perf_counter() - start:.2f} s "
                f"(status {fresh['status']})")


def png_header(width: int, height: int) -> str:
    from PIL import Image

    raw = io.BytesIO()
    Image.new("RGB", (2, 2)).save(raw, "PNG")
    data = bytearray(raw.getvalue())
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return "data:image/png;base64," + base64.b64encode(bytes(data)).decode()


def big_image(side: int) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (side, side), (200, 30, 30)).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


async def refusals(url: str, image: str) -> list[str]:
    lines = []
    async with httpx.AsyncClient(timeout=600) as client:
        async def gaps_while(disturb: Any) -> tuple[float, float, list[int]]:
            task = asyncio.create_task(stream_one(client, url, chat("Describe the photo.", image, 400)))
            await asyncio.sleep(1.0)
            statuses = await disturb()
            answer = await task
            gaps = [b - a for a, b in zip(answer["stamps"], answer["stamps"][1:])]
            return statistics.median(gaps), max(gaps), statuses

        async def nothing() -> list[int]:
            await asyncio.sleep(1.0)
            return []

        async def refused() -> list[int]:
            body = await client.post(url, content=b"x" * 30_000_000, headers={"content-type": "application/json"})
            header = await client.post(url, json=chat("What is it?", png_header(13000, 13000), 4))
            return [body.status_code, header.status_code]

        async def admitted() -> list[int]:
            return [(await client.post(url, json=chat("What is it?", big_image(9000), 4))).status_code]

        for name, disturb in (("nothing", nothing), ("30 MB body + 13000^2 header", refused),
                              ("admitted 9000^2 image", admitted)):
            median, worst, statuses = await gaps_while(disturb)
            lines.append(f"running stream while {name}: median token gap {median * 1000:.0f} ms, largest "
                         f"{worst * 1000:.0f} ms; statuses {statuses}")
    return lines


async def rss(url: str, pid: int) -> str:
    async with httpx.AsyncClient(timeout=600) as client:
        after = {}
        for i in range(1000):
            await client.post(url, json=chat(f"Say {i}", None, 2))
            if i + 1 in (100, 1000):
                after[i + 1] = rss_mib(pid)
    return f"server RSS after 100 requests {after[100]:.0f} MiB, after 1000 {after[1000]:.0f} MiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="small", help="small (~166M, random weights) or shipped")
    parser.add_argument("--phases", default="throughput,disconnect,refusals,rss")
    parser.add_argument("--workloads", default="long,short")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--per-client", type=int, default=8)
    args = parser.parse_args()
    phases = args.phases.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        folder = str(small_model_folder(Path(tmp))) if args.model == "small" else None
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        server = start_server(folder, port, max_batch=args.clients, max_len=1024)
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        try:
            print(f"model {args.model}; server pid {server.pid}; torch threads as the server chose; one run, "
                  "compare within it only")
            image = photo_pool(1, True)[0]
            if "throughput" in phases:
                print("| workload | mode | requests/s | latency p50/p95/p99 s | TTFT p50/p95/p99 s | client CPU |")
                print("|---|---|---|---|---|---|")
                for workload in args.workloads.split(","):
                    result = asyncio.run(throughput(url, workload, args.clients, args.per_client))
                    print("\n".join(result["rows"]))
                    print(f"| {workload} | ratio | **{result['ratio']:.2f}x** | answers equal: {result['same']} | | |")
            if "disconnect" in phases:
                print(asyncio.run(disconnects(url, server.pid, image)))
            if "refusals" in phases:
                print("\n".join(asyncio.run(refusals(url, image))))
            if "rss" in phases:
                print(asyncio.run(rss(url, server.pid)))
        finally:
            server.terminate()
            server.wait(30)


if __name__ == "__main__":
    main()

"""Multi-GPU scaling under each ingress: the same app and load at N GPUs of one host.

Ready to run on nvidia-h100-x2 (the published RMBG-2.0 code in third_party/rmbg20); each
command starts one cluster and warms its replicas once (estimated 3 minutes each, 9 for the
three), prints a JSON line per run and writes its file:

    export NCCL_NVLS_ENABLE=0 RAY_AUTH_MODE=disabled HF_HUB_OFFLINE=1 YOLO_OFFLINE=1
    python -m benchmarks.scaling_bench --ingress default --gpus 2,1 \\
        --transports http,grpc --duration 6 --out scaling-default.json
    python -m benchmarks.scaling_bench --ingress haproxy --gpus 2,1 \\
        --transports http,grpc --duration 6 --out scaling-haproxy.json
    python -m benchmarks.scaling_bench --ingress haproxy-throughput --gpus 2,1 \\
        --transports http,grpc --duration 6 --out scaling-haproxy-throughput.json

``--ingress default,haproxy,haproxy-throughput`` does the same in one command; ``throughput``
(direct ingress without HAProxy: the load goes to the Router replicas' own ports) is the
fourth variant.

With a YOLO that finds objects (the trained stand-in at 320, ``configs/gpu-bench-trained.yaml``)
on synthetic product shots with 2-3 products each (``--frames synthetic``, ``benchmarks.frames``):

    python -m benchmarks.scaling_bench --config configs/gpu-bench-trained.yaml \\
        --frames synthetic --ingress default --gpus 2,1 --transports http,grpc \\
        --scenarios yolo-frames --duration 6 --out scaling-trained.json

For each ingress variant (``benchmarks.ingress``: Ray Serve's own switches, set in the
environment of ``ray start``) one Ray cluster with max(N) GPUs is started and ``--config``
deployed with max(N) replicas of each segmentor; each scenario is driven over each transport;
then the segmentors are scaled down to the next N by ``serve deploy`` (removing a replica is
quick, warming one up is not) and measured again. Routers are sized to the CPU cores and stay
the same for every N, so the scaling ratio says whether the GPUs scale, not the proxy.

Scenarios: ``rmbg`` (1080p JPEG in, RGBA PNG out, one frame per request, 64 clients per GPU)
and ``yolo-frames`` (``/v1/frames`` / gRPC ``Frames``, 16 1080p JPEGs per request, 32
clients per GPU). Load comes from ``benchmarks.fleet`` (several processes; their CPU is
reported beside frames/s, so a load-bound run shows as one). Each run records whole-window
and steady-state frames/s, p50/p99, the mean batch each model ran (frames / batches during
the window) and every replica's GPU (uuid from ``/v1/models``), and checks the placement:
one RMBG-2.0 replica per card, YOLO beside it; and, per frame, the instances found, the bytes
of their RLE masks and the scenario model's ``model:postprocess`` time during the window.

Several Ray nodes on one host (``--nodes 2``: a head and a worker node, each with its own
cards through ``CUDA_VISIBLE_DEVICES``, half the CPUs, and its share of the replicas by
``max_replicas_per_node``), to set a two-node cluster beside one node with the same cards;
the load goes to every node's ingress (each node's proxy, or every Router's own port with
direct ingress). Two nodes on one host cannot each run Serve's HAProxy on the same ports, so
this takes ``default`` or ``throughput``:

    python -m benchmarks.scaling_bench --ingress throughput --gpus 2 --out one-node.json
    python -m benchmarks.scaling_bench --ingress throughput --gpus 2 --nodes 2 \
        --out two-nodes.json

Placement: RMBG-2.0 asks for 0.6 GPU, so no two RMBG-2.0 replicas share a card;
``--yolo-per-gpu N`` (default 2, as ``serve_config.yaml``) puts N YOLO replicas on each card,
sharing the 0.4 that RMBG-2.0 leaves (0.2 each for two; one alone asks for 0.3): more
processes, so more interpreters, for YOLO's host work (decoding, masks, COCO strings,
answers), which bounds one YOLO replica below its model's pace (two: +28-36% on one card,
docs/benchmarks.md). ``RAY_SERVE_USE_PACK_SCHEDULING_STRATEGY=1`` makes the controller place
the larger GPU asks first, so YOLO replicas never take the room an RMBG-2.0 replica needs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml

from benchmarks import process_cpu
from benchmarks.fleet import run_fleet
from benchmarks.frames import FRAME_SOURCES
from benchmarks.ingress import PACK_SCHEDULING, VARIANTS, direct_targets, ingress_env
from benchmarks.load_test import run_load
from benchmarks.py_spy import LoadProfile
from benchmarks.replica_stages import per_frame_ms
from tests.conftest import REPO_ROOT
from tests.serve_cluster import Cluster, WorkerNode, node_cards, running_cluster, start_worker

SEGMENTORS = {"rmbg": "RMBGDeployment", "yolo": "YoloDeployment"}
#: GPU share of a segmentor replica alone of its kind on a card; never two RMBG-2.0 on one.
GPU_SHARE = {"RMBGDeployment": 0.6, "YoloDeployment": 0.3}


def gpu_share(deployment: str, per_card: int) -> float:
    """The GPU share of one of ``per_card`` replicas of ``deployment`` on each card: with
    several YOLO replicas a card, they split what RMBG-2.0 leaves, rounded down so that
    exactly ``per_card`` fit beside it (Ray then cannot pack more on one card)."""
    if per_card == 1:
        return GPU_SHARE[deployment]
    left = 1 - GPU_SHARE["RMBGDeployment"]
    return math.floor(left / per_card * 10_000) / 10_000


def per_card(yolo_per_gpu: int) -> dict[str, int]:
    """Replicas of each segmentor (by model kind) on each card."""
    return {"rmbg": 1, "yolo": yolo_per_gpu}


@dataclass(frozen=True)
class Scenario:
    endpoint: str
    model: str  # which segmentor does the work: "rmbg" or "yolo"
    clients_per_gpu: int
    frames_per_request: int


SCENARIOS = {
    "rmbg": Scenario("remove-background", "rmbg", 64, 1),
    "yolo-frames": Scenario("frames-segment", "yolo", 32, 16),
}


def scale_config(
    config: dict[str, Any],
    count: int,
    routers: int,
    rmbg_dir: str,
    on_gpus: bool = True,
    segmentor_args: dict[str, Any] | None = None,
    yolo_per_gpu: int = 1,
    router_args: dict[str, Any] | None = None,
    yolo_options: dict[str, Any] | None = None,
) -> None:
    """``count`` cards' segmentors (one RMBG-2.0 and ``yolo_per_gpu`` YOLO per card) and
    ``routers`` routers; ``segmentor_args`` set on both segmentors (e.g. ``decode_ahead``),
    ``router_args`` on the routers, ``yolo_options`` on YOLO's deployment (Serve's own
    deployment options, e.g. ``max_ongoing_requests`` or ``request_router_config``)."""
    app = config["applications"][0]
    if "rmbg" in app["args"] and rmbg_dir:
        app["args"]["rmbg"]["model"] = str(Path(rmbg_dir).resolve())
    for model in ("rmbg", "yolo"):
        if model in app["args"]:
            app["args"][model].update(segmentor_args or {})
    if router_args:
        app["args"].setdefault("router", {}).update(router_args)
    for deployment in app["deployments"]:
        deployment.pop("autoscaling_config", None)
        if deployment["name"] == "Router":
            deployment["num_replicas"] = routers
            continue
        yolo = deployment["name"] == SEGMENTORS["yolo"]
        each = yolo_per_gpu if yolo else 1
        if yolo:
            deployment.update(yolo_options or {})
        deployment["num_replicas"] = count * each
        if on_gpus and deployment["name"] in GPU_SHARE:
            deployment["ray_actor_options"]["num_gpus"] = gpu_share(deployment["name"], each)


def spread_over_nodes(config: dict[str, Any], nodes: int) -> None:
    """At most an equal share of each deployment's replicas on one node
    (``max_replicas_per_node``), so ``nodes`` nodes each hold their part."""
    for deployment in config["applications"][0]["deployments"]:
        deployment["max_replicas_per_node"] = -(-deployment["num_replicas"] // nodes)
        if deployment["name"] in GPU_SHARE:
            deployment["max_surge_percent"] = 0  # a card has no room for a second replica


def parse_assignments(items: list[str], option: str = "--segmentor-arg") -> dict[str, Any]:
    """``["decode_ahead=true"]`` -> ``{"decode_ahead": True}`` (values read as YAML)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"{option} {item!r}: expected KEY=VALUE")
        out[key] = yaml.safe_load(value)
    return out


def _models_at_once(url: str, calls: int) -> list[list[dict[str, Any]]]:
    """``calls`` concurrent ``/v1/models`` calls. Sent one at a time, 40 calls read only one
    of a model's two replicas in several runs (2 x H200 and the CPU, 2026-11-28): idle
    replicas look alike to Serve's router. Sent together, they queue and spread."""

    async def fetch() -> list[list[dict[str, Any]]]:
        async with httpx.AsyncClient(timeout=60) as client:
            answers = await asyncio.gather(
                *(client.get(f"{url}/v1/models") for _ in range(calls)), return_exceptions=True
            )
        # A call refused or timed out (a busy router) only means fewer reads.
        return [
            a.json()["models"]
            for a in answers
            if isinstance(a, httpx.Response) and a.status_code == 200
        ]

    return asyncio.run(fetch())


def replicas(
    url: str,
    counts: dict[str, int] | None = None,
    rounds: int = 8,
    calls: int = 16,
    timeout_s: float = 60,
) -> dict[tuple[str, int], dict[str, Any]]:
    """Each segmentor replica seen by ``/v1/models`` (each call reads one replica of each
    model), by (model, pid): its GPU, batches run and CUDA-graph state. Reads go on past
    ``rounds`` until ``counts`` replicas of each model kind (default one) are seen, for up
    to ``timeout_s``: right after a load, a replica still working through its queue takes no
    call (Serve routes to the others), which left one of 2 or 4 replicas unread in the
    2026-11-28 runs."""
    seen: dict[tuple[str, int], dict[str, Any]] = {}
    deadline = time.monotonic() + timeout_s
    done = 0
    while True:
        for models in _models_at_once(url, calls):
            for model in models:
                seen[(model["name"], model["pid"])] = _replica_row(model)
        done += 1
        kinds = [model_of(name) for name, _ in seen]
        complete = all(kinds.count(kind) >= (counts or {}).get(kind, 1) for kind in SEGMENTORS)
        if done >= rounds and (complete or time.monotonic() > deadline):
            return seen
        if done >= rounds:
            time.sleep(0.5)


def _replica_row(model: dict[str, Any]) -> dict[str, Any]:
    batch = model["batch"]
    return {
        "model": model["name"],
        "pid": model["pid"],
        "frames_ok": (model.get("frames") or {}).get("ok", 0),
        "gpu_uuid": (model.get("gpu") or {}).get("uuid"),
        "batches_run": batch["batches_run"],
        "largest_batch": batch["largest_batch"],
        "max_batch_size": batch.get("max_batch_size"),
        "cuda_graph_batch_sizes": batch.get("cuda_graph_batch_sizes"),
        "cuda_graph_error": batch.get("cuda_graph_error"),
        "gpu_memory": model.get("gpu_memory"),
        "gpu_busy_s": model.get("gpu_busy_s"),
        "codec": model.get("codec"),
        "stages": model.get("stages"),
    }


def model_of(name: str) -> str:
    """``rmbg`` or ``yolo`` for a model name of ``/v1/models``."""
    return "yolo" if "yolo" in name.lower() else "rmbg"


def placement_problems(
    found: list[dict[str, Any]], gpus: int, layout: dict[str, int] | None = None
) -> list[str]:
    """What differs from ``layout`` replicas of each model kind (default one of each) on each
    of ``gpus`` cards."""
    problems = []
    for model in SEGMENTORS:
        each = (layout or {}).get(model, 1)
        on = [r["gpu_uuid"] for r in found if model_of(r["model"]) == model]
        if len(on) != gpus * each:
            problems.append(f"{model}: {len(on)} replicas seen, {gpus * each} asked for")
        if on and max(on.count(card) for card in on) > each:
            problems.append(f"{model}: more than {each} replicas on a card ({on})")
    return problems


def wait_for_replicas(
    cluster: Cluster,
    count: int,
    timeout_s: float = 300,
    routers: int | None = None,
    layout: dict[str, int] | None = None,
) -> None:
    """Until each segmentor deployment runs exactly ``count`` cards' replicas (``layout``
    per card by model kind, default one), and the Router ``routers``, when given."""
    wanted = {name: count * (layout or {}).get(kind, 1) for kind, name in SEGMENTORS.items()}
    if routers is not None:
        wanted["Router"] = routers
    deadline = time.monotonic() + timeout_s
    states: dict[str, Any] = {}
    while time.monotonic() < deadline:
        app = cluster.status()["applications"]["product-segmentor"]
        states = {name: app["deployments"][name].get("replica_states", {}) for name in wanted}
        # Stopped replicas may be listed a while longer (kept for their logs); ignore them.
        live = {n: {k: v for k, v in s.items() if k != "STOPPED"} for n, s in states.items()}
        if all(live[n] == {"RUNNING": c} for n, c in wanted.items()):
            return
        time.sleep(2)
    raise RuntimeError(f"deployments did not settle at {wanted} replicas: {states}")


def measure(
    cluster: Cluster,
    variant: str,
    gpus: int,
    args: argparse.Namespace,
    frame_size: tuple[int, int],
    workers: list[WorkerNode] | None = None,
) -> list[dict[str, Any]]:
    """Every scenario over every transport at the deployed ``gpus`` replicas; with
    ``workers``, their nodes' proxies take load beside the head's."""
    workers = workers or []
    layout = per_card(args.yolo_per_gpu)
    # The workers' proxies serve gRPC only when the config does (the head's has a target).
    grpc_proxies = [cluster.grpc_target, *(w.grpc_target for w in workers)]
    targets = {
        "http": [f"http://{t}" for t in direct_targets(cluster.dashboard, variant, "HTTP")]
        or [cluster.url, *(w.url for w in workers)],
        "grpc": [f"grpc://{t}" for t in direct_targets(cluster.dashboard, variant, "gRPC")]
        or ([f"grpc://{t}" for t in grpc_proxies] if cluster.grpc_target else []),
    }
    runs = []
    for scenario_name in args.scenarios.split(","):
        scenario = SCENARIOS[scenario_name]
        for transport in args.transports.split(","):
            if not targets[transport]:
                runs.append({"skipped": f"{transport}: the config serves no {transport}"})
                continue
            expected = {kind: max(1, gpus) * each for kind, each in layout.items()}
            before = replicas(cluster.url, expected)
            profile = None
            if args.profile:
                where = Path(args.profile_dir) / f"{scenario_name}-{transport}-{gpus}gpu"
                profile = LoadProfile(scenario.model, where, seconds=args.profile).start()
            cpu_before, started = process_cpu.sample(), time.monotonic()
            result = run_fleet(
                targets[transport],
                scenario.endpoint,
                processes=max(1, args.load_processes_per_gpu * max(1, gpus)),
                clients=(args.clients_per_gpu or scenario.clients_per_gpu) * max(1, gpus),
                duration_s=args.duration,
                frames_per_request=scenario.frames_per_request,
                width=frame_size[0],
                height=frame_size[1],
                transport=transport,
                frames=args.frames,
            )
            window_s = time.monotonic() - started
            cpu_after = process_cpu.sample()
            cpu = process_cpu.cpu_ms_per_frame(cpu_before, cpu_after, result.get("frames_ok", 0))
            # The window also holds the frames' rendering and the load processes' start: the
            # busiest cores and GPU busy shares are over the seconds the load ran.
            load_s = result.get("load_span_s") or window_s
            cpu["busiest_process_cores"] = process_cpu.busiest_cores(cpu_before, cpu_after, load_s)
            after = replicas(cluster.url, expected)
            batches = sum(
                r["batches_run"] - before.get(key, {"batches_run": 0})["batches_run"]
                for key, r in after.items()
                if model_of(r["model"]) == scenario.model
            )
            found = sorted(after.values(), key=lambda r: (r["model"], r["pid"]))
            result.update(
                ingress=variant,
                scenario=scenario_name,
                gpus=gpus,
                nodes=1 + len(workers),
                mean_batch=round(result.get("frames_ok", 0) / batches, 1) if batches else None,
                postprocess_ms_per_frame=per_frame_ms(before, after, scenario.model),
                # CPU of each kind of process per answered frame (routers, replicas, proxies),
                # and each replica's GPU thread busy share of the load's seconds
                cpu=cpu,
                gpu_busy=process_cpu.gpu_busy(before, after, load_s),
                replicas=found,
                placement_problems=[] if args.no_gpu else placement_problems(found, gpus, layout),
            )
            if profile is not None:
                result["profile"] = profile.finish()
            if args.half_capacity and result.get("steady_frames_per_s"):
                result["half_capacity"] = half_capacity(
                    targets[transport], scenario, result["steady_frames_per_s"], args, frame_size
                )
            runs.append(result)
            brief = {k: v for k, v in result.items() if k not in ("replicas",)}
            print(json.dumps(brief), flush=True)
    return runs


def half_capacity(
    urls: list[str],
    scenario: Scenario,
    capacity: float,
    args: argparse.Namespace,
    frame_size: tuple[int, int],
) -> dict[str, Any]:
    """An open-loop run at half the measured frames/s: the latency a user sees when the
    service is not saturated (p50/p99 of requests sent at a fixed rate)."""
    rate = max(0.5, capacity / 2 / scenario.frames_per_request)
    answer = asyncio.run(
        run_load(
            urls,
            scenario.endpoint,
            concurrency=512,
            duration_s=args.duration,
            frames_per_request=scenario.frames_per_request,
            rate=rate,
            width=frame_size[0],
            height=frame_size[1],
            transport=urls[0].split("://")[0] if "://" in urls[0] else "http",
            listing=False,
            frames=args.frames,
        )
    )
    return {
        "requests_per_s": round(rate, 2),
        "frames_per_s": answer.get("frames_per_s"),
        "latency_ms": answer.get("latency_ms"),
        "statuses": answer.get("statuses"),
    }


def segmentor_cpus(config_path: str, yolo_per_gpu: int = 1) -> float:
    """CPUs the config gives one card's segmentors (one RMBG-2.0, ``yolo_per_gpu`` YOLO)."""
    config = yaml.safe_load(Path(config_path).read_text())
    return sum(
        float((d.get("ray_actor_options") or {}).get("num_cpus", 1))
        * (yolo_per_gpu if d["name"] == SEGMENTORS["yolo"] else 1)
        for d in config["applications"][0]["deployments"]
        if d["name"] in SEGMENTORS.values()
    )


def routers_for(cpus: int, gpus: int, load_processes: int, per_gpu: float = 4) -> int:
    """Router replicas for the cores left once the segmentors (``per_gpu`` for the pair on
    each card: their codec threads decode and encode images), the load generator and Ray
    itself (2) have theirs; at least 2."""
    return max(2, int(cpus - per_gpu * gpus - load_processes - 2))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO_ROOT / "configs" / "gpu-bench.yaml"))
    parser.add_argument("--rmbg-dir", default="third_party/rmbg20")
    parser.add_argument("--gpus", default="2,1", help="GPU counts, largest first, e.g. 4,2,1")
    parser.add_argument("--ingress", default="default", help=f"of {', '.join(VARIANTS)}")
    parser.add_argument("--transports", default="http", help="http, grpc or http,grpc")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--routers", type=int, default=None, help="default: from the cores")
    parser.add_argument("--load-processes-per-gpu", type=int, default=3)
    parser.add_argument("--clients-per-gpu", type=int, default=None, help="default: scenario's")
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 8)
    parser.add_argument("--no-gpu", action="store_true", help="CPU smoke test: GPUs count 0")
    parser.add_argument("--frame-size", help="WxH instead of 1920x1080 (smoke tests)")
    parser.add_argument(
        "--frames",
        choices=FRAME_SOURCES,
        default="plain",
        help="plain test card, or synthetic product shots with 2-3 objects each",
    )
    parser.add_argument(
        "--half-capacity",
        action="store_true",
        help="after each saturated run, an open-loop run at half its frames/s (p99 latency)",
    )
    parser.add_argument(
        "--segmentor-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="set a SegmentorArgs field on both segmentors (YAML value), e.g. decode_ahead=true",
    )
    parser.add_argument(
        "--profile",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="py-spy on two Routers and the busiest replica under load for SECONDS in every "
        "run (shorter than --duration); summaries in the report, stacks in --profile-dir",
    )
    parser.add_argument("--profile-dir", default="profiles", help="where the stacks go")
    parser.add_argument(
        "--router-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="set a RouterArgs field (YAML value), e.g. max_inflight_frames=2048",
    )
    parser.add_argument(
        "--yolo-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="set a Serve deployment option on YOLO's deployment (YAML value), e.g. "
        "max_ongoing_requests=512 or 'request_router_config={request_router_class: "
        "ray.serve.experimental.round_robin_router:RoundRobinRouter}'",
    )
    parser.add_argument(
        "--serve-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an environment variable for every Ray process of the cluster, e.g. Serve's "
        "RAY_SERVE_QUEUE_LENGTH_CACHE_TIMEOUT_S=1",
    )
    parser.add_argument(
        "--nodes",
        type=int,
        default=1,
        help="Ray nodes on this host sharing the largest --gpus (a head and workers, each its "
        "own cards and CPUs); only one GPU count then",
    )
    parser.add_argument(
        "--yolo-per-gpu",
        type=int,
        default=2,
        help="YOLO replicas on each card (they split the GPU share RMBG-2.0 leaves): more "
        "processes, so more interpreters, for YOLO's host work",
    )
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.yolo_per_gpu < 1:
        parser.error("--yolo-per-gpu takes 1 or more")
    if args.profile and not 0 < args.profile < args.duration:
        parser.error("--profile SECONDS: more than 0 and less than --duration")
    segmentor_args = parse_assignments(args.segmentor_arg)
    router_args = parse_assignments(args.router_arg, "--router-arg")
    yolo_options = parse_assignments(args.yolo_option, "--yolo-option")
    serve_env = {k: str(v) for k, v in parse_assignments(args.serve_env, "--serve-env").items()}
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    frame_size = (1920, 1080)
    if args.frame_size:
        width, height = (int(v) for v in args.frame_size.split("x"))
        frame_size = (width, height)
    counts = sorted({int(n) for n in args.gpus.split(",")}, reverse=True)
    most = counts[0]
    if args.nodes < 1:
        parser.error("--nodes takes 1 or more")
    if args.nodes > 1:
        if len(counts) > 1 or most % args.nodes or args.cpus % args.nodes:
            parser.error("--nodes takes one --gpus count, and --gpus and --cpus multiples of it")
        if "RAY_SERVE_ENABLE_HA_PROXY" in VARIANTS.get(args.ingress, {}) or "," in args.ingress:
            parser.error("--nodes takes one ingress without HAProxy: default or throughput")
    per_node_gpus = 0 if args.no_gpu else most // args.nodes
    per_node_cpus = args.cpus // args.nodes
    routers = args.routers or routers_for(
        args.cpus,
        most,
        args.load_processes_per_gpu * most,
        segmentor_cpus(args.config, args.yolo_per_gpu),
    )
    report: dict[str, Any] = {
        "command": "python -m benchmarks.scaling_bench " + " ".join(argv or sys.argv[1:]),
        "frames": args.frames,
        "nodes": args.nodes,
        "routers": routers,
        "yolo_per_gpu": args.yolo_per_gpu,
        "yolo_options": yolo_options,
        "serve_env": serve_env,
        "runs": [],
    }
    for variant in args.ingress.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            env = {**PACK_SCHEDULING, **ingress_env(variant, Path(tmp)), **serve_env}

            def edit(config: dict[str, Any]) -> None:
                scale_config(
                    config,
                    most,
                    routers,
                    args.rmbg_dir,
                    not args.no_gpu,
                    segmentor_args,
                    args.yolo_per_gpu,
                    router_args,
                    yolo_options,
                )
                if args.nodes > 1:
                    spread_over_nodes(config, args.nodes)

            with ExitStack() as stack:
                head_env = env
                if args.nodes > 1 and per_node_gpus:
                    head_env = {**env, **node_cards(0, per_node_gpus)}
                cluster = stack.enter_context(
                    running_cluster(
                        Path(args.config),
                        Path(tmp),
                        num_cpus=per_node_cpus,
                        num_gpus=per_node_gpus,
                        extra_env=head_env,
                        edit=edit,
                    )
                )
                workers = []
                for node in range(1, args.nodes):
                    worker = start_worker(
                        cluster,
                        num_cpus=per_node_cpus,
                        num_gpus=per_node_gpus,
                        extra_env=node_cards(node, per_node_gpus) if per_node_gpus else None,
                    )
                    stack.callback(worker.stop)
                    workers.append(worker)
                # The application answers once one replica of each model is up; measure
                # only once every replica asked for runs (a replica still capturing its
                # graphs would serve part of the first window and be missed by /v1/models).
                layout = per_card(args.yolo_per_gpu)
                wait_for_replicas(
                    cluster, most, routers=routers if workers else None, layout=layout
                )
                if not direct_targets(cluster.dashboard, variant, "HTTP"):
                    for worker in workers:  # its proxy takes load too: wait until it answers
                        cluster.wait_ready_at(worker.url)
                for index, gpus in enumerate(counts):
                    if index:  # scale the segmentors down; the routers stay
                        config = cluster.app_config()
                        scale_config(
                            config,
                            gpus,
                            routers,
                            args.rmbg_dir,
                            not args.no_gpu,
                            segmentor_args,
                            args.yolo_per_gpu,
                            router_args,
                            yolo_options,
                        )
                        cluster.deploy(config, f"n{gpus}.yaml")
                        wait_for_replicas(cluster, gpus, layout=layout)
                    report["runs"].extend(
                        measure(cluster, variant, gpus, args, frame_size, workers)
                    )
    measured = [r for r in report["runs"] if "steady_frames_per_s" in r]
    for run in measured:
        base = min(
            (
                r
                for r in measured
                if all(r[k] == run[k] for k in ("ingress", "scenario", "transport"))
            ),
            key=lambda r: r["gpus"],
        )
        run["scaling_vs_fewest_gpus"] = round(
            run["steady_frames_per_s"] / max(1e-9, base["steady_frames_per_s"]), 2
        )
    report["summary"] = [
        {
            k: run.get(k)
            for k in (
                "ingress",
                "transport",
                "scenario",
                "gpus",
                "nodes",
                "frames_per_s",
                "steady_frames_per_s",
                "scaling_vs_fewest_gpus",
                "latency_ms",
                "mean_batch",
                "gt_objects_per_frame",
                "instances_per_frame",
                "rle_bytes_per_frame",
                "postprocess_ms_per_frame",
                "load_cpu_cores",
                "load_generator_saturated",
                "cpu",
                "gpu_busy",
                "half_capacity",
                "placement_problems",
            )
        }
        for run in measured
    ]
    text = json.dumps(report, indent=2)
    if args.out:
        Path(args.out).write_text(text)
    print(json.dumps(report["summary"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

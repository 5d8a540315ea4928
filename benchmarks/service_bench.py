"""Service-level benchmark on one GPU: the Serve app under load, both models sharing it.

Starts a local Ray cluster per ingress variant (``benchmarks.ingress``: Ray Serve's own
switches, set in the environment of ``ray start``), deploys ``--config`` (default
configs/gpu-bench.yaml: random weights) with ``serve deploy``, then drives each scenario over
each transport from several load processes (``benchmarks.fleet``, their CPU reported beside
frames/s): single-frame requests at saturation, the multi-frame endpoint / gRPC ``Frames``,
and an open-loop run at half the measured capacity for latency. YOLO is then redeployed as
yolo11x-seg and measured again (``--no-yolo-x`` skips it).

``--frames synthetic`` sends synthetic product shots with 2-3 products each
(``benchmarks.frames``) instead of the plain test card, and ``--yolo
standin:product-yolo11n-seg`` serves the YOLO trained on them at its training size 320
(``configs/gpu-bench-trained.yaml`` is the same as a config), so YOLO finds objects and the
masks' decoding, RLE encoding and ``/v1/products``' fan-out to RMBG-2.0 are measured. Every run
records, beside frames/s: the ground-truth objects per frame, the instances found per frame
(products for ``products``), RLE and answer bytes per frame, and each model's
``model:postprocess`` time per frame during the run (from ``/v1/models`` before and after).

    python -m benchmarks.service_bench --rmbg-dir third_party/rmbg20 --out service.json
    python -m benchmarks.service_bench --ingress default,haproxy-throughput \\
        --transports http,grpc --duration 10 --out service-ingress.json
    python -m benchmarks.service_bench --frames synthetic --yolo standin:product-yolo11n-seg \\
        --scenarios yolo-frames,yolo-single,products --no-yolo-x --out service-trained.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.fleet import run_fleet
from benchmarks.frames import FRAME_SOURCES
from benchmarks.ingress import VARIANTS, direct_targets, ingress_env
from benchmarks.load_test import run_load
from benchmarks.replica_stages import per_frame_ms, snapshot
from tests.conftest import REPO_ROOT
from tests.serve_cluster import Cluster, running_cluster

#: label: (endpoint, clients, frames per request, frame width, height)
SCENARIOS = {
    "rmbg": ("remove-background", 64, 1, 1920, 1080),
    "rmbg-frames": ("frames-remove-background", 16, 8, 1920, 1080),
    "yolo-frames": ("frames-segment", 32, 16, 1920, 1080),
    "yolo-single": ("segment", 128, 1, 1920, 1080),
    # the path's per-frame cost without the bytes
    "yolo-frames-64px": ("frames-segment", 32, 16, 64, 64),
    # YOLO, then RMBG-2.0 on each object's crop: the fan-out (needs objects to be found)
    "products": ("products", 32, 1, 1920, 1080),
}
#: ``--rmbg-paths`` label: the replicas' settings (compiled: Inductor's on-disk cache is
#: TORCHINDUCTOR_CACHE_DIR of this process's environment, shared by the runs that follow)
_FAST = {"RMBG_OPTIMIZED": "true", "RMBG_COMPILE": "false"}
RMBG_PATHS = {
    "optimized": _FAST,
    "eager": {"RMBG_OPTIMIZED": "false", "RMBG_COMPILE": "false"},
    "compiled": {"RMBG_OPTIMIZED": "true", "RMBG_COMPILE": "true"},
    "compiled-decoder": {"RMBG_OPTIMIZED": "true", "RMBG_COMPILE": "decoder"},
    # the fast path with the Swin linear layers in a lower format, or a smaller model input
    "fp8": {**_FAST, "USE_FP8": "true"},
    "int8": {**_FAST, "USE_INT8": "true"},
    "input-768": {**_FAST, "RMBG_INPUT_SIZE": "768"},
    "input-512": {**_FAST, "RMBG_INPUT_SIZE": "512"},
}
#: Input size of YOLO sources that were trained at another size than Ultralytics' 640.
TRAINED_INPUT_SIZE = {"standin:product-yolo11n-seg": 320}


def _set_models(
    config: dict[str, Any], rmbg_dir: str, yolo: str, yolo_input_size: int | None = None
) -> None:
    """Point the config at ``rmbg_dir`` and ``yolo`` ('' keeps the config's); a new YOLO runs
    at ``yolo_input_size``, by default its training size (640 unless listed above)."""
    args = config["applications"][0]["args"]
    if rmbg_dir:
        args["rmbg"]["model"] = str(Path(rmbg_dir).resolve())
    if yolo:
        args["yolo"]["model"] = yolo
        size = yolo_input_size or TRAINED_INPUT_SIZE.get(yolo)
        if size:
            args["yolo"]["input_size"] = size
        else:
            args["yolo"].pop("input_size", None)


def fit_routers(config: dict[str, Any], cpus: int) -> int:
    """At most as many Router replicas as the CPUs left by the segmentors can place (the
    config's 8 beside its segmentors' 10 CPUs do not fit a 16-CPU cluster, whose deploy then
    never finishes), at least 1; the count set."""

    def asked(d: dict[str, Any]) -> float:
        return float((d.get("ray_actor_options") or {}).get("num_cpus", 1))

    deployments = config["applications"][0]["deployments"]
    segmentors = sum(
        asked(d) * d.get("num_replicas", 1) for d in deployments if d["name"] != "Router"
    )
    router = next(d for d in deployments if d["name"] == "Router")
    fits = int((cpus - segmentors) // max(asked(router), 1e-9))
    router.pop("autoscaling_config", None)
    router["num_replicas"] = max(1, min(router.get("num_replicas", 1), fits))
    return int(router["num_replicas"])


def _frame_size(text: str | None) -> tuple[int, int]:
    """(width, height) from ``WxH``; 1920x1080 for None."""
    if not text:
        return 1920, 1080
    width, height = (int(v) for v in text.split("x"))
    return width, height


def _targets(cluster: Cluster, variant: str) -> dict[str, list[str]]:
    """Where each transport connects: the proxy (or HAProxy) port, or the Router replicas'
    own ports when the variant has no proxy on the node."""
    http = direct_targets(cluster.dashboard, variant, "HTTP")
    grpc = direct_targets(cluster.dashboard, variant, "gRPC")
    return {
        "http": [f"http://{t}" for t in http] or [cluster.url],
        "grpc": [f"grpc://{t}" for t in grpc]
        or ([f"grpc://{cluster.grpc_target}"] if cluster.grpc_target else []),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO_ROOT / "configs" / "gpu-bench.yaml"))
    parser.add_argument("--rmbg-dir", default="third_party/rmbg20")
    parser.add_argument(
        "--yolo",
        default="",
        help="YOLO source, e.g. yolo11n-seg.yaml or standin:product-yolo11n-seg; '' keeps the "
        "config's",
    )
    parser.add_argument(
        "--yolo-input-size", type=int, help="default: the source's training size (320 or 640)"
    )
    parser.add_argument(
        "--frames",
        choices=FRAME_SOURCES,
        default="plain",
        help="plain test card, or synthetic product shots with 2-3 objects each",
    )
    parser.add_argument("--ingress", default="default", help=f"of {', '.join(VARIANTS)}")
    parser.add_argument("--transports", default="http", help="http, grpc or http,grpc")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--load-processes", type=int, default=4)
    parser.add_argument("--clients", type=int, default=None, help="default: each scenario's")
    parser.add_argument("--cpus", type=int, default=16)
    parser.add_argument("--gpus", type=int, default=1, help="0: CPU smoke test")
    parser.add_argument("--frame-size", help="WxH for every scenario (smoke tests)")
    parser.add_argument("--no-yolo-x", action="store_true", help="skip the yolo11x-seg run")
    parser.add_argument(
        "--rmbg-paths",
        default="optimized",
        help="RMBG-2.0 inference paths, one cluster each, in order (a path may repeat: "
        "compiled,compiled is a cold then a warm compile cache): optimized (the fast path, "
        "the default), eager (the published code), compiled (RMBG_COMPILE=true: the "
        "blocks), compiled-decoder (RMBG_COMPILE=decoder), fp8 or int8 (USE_FP8, USE_INT8: the "
        "Swin linear layers) or input-768 and input-512 (RMBG_INPUT_SIZE)",
    )
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    results: dict[str, Any] = {
        "command": "python -m benchmarks.service_bench " + " ".join(argv or sys.argv[1:]),
        "frames": args.frames,
        "runs": [],
    }

    def record(result: dict[str, Any], **labels: Any) -> dict[str, Any]:
        result.update(labels)
        results["runs"].append(result)
        print(json.dumps(result), flush=True)
        if args.out:  # after every run: a step stopped by its time limit keeps what it measured
            Path(args.out).write_text(json.dumps(results, indent=2))
        return result

    def drive(
        targets: dict[str, list[str]], variant: str, rmbg_path: str, scenario: str, label: str = ""
    ) -> None:
        endpoint, clients, frames, width, height = SCENARIOS[scenario]
        if args.frame_size:
            width, height = (int(v) for v in args.frame_size.split("x"))
        for transport in args.transports.split(","):
            if not targets[transport]:
                record({"skipped": f"the config serves no {transport}"}, scenario=scenario)
                continue
            before = snapshot(targets["http"][0], samples=3)
            result = run_fleet(
                targets[transport],
                endpoint,
                processes=args.load_processes,
                clients=args.clients or clients,
                duration_s=args.duration,
                frames_per_request=frames,
                width=width,
                height=height,
                transport=transport,
                frames=args.frames,
            )
            after = snapshot(targets["http"][0], samples=3)
            # NMS, mask decoding and RLE encoding (YOLO); matte resizing (RMBG-2.0, per crop
            # for products), per frame each model answered during this run
            postprocess = {
                kind: per_frame_ms(before, after, kind, "model:postprocess")
                for kind in ("yolo", "rmbg")
            }
            record(
                result,
                ingress=variant,
                rmbg_path=rmbg_path,
                scenario=label or scenario,
                postprocess_ms_per_frame=postprocess,
                inference_paths=sorted(
                    {f"{r['model']}: {r['inference_path']}" for r in after.values()}
                ),
                precisions=sorted({f"{r['model']}: {r['precision']}" for r in after.values()}),
                startup_s={r["model"]: r["startup_s"] for r in after.values()},
                # RMBG-2.0's compiled parts: loaded from the artifact, graphs found or compiled
                compile={r["model"]: r["compile"] for r in after.values() if r["compile"]},
            )

    scenarios = args.scenarios.split(",")
    paths = args.rmbg_paths.split(",")
    if set(paths) - set(RMBG_PATHS):
        parser.error(f"--rmbg-paths takes {', '.join(RMBG_PATHS)}")

    def edit(config: dict[str, Any], rmbg_path: str) -> None:
        _set_models(config, args.rmbg_dir, args.yolo, args.yolo_input_size)
        fit_routers(config, args.cpus)
        env = config["applications"][0].setdefault("runtime_env", {}).setdefault("env_vars", {})
        env.update(RMBG_PATHS[rmbg_path])

    for variant, rmbg_path in ((v, p) for v in args.ingress.split(",") for p in paths):
        with (
            tempfile.TemporaryDirectory() as tmp,
            running_cluster(
                Path(args.config),
                Path(tmp),
                num_cpus=args.cpus,
                num_gpus=args.gpus,
                extra_env=ingress_env(variant, Path(tmp)),
                edit=lambda c, p=rmbg_path: edit(c, p),
            ) as cluster,
        ):
            targets = _targets(cluster, variant)
            for scenario in scenarios:
                drive(targets, variant, rmbg_path, scenario)
            if "rmbg" in scenarios:
                capacity = max(
                    (
                        r.get("frames_per_s", 0.0)
                        for r in results["runs"]
                        if r.get("ingress") == variant
                        and r.get("rmbg_path") == rmbg_path
                        and r.get("scenario") == "rmbg"
                    ),
                    default=0.0,
                )
                rate = max(1.0, capacity / 2)
                half = asyncio.run(
                    run_load(
                        targets["http"],
                        "remove-background",
                        concurrency=args.clients or 64,
                        duration_s=args.duration,
                        rate=rate,
                        listing=False,
                        width=_frame_size(args.frame_size)[0],
                        height=_frame_size(args.frame_size)[1],
                        frames=args.frames,
                    )
                )
                record(
                    half,
                    ingress=variant,
                    rmbg_path=rmbg_path,
                    scenario=f"rmbg at half capacity ({rate:.1f}/s)",
                )
            if not args.no_yolo_x:
                config = cluster.app_config()
                _set_models(config, "", "yolo11x-seg.yaml")
                cluster.deploy(config, "yolo-x.yaml")
                deadline = time.monotonic() + 300
                while time.monotonic() < deadline:
                    app = cluster.status()["applications"]["product-segmentor"]
                    if app["status"] == "RUNNING":
                        break
                    time.sleep(3)
                drive(targets, variant, rmbg_path, "yolo-frames", "yolo11x-seg frames")
    text = json.dumps(results, indent=2)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

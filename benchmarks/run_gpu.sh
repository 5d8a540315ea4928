#!/usr/bin/env bash
# What is measured on the GPU machine, by part:
#   bash benchmarks/run_gpu.sh PART[,PART...] [RESULTS_DIR]
# all (tests, model, service; about 10 minutes on an H100), or any of:
#   tests    GPU tests (pytest -m gpu)
#   model    model-level benchmark (RMBG-2.0 and YOLO, FP32 vs FP16)
#   service  service-level benchmark (the Serve app under load)
#   trained  YOLO trained stand-in on synthetic product shots: model rows, FP16-vs-FP32
#            quality test, GPU RLE test (about 3 minutes)
#   compile  the compiled decoder's GPU test (a cold compile), then RMBG-2.0's fast path at
#            batch 16 uncompiled and with its decoder compiled (RMBG_COMPILE=decoder; another
#            cold compile, about 3 minutes on an H200) (up to 10 minutes)
#   compiled-decoder  RMBG-2.0's compiled decoder as a replica gets it: the artifact built
#            by the tool (3-5 minutes on an H200), the service over HTTP with
#            RMBG_COMPILE=decoder and the artifact, then uncompiled (about 4 minutes)
#   compiled-start  after compiled-decoder in the same run: a fresh process started from its
#            artifact (start-up seconds, frames/s at the model; about 1 minute)
#   rmbg-profile  where RMBG-2.0's GPU time goes at batch 16 (benchmarks.rmbg_profile): the
#            fast path, then with the decoder compiled (from compiled-decoder's artifact when
#            it ran before in the same run, else a cold compile) (about 2-5 minutes)
#   resample RMBG-2.0's fast path at batch 16 with and without its resample step (CUDA
#            graphs, one process), the step's GPU tests, then where the time goes with it
#            (benchmarks.rmbg_profile) (about 4 minutes)
#   kernels  RMBG-2.0's Swin blocks through the fast path's Triton kernels: their GPU tests,
#            PyTorch's ops against each kernel tile by geometry (benchmarks.window_attention),
#            the fast path at batch 16 without and with the fuse and attn steps (CUDA graphs,
#            one process) (about 6 minutes)
#   rmbg-service  one card, RMBG-2.0 over HTTP (scaling_bench): the replica's stages, its
#            GPU thread's busy share and py-spy stacks of it and the Routers (about 2 minutes)
#   rmbg-variants  the service over HTTP with RMBG-2.0 uncompiled, FP8, INT8 (needs torchao
#            among the carried packages), input 768 and 512 (about 5 minutes)
#   paths    the service with RMBG-2.0 eager vs optimized (about 4 minutes)
#   trained-service  the service's YOLO scenarios with the trained stand-in on synthetic
#            product shots (about 3 minutes)
#   compiled the service with RMBG-2.0 optimized, then compiled twice on one Inductor cache
#            (cold, warm: replica start-up in /v1/models' startup_s), the CUDA-graph and
#            compiled-blocks GPU tests (about 9 minutes)
#   video    segment-video per output format in-process, clips of 120 and 480 frames, RMBG-2.0
#            with weights read from local disk; encode-only rows; YOLO11n-seg with and
#            without --cuda-graphs (needs PyAV; about 5 minutes)
#   video-server  segment-video per output format through a local service over HTTP and
#            gRPC (needs PyAV and Ray; about 3 minutes)
#   compile-cache  RMBG-2.0's compiled artifact (RMBG_COMPILE_CACHE) and the blocks' programs
#            compiled ahead of time: built by the tool, then a fresh process on them (the
#            programs, or where torch cannot load them every graph from the artifact;
#            start-up seconds printed) (up to 10 minutes)
#   precision  RMBG-2.0 per precision (fp32, fp16, fp16+fp8, fp16+int8) and input size,
#            eager and with CUDA graphs: frames/s, peak memory, agreement with FP32 on the
#            published architecture and the trained stand-in; the precision GPU test (needs
#            torchao among the carried packages)
#   data-path  one card: the batch copy, serve and YOLO mask GPU tests, RMBG-2.0's batch
#            copy against frame by frame, YOLO's postprocess batch against frame by frame
#            (about 3 minutes)
#   one-card RMBG-2.0 at the model (fp16, CUDA graphs, 1080p in), then one cluster per
#            layout, one and two YOLO replicas a card, over HTTP and gRPC with the trained
#            stand-in on product shots; RMBG-2.0 with the default (about 7 minutes)
#   scaling  every card of the machine (4,2,1): both models, both transports, p99 at half
#            capacity, the default layout (two YOLO a card) (about 6 minutes on 4 cards)
#   profile  all cards at once: both models over HTTP in 14-second windows, py-spy for 8 s on
#            two Routers and the busiest replica of each (profile.json; the stacks in
#            profiles.tar.gz) (about 4 minutes)
#   yolo-routing  all cards at once, YOLO over both transports, one machine: the default
#            layout, then Serve's queue-length cache held 1 s and its probes given 0.5-2 s,
#            then a round-robin router for YOLO: what evens out the replicas' load (about
#            8 minutes on 4 cards)
#   yolo-variants  all cards at once, YOLO over both transports, one machine: the default
#            layout, then nvJPEG's host side on a thread of its own (decode_ahead), then three
#            YOLO replicas a card: what moves the wall of the YOLO replicas' host work
#            (about 8 minutes on 4 cards)
# Logs and JSON land in RESULTS_DIR (default bench-results/). Needs the published RMBG-2.0 code
# in third_party/rmbg20 (or RMBG_ARCH_DIR) and, on an offline machine, the carried packages
# (source .device-site/setup.sh first). Exact commands and what each part needs: docs/gpu.md.
set -uo pipefail
parts=",${1:-all},"
out="${2:-bench-results}"
mkdir -p "$out"
export RAY_AUTH_MODE=disabled HF_HUB_OFFLINE=1 YOLO_OFFLINE=1 PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0  # NVLink multicast off on hosts with several GPUs
status=0
run() { [[ "$parts" == *,all,* && " tests model service " == *" $1 "* || "$parts" == *,"$1",* ]]; }
step() {  # step LOG TIMEOUT_S COMMAND...: run with a time limit, output to the console and LOG
    local log="$1" limit="$2"
    shift 2
    echo "== $(date -u +%H:%M:%S) $*" | tee -a "$out/$log"
    timeout --signal=INT --kill-after=20 "$limit" "$@" 2>&1 | tee -a "$out/$log" || status=1
}
if run tests; then
    step gpu-tests.log 1800 python3 -m pytest -m gpu tests/gpu -s -p no:cacheprovider \
        -o addopts="-q --strict-markers -ra"
fi
if run model; then
    step model.log 1800 python3 -m benchmarks.model_bench --out "$out/model.json"
fi
if run service; then
    step service.log 1800 python3 -m benchmarks.service_bench --out "$out/service.json"
fi
if run trained; then
    step trained.log 240 python3 -m benchmarks.model_bench --yolo-only --frames synthetic \
        --yolo standin:product-yolo11n-seg,yolo11n-seg.yaml --yolo-batches 1,16,64 \
        --out "$out/model-yolo-synthetic.json"
    step trained.log 180 python3 -m pytest -m gpu tests/gpu/test_quality_gpu.py \
        tests/gpu/test_rle_gpu.py -s \
        -p no:cacheprovider -o addopts="-q --strict-markers -ra"
fi
if run compile; then
    fast="sdpa+windows+decoder+deform"
    # each step on an empty Inductor cache: both compile cold
    step compile.log 300 env TORCHINDUCTOR_CACHE_DIR="$(mktemp -d)" \
        python3 -m pytest -m gpu tests/gpu/test_compile_decoder_gpu.py -s \
        -p no:cacheprovider -o addopts="-q --strict-markers -ra"
    step compile.log 260 env TORCHINDUCTOR_CACHE_DIR="$(mktemp -d)" \
        python3 -m benchmarks.model_bench --rmbg-fast --compile \
        --fast-variants "$fast+resample+graphs,$fast+resample+compile-decoder+graphs" --fast-batches 16 \
        --out "$out/compile-cold.json"
fi
if run compiled-decoder; then
    artifacts=$(mktemp -d /tmp/compiled-XXXX)
    published=(env RMBG_MODEL=third_party/rmbg20 RMBG_TRUST_REMOTE_CODE=true RMBG_COMPILE=decoder)
    step compiled-decoder.log 320 "${published[@]}" TORCHINDUCTOR_CACHE_DIR="$(mktemp -d)" \
        python3 -m segmentation.compile_cache "$artifacts" --max-batch-size 16 \
        --load-format dummy
    step compiled-decoder.log 250 env RMBG_COMPILE_CACHE="$artifacts" \
        TORCHINDUCTOR_CACHE_DIR="$(mktemp -d)" python3 -m benchmarks.service_bench --scenarios rmbg \
        --rmbg-paths compiled-decoder,optimized --duration 10 --no-yolo-x \
        --out "$out/service-compiled-decoder.json"
fi
if run compiled-start && [[ -n "${artifacts:-}" ]]; then
    step compiled-decoder.log 90 "${published[@]}" TORCHINDUCTOR_CACHE_DIR="$(mktemp -d)" \
        python3 -m benchmarks.compiled_start "$artifacts" --compile decoder --batches 16 \
        --out "$out/compiled-decoder-start.json"
fi
if run rmbg-profile; then
    fast="sdpa,windows,decoder,deform,resample"
    step rmbg-profile.log 120 python3 -m benchmarks.rmbg_profile --batch 16 --steps "$fast" \
        --out "$out/rmbg-profile-fast.json"
    step rmbg-profile.log 300 env TORCHINDUCTOR_CACHE_DIR="$(mktemp -d)" \
        python3 -m benchmarks.rmbg_profile --batch 16 --steps "$fast,compile-decoder" \
        ${artifacts:+--compile-cache "$artifacts"} --out "$out/rmbg-profile-compiled-decoder.json"
fi
if run resample; then
    fast="sdpa+windows+decoder+deform"
    step resample.log 150 python3 -m benchmarks.model_bench --rmbg-fast --fast-batches 16 \
        --fast-variants "$fast+graphs,$fast+resample+graphs" --out "$out/resample.json"
    step resample.log 200 python3 -m pytest -m gpu tests/gpu/test_fp16_gpu.py -s \
        -k "resize or resample" -p no:cacheprovider -o addopts="-q --strict-markers -ra"
    step resample.log 120 python3 -m benchmarks.rmbg_profile --batch 16 \
        --out "$out/rmbg-profile-resample.json"
fi
if run kernels; then
    fast="sdpa+windows+decoder+deform+resample"
    step kernels.log 200 python3 -m pytest -m gpu tests/gpu/test_fp16_gpu.py -s \
        -k "swin_kernels or fuse or attn" -p no:cacheprovider -o addopts="-q --strict-markers -ra"
    step kernels.log 150 python3 -m benchmarks.window_attention --batch 16 \
        --out "$out/window-attention.json"
    step kernels.log 260 python3 -m benchmarks.model_bench --rmbg-fast --fast-batches 16 \
        --fast-variants "$fast+graphs,$fast+fuse+graphs,$fast+attn+graphs,$fast+fuse+attn+graphs" \
        --out "$out/kernels.json"
fi
if run rmbg-service; then
    # one card, RMBG-2.0 over HTTP with its replica read and sampled: where the service
    # loses against the model
    step rmbg-service.log 240 python3 -m benchmarks.scaling_bench --gpus 1 --transports http \
        --scenarios rmbg --duration 14 --profile 8 --half-capacity \
        --profile-dir "$out/profiles" --out "$out/rmbg-service.json"
    tar -czf "$out/rmbg-profiles.tar.gz" -C "$out" profiles && rm -rf "$out/profiles"
fi
if run rmbg-variants; then
    step rmbg-variants.log 420 python3 -m benchmarks.service_bench --scenarios rmbg \
        --rmbg-paths optimized,fp8,int8,input-768,input-512 --duration 10 --no-yolo-x \
        --out "$out/service-rmbg-variants.json"
fi
if run paths; then
    step paths.log 300 python3 -m benchmarks.service_bench --scenarios rmbg \
        --rmbg-paths optimized,eager --duration 15 --no-yolo-x --out "$out/service-paths.json"
fi
if run trained-service; then
    step trained-service.log 240 python3 -m benchmarks.service_bench \
        --config configs/gpu-bench-trained.yaml --frames synthetic \
        --scenarios yolo-frames,yolo-single,products --no-yolo-x --duration 10 \
        --out "$out/service-trained.json"
fi
if run compiled; then
    export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-$(mktemp -d /tmp/inductor-XXXX)}"
    step compiled.log 420 python3 -m benchmarks.service_bench --scenarios rmbg \
        --rmbg-paths optimized,compiled,compiled --duration 8 --no-yolo-x \
        --out "$out/service-compiled.json"
    step compiled.log 150 python3 -m pytest -m gpu tests/gpu/test_graphs_gpu.py \
        tests/gpu/test_fp16_gpu.py -k "graph or compiled_blocks" -s -p no:cacheprovider \
        -o addopts="-q --strict-markers -ra"
fi
if run video || run video-server; then
    # Start-up as on an install with cached bytecode: the GPU image sets PYTHONDONTWRITEBYTECODE,
    # which made every segment-video process compile its modules again (+4.5 s to the first
    # frame, docs/benchmarks.md).
    unset PYTHONDONTWRITEBYTECODE
fi
if run video; then
    step video.log 540 python3 -m benchmarks.video_bench --model-path third_party/rmbg20 \
        --with-weights --width 1920 --height 1080 --frames 120,480 --batch 16 \
        --out "$out/video.json"
    step video.log 240 python3 -m benchmarks.video_bench --model yolo \
        --model-path yolo11n-seg.yaml --width 1920 --height 1080 --frames 480 --batch 16 \
        --cuda-graphs off,on --formats png,mov --presets fast --encode-frames 16 \
        --out "$out/video-yolo.json"
fi
if run video-server; then
    step video-server.log 360 python3 -m benchmarks.video_bench --model-path third_party/rmbg20 \
        --load-format dummy --width 1920 --height 1080 --frames 120 --batch 16 \
        --serve-config configs/gpu-bench.yaml --transports http,grpc --server-only \
        --out "$out/video-server.json"
fi
if run compile-cache; then
    step compile-cache.log 590 python3 -m pytest -m gpu tests/gpu/test_compile_cache_gpu.py -s \
        -p no:cacheprovider -o addopts="-q --strict-markers -ra"
fi
if run precision; then
    step precision.log 240 python3 -m pytest -m gpu tests/gpu/test_precision_gpu.py -s \
        -p no:cacheprovider -o addopts="-q --strict-markers -ra"
    step precision.log 600 python3 -m benchmarks.precision_bench --out "$out/precision.json" \
        --table "$out/precision.md"
    step precision.log 600 python3 -m benchmarks.precision_bench --graphs \
        --out "$out/precision-graphs.json" --table "$out/precision-graphs.md"
fi
trained_load=(python3 -m benchmarks.scaling_bench --config configs/gpu-bench-trained.yaml
    --frames synthetic --ingress haproxy-throughput --transports http,grpc)
trained_scaling=("${trained_load[@]}" --half-capacity)
if run data-path; then
    step data-path.log 240 python3 -m pytest -m gpu tests/gpu/test_transfer_gpu.py \
        tests/gpu/test_serve_gpu.py tests/gpu/test_yolo_masks_gpu.py -s -p no:cacheprovider \
        -o addopts="-q --strict-markers -ra"
    step data-path.log 60 python3 -m benchmarks.cutout_copy --batch 16 --out "$out/cutout-copy.json"
    step data-path.log 90 python3 -m benchmarks.yolo_postprocess --batch 64 \
        --out "$out/yolo-postprocess.json"
fi
if run one-card; then
    # RMBG-2.0 at the model on the same path and card, for the service-to-model ratio
    step one-card.log 120 python3 -m benchmarks.precision_bench --models published --graphs \
        --variants fp16 --batch 16 --frame-size 1920x1080 --warmup 2 --iters 4 --no-flops \
        --out "$out/rmbg-model.json"
    step one-card.log 170 "${trained_scaling[@]}" --gpus 1 --scenarios yolo-frames \
        --duration 4 --yolo-per-gpu 1 --out "$out/one-card-yolo-1.json"
    step one-card.log 200 "${trained_scaling[@]}" --gpus 1 --scenarios yolo-frames,rmbg \
        --duration 4 --yolo-per-gpu 2 --out "$out/one-card-yolo-2.json"
fi
if run scaling || run yolo-variants || run yolo-routing || run profile; then
    cards=$(nvidia-smi -L | wc -l)  # these parts use every card of the machine
    yolo_all=("${trained_load[@]}" --gpus "$cards" --scenarios yolo-frames --duration 6)
fi
if run scaling; then
    counts=$(for n in 8 4 2 1; do ((n <= cards)) && printf '%s,' "$n"; done)
    step scaling.log 590 "${trained_scaling[@]}" --gpus "${counts%,}" \
        --scenarios rmbg,yolo-frames --duration 4 --out "$out/scaling.json"
fi
if run yolo-variants; then
    step yolo-variants.log 190 "${yolo_all[@]}" --out "$out/yolo-default.json"
    step yolo-variants.log 190 "${yolo_all[@]}" --segmentor-arg decode_ahead=true \
        --out "$out/yolo-decode-ahead.json"
    step yolo-variants.log 190 "${yolo_all[@]}" --yolo-per-gpu 3 --out "$out/yolo-3-a-card.json"
fi
if run yolo-routing; then
    round_robin="ray.serve.experimental.round_robin_router:RoundRobinRouter"
    step yolo-routing.log 190 "${yolo_all[@]}" --out "$out/yolo-routing-default.json"
    step yolo-routing.log 190 "${yolo_all[@]}" \
        --serve-env RAY_SERVE_QUEUE_LENGTH_CACHE_TIMEOUT_S=1 \
        --serve-env RAY_SERVE_QUEUE_LENGTH_RESPONSE_DEADLINE_S=0.5 \
        --serve-env RAY_SERVE_MAX_QUEUE_LENGTH_RESPONSE_DEADLINE_S=2 \
        --out "$out/yolo-routing-probes.json"
    step yolo-routing.log 190 "${yolo_all[@]}" \
        --yolo-option "request_router_config={request_router_class: $round_robin}" \
        --out "$out/yolo-routing-round-robin.json"
fi
if run profile; then
    step profile.log 400 "${trained_scaling[@]}" --gpus "$cards" --transports http \
        --scenarios yolo-frames,rmbg --duration 14 --profile 8 --profile-dir "$out/profiles" \
        --out "$out/profile.json"
    tar -czf "$out/profiles.tar.gz" -C "$out" profiles && rm -rf "$out/profiles"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpu.csv" 2>&1 || true
exit $status

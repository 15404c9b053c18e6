"""``python -m worker run | create-topics | demo``.

The benchmarks are not part of the shipped package: ``python -m bench`` from a checkout.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time

log = logging.getLogger("worker")


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # NeMo and its dependencies are chatty at INFO; keep their warnings and errors.
    for noisy in ("nemo_logger", "nemo", "lightning", "pytorch_lightning", "numba"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def load_engine_models(config):
    """The configured models: the real pair by name or path, or random ones of the same classes."""
    import torch
    from nemo.utils import logging as nemo_logging

    from worker.engine.models import build_random_models, load_models

    # NeMo prints every restored model's whole config as warnings; keep its errors only.
    nemo_logging.set_verbosity(logging.ERROR)
    if config.engine.dtype == "fp64":
        torch.set_default_dtype(torch.float64)
    if config.torch_threads:
        torch.set_num_threads(config.torch_threads)
    diarizer, asr = config.diarizer_model, config.asr_model
    if config.random_models != "none":
        log.info(
            "building (or reusing) random-weight %s models in %s",
            config.random_models,
            config.model_cache_dir,
        )
        d_path, a_path = build_random_models(config.random_models, config.model_cache_dir)
        diarizer, asr = str(d_path), str(a_path)
    return load_models(
        diarizer, asr, device=config.device or None, cache_dir=config.model_cache_dir
    )


def _load_config(args: argparse.Namespace):
    """The validated configuration with logging set up, or None after saying what is wrong."""
    from worker.config import ConfigError, load_config

    try:
        config = load_config(args)
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return None
    _setup_logging(config.log_level)
    return config


def cmd_run(args: argparse.Namespace) -> int:
    from worker.config import describe

    config = _load_config(args)
    if config is None:
        return 2
    # Before anything starts a thread (torch and librdkafka do): every thread inherits the
    # block, so SIGTERM waits for the signal thread below instead of killing the process.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    for line in describe(config):
        log.debug("setting %s", line)

    from worker.engine.engine import StreamingEngine
    from worker.engine.models import ModelLoadError
    from worker.metrics import Health, HttpEndpoints, Metrics
    from worker.service.loop import FatalWorkerError, ModelNames, Worker

    # Signals are taken by a thread of their own (sigwait), not by a Python handler: a handler
    # only runs between bytecodes, so a main thread stuck inside librdkafka would never see
    # SIGTERM. They are blocked here, before any other thread starts, so every thread
    # inherits the block and the signal waits for that thread.
    worker: Worker | None = None

    def take_signals() -> None:
        signum = signal.sigwait({signal.SIGTERM, signal.SIGINT})
        if worker is None:
            log.info("%s before serving: exiting", signal.Signals(signum).name)
            os._exit(0)  # nothing is consumed or produced yet
        log.info(
            "%s: finishing the current step, checkpointing, leaving the group",
            signal.Signals(signum).name,
        )
        worker.stop()
        # A drain that hangs must not keep the pod past its grace period.
        timer = threading.Timer(
            config.shutdown_grace_sec, _give_up, args=(config.shutdown_grace_sec,)
        )
        timer.daemon = True
        timer.start()
        signal.sigwait({signal.SIGTERM, signal.SIGINT})
        _give_up(0)  # a second signal: now

    threading.Thread(target=take_signals, name="signals", daemon=True).start()

    metrics = Metrics()
    health = Health(stale_after_sec=max(60.0, config.max_poll_interval_ms / 1000))
    http = None
    if config.metrics_port:
        http = HttpEndpoints(metrics, health, config.metrics_host, config.metrics_port)
        http.start()
    started = time.monotonic()
    try:
        models = load_engine_models(config)
    except ModelLoadError as exc:
        log.error("cannot load the models: %s", exc)
        return 3
    metrics.on_model_load(time.monotonic() - started)
    log.info(
        "models loaded in %.1f s on %s: %s + %s",
        time.monotonic() - started,
        models.device,
        models.diarizer_id,
        models.asr_id,
    )
    engine = StreamingEngine(models, config.engine)
    health.models_loaded = True
    device_memory = None
    if models.device.type == "cuda":
        import torch

        def device_memory() -> int:
            return torch.cuda.memory_allocated(models.device)

    worker = Worker(
        config,
        engine,
        ModelNames(models.diarizer_id, models.asr_id),
        metrics,
        health,
        device_memory=device_memory,
    )
    health.beat()
    threading.Thread(
        target=_watch_loop, args=(health, config.stall_exit_sec), name="watchdog", daemon=True
    ).start()
    try:
        worker.run()
    except FatalWorkerError as exc:
        log.error("worker stopped: %s", exc)
        return 1
    finally:
        if http is not None:
            http.stop()
    return 0


def _watch_loop(health, stall_exit_sec: float) -> None:
    """Exit when the loop stops turning (e.g. hung inside a Kafka call, librdkafka #5456):
    the orchestrator restarts the worker, which fences its predecessor and rebuilds."""
    while True:
        time.sleep(min(5.0, stall_exit_sec / 4))
        stalled = health.stalled_for()
        if stalled > stall_exit_sec:
            log.critical("the loop has not turned for %.0f s: exiting to be restarted", stalled)
            os._exit(1)


def _give_up(grace: float) -> None:
    log.error("shutdown did not finish within %.0f s: exiting without a clean leave", grace)
    os._exit(1)


def cmd_create_topics(args: argparse.Namespace) -> int:
    from worker.service.topics import create_topics

    config = _load_config(args)
    if config is None:
        return 2
    created = create_topics(config, partitions=args.partitions, replication=args.replication)
    print(f"created: {', '.join(created) or 'nothing (all topics existed)'}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from worker.demo import run_demo

    return run_demo(keep_broker=args.keep_broker, calls=args.calls)


def main(argv: list[str] | None = None) -> int:
    from worker.config import build_parser

    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(
        prog="python -m worker",
        description="Kafka worker for live, speaker-attributed speech-to-text.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run_parser = build_parser()
    sub.add_parser(
        "run",
        parents=[run_parser],
        add_help=False,
        help="consume AudioChunk records and produce transcript events",
        description="Run one worker of the consumer group. Every setting is a flag, a "
        "CALLSCRIBE_* environment variable, or a key of the --config file.",
    )
    topics = sub.add_parser(
        "create-topics",
        parents=[run_parser],
        add_help=False,
        help="create the input, output, dead-letter and progress topics",
    )
    topics.add_argument("--partitions", type=int, default=4, help="partitions of input and output")
    topics.add_argument("--replication", type=int, default=1, help="replication factor")
    demo = sub.add_parser(
        "demo",
        help="start a local broker and a worker, stream a synthetic "
        "conversation, print its transcript, shut down",
    )
    demo.add_argument("--calls", type=int, default=1, help="conversations to stream at once")
    demo.add_argument("--keep-broker", action="store_true", help="leave the local broker running")
    args = parser.parse_args(argv)
    if args.command == "run":
        return cmd_run(args)
    if args.command == "create-topics":
        return cmd_create_topics(args)
    return cmd_demo(args)


if __name__ == "__main__":
    sys.exit(main())

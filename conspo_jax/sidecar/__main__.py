"""``python -m conspo_jax.sidecar``: run a sidecar without the absl CLI (tests, scripts, debugging).

Same server as ``conspo sidecar``; also offers the deterministic 'mock' engine. The token, if any,
is read from $CONSPO_SIDECAR_TOKEN. Prints ``SIDECAR READY host:port`` once serving.
"""

from __future__ import annotations

import argparse
import logging
import sys


def main(argv=None) -> int:
    from conspo_jax.base.configs import UsageError

    p = argparse.ArgumentParser(prog="python -m conspo_jax.sidecar", description=__doc__.splitlines()[0])
    p.add_argument("--config", help="experiment config module path.py[:arg] (needed by the jax/sglang engines)")
    p.add_argument("--engine", default="jax", choices=["jax", "sglang", "mock"])
    p.add_argument("--host", default=None)
    p.add_argument("--port", type=int, default=None)
    p.add_argument("--weights-dir", default=None)
    p.add_argument("--workers", type=int, default=None, help="verifier worker processes (0: in-thread)")
    p.add_argument("--chunk-prompts", type=int, default=None, help="prompts per engine call (0: all)")
    p.add_argument("--max-message-mb", type=int, default=None)
    p.add_argument("--version-wait-s", type=float, default=None, help="wait for min_weight_version this long")
    p.add_argument(
        "--allow-insecure-public",
        action="store_true",
        help="serve a non-loopback --host without a token (anyone who can reach it may push weights)",
    )
    p.add_argument("--mock-delay-s", type=float, default=0.0, help="mock engine: seconds per generate call")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    try:
        return _serve(args)
    except UsageError as e:  # a bad flag, config, address or busy port: one line, exit 2
        print(f"python -m conspo_jax.sidecar: error: {e}", file=sys.stderr, flush=True)
        return 2


def _serve(args) -> int:
    from conspo_jax.rollout.wire import TOKEN_ENV
    from conspo_jax.sidecar.options import options_from_config
    from conspo_jax.sidecar.server import run_until_signalled, serve

    config = None
    if args.config:
        from conspo_jax.base.configs import load_config_module

        config = load_config_module(args.config)
    opts = options_from_config(config, port=args.port, host=args.host)
    opts.allow_insecure_public = opts.allow_insecure_public or args.allow_insecure_public
    for field, value in (
        ("weights_dir", args.weights_dir),
        ("workers", args.workers),
        ("chunk_prompts", args.chunk_prompts),
        ("version_wait_s", args.version_wait_s),
    ):
        if value is not None:
            setattr(opts, field, value)
    if args.max_message_mb is not None:
        opts.max_message_bytes = args.max_message_mb << 20
    overrides = {"delay_s": args.mock_delay_s} if args.engine == "mock" else {}
    sidecar = serve(config, engine_name=args.engine, port=opts.port, options=opts, **overrides)
    logging.getLogger(__name__).info("token %s", "required" if opts.token else f"not set (${TOKEN_ENV})")
    run_until_signalled(sidecar)
    return 0


if __name__ == "__main__":
    sys.exit(main())

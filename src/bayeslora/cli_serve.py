"""``bayeslora serve``: the CLI front of :mod:`bayeslora.serve`."""

from __future__ import annotations

import argparse
import sys


def add_serve_parser(sub) -> None:
    p = sub.add_parser("serve", help="serve a run (or a base model) over an OpenAI-compatible HTTP API",
                       description="Serve RUN_DIR (any saved method) or, without it, the base model --model with no "
                       "adapter: /v1/chat/completions and /v1/completions (OpenAI schema + a `confidence` object per "
                       "choice), /v1/choices (multiple-choice predictive with uncertainty), /v1/models, /health, "
                       "/openapi.json.")
    p.add_argument("run_dir", nargs="?", default=None, help="run directory written by `bayeslora train`")
    p.add_argument("--model", default=None, help="base model spec (default: the run's, else smollm2-135m)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    p.add_argument("--port", type=int, default=8000, help="TCP port")
    p.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` on every route but /health")
    p.add_argument("--model-name", default=None, help="model id in /v1/models (default: run dir name or model spec)")
    p.add_argument("--samples", type=int, default=None,
                   help="posterior samples S per request (default: the method's, at most --max-samples)")
    p.add_argument("--max-samples", type=int, default=32, help="largest S a request may ask for")
    p.add_argument("--max-tokens", type=int, default=512, help="largest max_tokens a request may ask for")
    p.add_argument("--default-max-tokens", type=int, default=128, help="max_tokens when a request gives none")
    p.add_argument("--max-n", type=int, default=4, help="largest n (choices per request)")
    p.add_argument("--max-context", type=int, default=None, help="prompt + max_tokens limit (default: the model's)")
    p.add_argument("--queue-size", type=int, default=32, help="requests waiting before 503")
    p.add_argument("--abstain-threshold", type=float, default=0.5, help="/v1/choices abstains below it")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="override a prediction-time method option of the run (repeatable), e.g. --option "
                        "predictive=antithetic, --option prompt=mean or --option sample_chunk=2; they shape "
                        "generation as they shape /v1/choices")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn log level")
    p.set_defaults(func=cmd_serve)


def settings_from_args(args: argparse.Namespace):
    from .serve import ServeSettings

    return ServeSettings(host=args.host, port=args.port, api_key=args.api_key, model_name=args.model_name,
                         samples=args.samples, max_samples=args.max_samples, max_tokens=args.max_tokens,
                         default_max_tokens=args.default_max_tokens, max_n=args.max_n, max_context=args.max_context,
                         queue_size=args.queue_size, abstain_threshold=args.abstain_threshold)


def cmd_serve(args: argparse.Namespace) -> int:
    from .serve import InferenceService
    from .serve.server import check_port_free, run_server

    from .cli import _parse_option

    settings = settings_from_args(args)
    check_port_free(settings.host, settings.port)
    options = dict(_parse_option(o) for o in args.option)
    service = InferenceService.load(args.run_dir, args.model, settings, options=options)
    note = capped_samples_note(service)
    if note:
        print(note, file=sys.stderr)
    run_server(settings, service, log_level=args.log_level)


def capped_samples_note(service) -> str | None:
    """A note when the server's --max-samples cuts the run's own default number of samples (Laplace: 50)."""
    settings, default = service.settings, service.run.method.resolve_samples(None)
    if settings.samples is not None or default <= settings.max_samples:
        return None
    return (f"note: serving {service.run.method.name} with S = {settings.max_samples} (--max-samples) by default; "
            f"its own default is {default}: pass --max-samples {default} to use it")
    return 0

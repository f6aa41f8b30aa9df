"""Running the app: `roe serve`'s entry point and the uvicorn server it starts."""

import logging
import os

from .cli_args import serve_limits
from .connections import ConnectionLimits, protocol_class

log = logging.getLogger("roe.server")


def make_server(app, host: str, port: int, graceful_timeout: float, connections: ConnectionLimits | None = None):
    """A uvicorn server whose shutdown (SIGTERM, SIGINT) first answers every queued job 503, then lets running
    requests finish for at most `graceful_timeout` seconds (those still running then answer 503); its connections
    are bounded by `connections` (timeouts and a maximum count, see connections.py)."""
    import uvicorn

    connections = connections or ConnectionLimits()

    class Server(uvicorn.Server):
        async def shutdown(self, sockets=None):
            app.state.scheduler.close()
            await super().shutdown(sockets=sockets)

    return Server(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                 timeout_graceful_shutdown=graceful_timeout, http=protocol_class(connections),
                                 timeout_keep_alive=connections.timeout_idle))


def serve(app, host: str, port: int, graceful_timeout: float, connections: ConnectionLimits | None = None) -> None:
    make_server(app, host, port, graceful_timeout, connections).run()


def cmd_serve(args) -> int:
    from ..options import load_roster
    from .app import create_app

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.timeout_graceful_shutdown < 0:
        raise ValueError(f"--timeout-graceful-shutdown must be >= 0, got {args.timeout_graceful_shutdown}")
    connections = ConnectionLimits(args.timeout_header, args.timeout_body, args.timeout_idle, args.max_connections)
    roster = load_roster(args)
    limits = serve_limits(args, roster.max_context)
    api_key = args.api_key or os.environ.get("ROE_API_KEY")
    app = create_app(roster, args.served_model_name or args.model, limits, api_key)
    log.info("serving %s on http://%s:%d (RoE %s)", args.model, args.host, args.port, roster.config)
    serve(app, args.host, args.port, args.timeout_graceful_shutdown, connections)
    return 0

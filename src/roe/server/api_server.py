"""Running the app: `roe serve`'s entry point and the uvicorn server it starts, with its shutdown.

Shutdown, on SIGTERM and SIGINT alike: queued jobs answer 503 at once and new connections are refused; running
requests get --timeout-graceful-shutdown seconds to finish. Those still running then end with an answer: a stream
gets an error event in the OpenAI format and `data: [DONE]`, a plain request a 503. The worker thread stops at its
next decode step and is joined before the process exits, with status 0 (uvicorn itself re-raises the signal after
shutting down, which exits -15 on SIGTERM, and on SIGINT let the worker die mid-step: an abort).
"""

import asyncio
import logging
import os
import signal
import sys
import time

import uvicorn

from .cli_args import serve_limits
from .connections import ConnectionLimits, protocol_class

log = logging.getLogger("roe.server")

FLUSH_S = 0.4  # after the graceful timeout: time for the ended requests' last bytes to go out
JOIN_S = 0.3  # then: time for the worker thread to finish its decode step


class RoEServer(uvicorn.Server):
    """uvicorn's server with `roe serve`'s shutdown (see the module docstring)."""

    def __init__(self, config: uvicorn.Config, scheduler):
        super().__init__(config)
        self.scheduler = scheduler

    def handle_exit(self, sig, frame) -> None:
        # uvicorn's, without remembering the signal to raise again once shut down; a second SIGINT still skips
        # the wait for running requests
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True
        self.should_exit = True

    async def shutdown(self, sockets=None) -> None:
        self.scheduler.close()  # queued jobs answer 503 now
        for server in self.servers:
            server.close()
        for connection in list(self.server_state.connections):
            connection.shutdown()  # idle keep-alive connections close; busy ones close after their response
        graceful = self.config.timeout_graceful_shutdown
        if not await self._drained(graceful if graceful is not None else float("inf")):
            ended = self.scheduler.end_running()
            log.warning("shutdown: %d running completion(s) outlasted the graceful timeout and were ended", ended)
            if not await self._drained(FLUSH_S):
                self._cut_off()
        await asyncio.to_thread(self.scheduler.thread.join, JOIN_S)
        if not self.force_exit:
            await self.lifespan.shutdown()

    async def _drained(self, seconds: float) -> bool:
        """Wait (at most `seconds`) until no connection and no request task is left."""
        deadline = time.monotonic() + seconds
        while self.server_state.connections or self.server_state.tasks:
            if self.force_exit or time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.02)
        return True

    def _cut_off(self) -> None:
        """Clients that did not take their last bytes (or a handler that did not end): close their connections,
        then cancel what is left (uvicorn's own last resort)."""
        for connection in list(self.server_state.connections):
            transport = getattr(connection, "transport", None)
            if transport is not None:
                transport.abort()
        for task in self.server_state.tasks:
            task.cancel()


def make_server(app, host: str, port: int, graceful_timeout: float, connections: ConnectionLimits | None = None):
    """A uvicorn server with `roe serve`'s shutdown (the module docstring) and connection limits (connections.py)."""
    connections = connections or ConnectionLimits()
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=graceful_timeout,
                            http=protocol_class(connections), timeout_keep_alive=connections.timeout_idle)
    return RoEServer(config, app.state.scheduler)


def serve(app, host: str, port: int, graceful_timeout: float, connections: ConnectionLimits | None = None) -> None:
    server = make_server(app, host, port, graceful_timeout, connections)
    server.run()
    if server.scheduler.thread.is_alive():  # still inside a decode step: `roe serve` exits without waiting for it
        log.warning("shutdown: the model worker is still in a decode step; exiting without waiting for it")


def _exit(code: int) -> None:
    """Leave now that everything is shut down. The interpreter's own teardown would collect every module torch and
    transformers loaded (2.8-3.9 s measured on a loaded 2-core machine), past the promise of exiting within the
    graceful timeout plus a second, and with the worker thread still in a native decode step it could abort."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)


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
    _exit(0)

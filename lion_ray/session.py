"""What a command needs at run time: Ray, the run directory and live endpoints.

    with Session(cfg) as session:
        session.endpoint("teacher")   # base_url 'sandbox' resolved to the started server

When any endpoint's base_url is 'sandbox', the session starts the sandbox server (with the
config's limits and faults) for its lifetime.
"""

from __future__ import annotations

from lion_ray.config import EndpointConfig, LionConfig
from lion_ray.storage import RunDir


class Session:
    def __init__(
        self,
        cfg: LionConfig,
        *,
        need_ray: bool = True,
        need_endpoints: bool = True,
        quiet: bool = False,
    ):
        self.cfg = cfg
        self.need_ray = need_ray
        self.need_endpoints = need_endpoints
        self.quiet = quiet
        self.run = RunDir(cfg.storage.run_dir)
        self.sandbox = None
        self.dashboard_url: str | None = None

    def __enter__(self) -> Session:
        if self.need_endpoints and any(e.is_sandbox for e in self.cfg.endpoints().values()):
            from lion_ray.sandbox.server import SandboxProcess, ServerOptions

            sb = self.cfg.sandbox
            options = ServerOptions(
                rpm=sb.rpm,
                tpm=sb.tpm,
                error_rate=sb.error_rate,
                latency_ms=sb.latency_ms,
                malformed_rate=sb.malformed_rate,
                teacher_error_rate=sb.teacher_error_rate,
            )
            self.sandbox = SandboxProcess(options, host=sb.host, port=sb.port).start()
        if self.need_ray:
            from lion_ray.engines.cluster import init_ray

            self.dashboard_url = init_ray(self.cfg.cluster, quiet=self.quiet)
        return self

    def endpoint(self, role: str) -> EndpointConfig:
        ep = self.cfg.endpoints()[role]
        if ep.is_sandbox:
            return ep.model_copy(update={"base_url": self.sandbox.base_url})
        return ep

    def spent_usd(self, role: str) -> float:
        """What this endpoint already cost in completed stages of this run (for its budget)."""
        total = 0.0
        for info in self.run.manifest.stages.values():
            total += info.get("api", {}).get(role, {}).get("cost_usd", 0.0)
        return total

    def __exit__(self, *exc) -> None:
        if self.sandbox is not None:
            self.sandbox.stop()

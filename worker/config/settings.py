"""Settings from the environment (prefix CASCADE_) or a .env file.

The broker and database URLs may reference secrets as ${NAME}, read from the
environment or the secrets file $CASCADE_SECRETS_FILE (see worker.config.credentials):
    CASCADE_BROKER_URL=redis://cascade:${REDIS_PASSWORD}@redis:6379/0

With no broker and no database configured the embedded mode is used: a SQLite
file under `home` and Celery queues served by worker threads in-process.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from worker.config.credentials import expand


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CASCADE_", env_file=".env", extra="ignore")

    broker_url: str | None = Field(None, description="Celery broker, e.g. redis://127.0.0.1:6379/0; unset = embedded")
    database_url: str | None = Field(None, description="SQLAlchemy URL, e.g. postgresql+psycopg://127.0.0.1/cascade; unset = SQLite under home")
    portfolio: Path | None = Field(None, description="default portfolio file for `cascade worker` and `cascade run`")
    portfolio_dir: Path | None = Field(None, description="task API: each *.toml/*.yaml here is portfolio `cascade/<stem>`")
    home: Path = Field(Path("var"), description="state folder of the embedded mode (SQLite file, outputs)")
    model_cache: Path = Field(Path.home() / ".cache" / "cascade-router" / "models", description="assembled local GGUF models")
    redis_prefix: str = Field("", description="prefix of every Redis key the broker uses (isolates deployments)")
    visibility_timeout: int = Field(3600, ge=5, description="seconds before an unacknowledged task is redelivered; above the longest task")
    worker_concurrency: int = Field(1, ge=1)
    chunk_size: int = Field(256, ge=1, le=1000, description="jobs per stage message (a batch's, and a stage's escalations): one read, one call of generate_many and one write per message")
    backend_retries: int = Field(3, ge=0, le=10, description="retries of a transient backend error before falling back")
    backend_retry_backoff: float = Field(0.5, ge=0, description="first retry delay in seconds, doubled each time")
    backend_retry_max_delay: float = Field(30.0, ge=0)
    backend_breaker_cooldown: float = Field(30.0, ge=0, description="seconds a tier's backend is not called in a "
                                                                    "worker process after a call gave up on it "
                                                                    "(its jobs fall back at once); 0 = off")
    record_wait: float = Field(1800, ge=0, description="seconds a stage whose models were called waits for the "
                                                       "database to record them (an outage) before giving up")
    publish_wait: float = Field(600, ge=0, description="seconds a send keeps retrying while the broker is away")
    api_publish_wait: float = Field(5, ge=0, description="seconds the task API's send of a new job's first stage "
                                                         "retries while the broker is away; then the job, already "
                                                         "committed, is answered 202 and sent by a tier worker's "
                                                         "sweeper after stale_after")
    stale_after: float = Field(60, ge=2, description="seconds an open job may go without a heartbeat before a tier "
                                                     "worker re-sends its stage (its message was lost: a killed "
                                                     "worker, a broker restarted empty)")
    sweep_interval: float = Field(0, ge=0, description="seconds between a tier worker's heartbeats and sweeps; 0 = stale_after/4")
    max_deliveries: int = Field(3, ge=1, le=100, description="stage runs of one job at one tier that end without a result (the stage raised, the worker died) before the job fails with its last error")
    job_timeout: float = Field(0, ge=0, description="seconds a job may stay unfinished after submission; past it the job expires (fails) instead of being re-sent; 0 = no deadline")
    store_content: bool = Field(True, description="false: for sensitive traffic, a job's prompt and its tiers' answers are erased when it finishes and its final answer once its results are collected (only ids ever travel through Redis)")
    retune_audit_share: float = Field(0.0, ge=0, le=1, description="`cascade retune`: the share of the recent jobs that never reached the top tier sent again through every tier (the calibration path), so their answers can be labelled by agreement with the top tier; 0 = none")
    retune_audit_max_usd: float = Field(1.0, ge=0, description="`cascade retune`: the most that audit may spend, in USD (its batch stops there)")
    metrics_port: int = Field(0, ge=0, le=65535, description="port of a tier worker's /metrics and /healthz endpoint; 0 = off")
    canary_interval: float = Field(15.0, gt=0, description="seconds between the canaries a tier worker sends itself")
    canary_max_age: float = Field(600.0, gt=0, description="/healthz fails when the worker's last canary was consumed longer ago; above the longest stage")
    log_content: bool = Field(False, description="let prompts and answers into log lines (debugging only)")
    api_auth: bool | None = Field(None, description="`cascade serve` asks for an API key (cascade keys create); unset = in the distributed mode only")
    file_ttl: float = Field(30 * 86400, ge=1, description="seconds an uploaded file (/v1/files) is kept before it "
                            "expires and `cascade purge` removes it; default 30 days")
    webhook_secret: str = Field("", description="HMAC key signing batch webhooks (Cascade-Signature); unset = an empty key")
    webhook_backoff: float = Field(2.0, gt=0, description="first webhook retry delay in seconds, doubled each time")
    webhook_attempts: int = Field(8, ge=1, le=30, description="webhook deliveries tried before giving up")
    remote_control: Literal["off", "flower", "full"] = Field(
        "flower", description="Celery remote control of the workers: flower (the default) = read-only inspection, "
                               "events and ping, what Flower needs to show workers, queues and tasks, and "
                               "nothing that stops, revokes, resizes or reroutes a worker; off = the workers do "
                               "not listen at all; full = every command, shutdown and revoke included")
    broker_tls_ca: Path | None = Field(None, description="CA file that verifies a rediss:// broker's certificate "
                                                         "(default: the system's CAs)")
    allow_open_broker: bool = Field(False, description="let `cascade worker` use a non-local broker URL with no "
                                                       "credentials")
    allow_missing_signals: bool = Field(False, description="let `cascade worker` start when its tier's server "
                                                           "answers the start-up probe without a signal the "
                                                           "policy reads (degraded; such decisions are counted)")
    preflight_wait: float = Field(120.0, ge=0, description="seconds a tier worker waits at start for its backend's "
                                                         "server to answer the signal probe; past it the worker "
                                                         "serves without it (its jobs fall back while the server "
                                                         "is down) and probes again in the background")
    model_threads: int | None = Field(None, ge=1, description="llama.cpp threads per worker process")
    db_prepared: bool = Field(True, description="PostgreSQL: keep a statement run again and again prepared on its "
                                                "connection (parsed once, still planned for each run's values); "
                                                "false behind a pooler that cannot keep them (PgBouncer before "
                                                "1.21 in transaction pooling, or one refusing the `options` "
                                                "start-up parameter)")

    @property
    def embedded(self) -> bool:
        return self.broker_url is None

    @property
    def auth_required(self) -> bool:
        return (not self.embedded) if self.api_auth is None else self.api_auth

    @property
    def db_url(self) -> str:
        """The database URL with its ${NAME} secrets expanded (print it with credentials.redact_url)."""
        if self.database_url:
            return expand(self.database_url, "CASCADE_DATABASE_URL")
        return f"sqlite:///{(self.home / 'cascade.sqlite').resolve()}"

    @property
    def broker(self) -> str:
        return expand(self.broker_url, "CASCADE_BROKER_URL") if self.broker_url else "memory://"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()

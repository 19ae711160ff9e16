"""The SQL options of a server process (behaviour.md §10), set once at start-up."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class QuerySettings:
    statement_timeout_ms: int = 5000  # 0 = off
    max_result_bytes: int = 64 << 20  # unary Query only; 0 = off
    max_concurrent_statements: int = 8  # per shard; 0 = off
    slow_query_log_ms: int = 1000  # 0 = off
    count_from_status_counters: bool = True

    @classmethod
    def from_config(cls, config) -> QuerySettings:
        return cls(
            statement_timeout_ms=config.statement_timeout_ms,
            max_result_bytes=config.max_result_bytes,
            max_concurrent_statements=config.max_concurrent_statements,
            slow_query_log_ms=config.slow_query_log_ms,
            count_from_status_counters=config.count_from_status_counters,
        )


SETTINGS = QuerySettings()


def configure(config) -> None:
    """Adopt a server Config's SQL options (called by the worker at start-up)."""
    global SETTINGS  # noqa: PLW0603 - one process-wide setting, set before serving
    SETTINGS = QuerySettings.from_config(config)

"""What `smallgpt serve` admits, and the variable its API key may come from.

Apart from the server (`smallgpt.serve`) so that the command line reads these defaults without loading
the web stack and torch.
"""

from dataclasses import dataclass

from smallgpt.errors import SmallGPTError

API_KEY_ENV = "SMALLGPT_API_KEY"


@dataclass(frozen=True)
class Limits:
    max_tokens_cap: int = 2048  # the largest max_tokens a request may ask for
    max_body_bytes: int = 1 << 20  # 1 MiB: far more text than any context holds
    max_batch: int = 16  # sequences decoded together (KV-cache rows)
    max_queue: int = 64  # sequences that may wait for a row; beyond that: 429
    request_timeout: float = 600.0  # seconds a request may generate for

    def __post_init__(self) -> None:
        checks = [
            ("max_tokens cap", self.max_tokens_cap, 1),
            ("max_batch", self.max_batch, 1),
            ("max_queue", self.max_queue, 0),
        ]
        for name, value, least in checks:
            if value < least:
                raise SmallGPTError(f"{name} must be at least {least}, got {value}")
        if not self.request_timeout > 0:
            raise SmallGPTError(f"request_timeout must be positive, got {self.request_timeout}")

"""Generation service configuration."""

from dataclasses import dataclass

from rlhf.auth import APP, Credentials
from rlhf.config import (
    CommonConfig,
    ConfigError,
    GenerationIdSettings,
    PolicyModelSettings,
    setting,
)
from rlhf.limits import PromptLimits
from rlhf.models import DTYPES

# Most choices (OpenAI `n`) one request may ask for; they are decoded in one batch, so also at
# most RLHF_MAX_BATCH.
MAX_CHOICES = 8


@dataclass(frozen=True)
class GenerationConfig(CommonConfig, PolicyModelSettings, GenerationIdSettings, PromptLimits):
    grpc_port: int = setting("RLHF_GRPC_PORT", 50051, "gRPC port (0 = any)")
    max_new_tokens_limit: int = setting(
        "RLHF_MAX_NEW_TOKENS_LIMIT", 512, "largest max_new_tokens a request may ask for"
    )
    default_max_new_tokens: int = setting(
        "RLHF_DEFAULT_MAX_NEW_TOKENS", 64, "max_new_tokens when a request leaves it at 0"
    )
    max_concurrent_requests: int = setting(
        "RLHF_MAX_CONCURRENT_REQUESTS", 64, "requests queued or running before RESOURCE_EXHAUSTED"
    )
    max_batch: int = setting("RLHF_MAX_BATCH", 16, "requests decoded together (rows of a step)")
    batch_wait_ms: float = setting(
        "RLHF_BATCH_WAIT_MS",
        5.0,
        "an idle batcher keeps collecting a burst while requests arrive this close",
    )
    kv_budget_tokens: int = setting(
        "RLHF_GENERATION_KV_BUDGET_TOKENS",
        32768,
        "KV cache columns the running batch may hold (each request reserves prompt + "
        "max_new_tokens); requests beyond it wait in the queue",
    )
    decode_dtype: str = setting(
        "RLHF_GENERATION_DTYPE",
        "auto",
        "weights user requests decode with: float32, bfloat16, or auto (bfloat16 on a CPU with "
        "AMX or a CUDA GPU with bfloat16, else float32); trainer rollouts always use float32",
    )
    request_timeout_seconds: float = setting(
        "RLHF_REQUEST_TIMEOUT_SECONDS", 300.0, "longest a request may queue and decode"
    )
    http_port: int = setting(
        "RLHF_HTTP_PORT", 8080, "HTTP API port: TGI and OpenAI routes (0 = any, -1 = disabled)"
    )
    api_keys: tuple[str, ...] = setting(
        "RLHF_GENERATION_API_KEYS",
        (),
        "tenant=key pairs (keys 16+ chars) of the apps that may generate (gRPC and HTTP), "
        "presented as `authorization: Bearer <key>`; a tenant's ids take feedback only from it",
        True,
    )
    open_access: bool = setting(
        "RLHF_GENERATION_OPEN",
        False,
        "let anyone generate without a key (behind a gateway of your own); their ids belong to "
        "no tenant. Rollouts still need a service key",
    )
    http_max_connections: int = setting(
        "RLHF_HTTP_MAX_CONNECTIONS", 64, "HTTP API connections served at once (more get 503)"
    )
    backend: str = setting("RLHF_GENERATION_BACKEND", "local", "local (transformers) or tgi")
    tgi_url: str = setting("RLHF_TGI_URL", "", "TGI server base URL, with the tgi backend")
    tgi_deployment: str = setting(
        "RLHF_TGI_DEPLOYMENT", "", "Deployment to roll on new policies (tgi backend; empty = never)"
    )
    tgi_namespace: str = setting("RLHF_TGI_NAMESPACE", "default", "namespace of that Deployment")
    releases: bool = setting(
        "RLHF_GENERATION_RELEASES",
        False,
        "serve what release events name (topic rlhf.releases.v1: an incumbent policy and a "
        "canary candidate for a share of users) instead of every new policy checkpoint; local "
        "backend only",
    )

    def validate(self) -> None:
        super().validate()
        self.check_generation_id_keys()
        if self.backend not in ("local", "tgi"):
            raise ConfigError(f"RLHF_GENERATION_BACKEND={self.backend!r}: use local or tgi")
        if self.kv_budget_tokens < self.max_prompt_tokens + self.max_new_tokens_limit:
            raise ConfigError(
                "RLHF_GENERATION_KV_BUDGET_TOKENS must hold one request of RLHF_MAX_PROMPT_TOKENS "
                "+ RLHF_MAX_NEW_TOKENS_LIMIT"
            )
        if self.decode_dtype not in DTYPES:
            raise ConfigError(f"RLHF_GENERATION_DTYPE={self.decode_dtype!r}: use one of {DTYPES}")
        if self.backend == "tgi" and self.releases:
            raise ConfigError("RLHF_GENERATION_RELEASES needs RLHF_GENERATION_BACKEND=local")
        if self.backend == "tgi" and not self.tgi_url:
            raise ConfigError("RLHF_TGI_URL is required with RLHF_GENERATION_BACKEND=tgi")
        try:
            self.apps()
        except ValueError as exc:
            raise ConfigError(f"RLHF_GENERATION_API_KEYS: {exc}") from exc
        if not (self.open_access or self.api_keys or self.auth.service_keys):
            raise ConfigError(
                "generation is closed by default: set RLHF_GENERATION_API_KEYS (apps), "
                "RLHF_SERVICE_KEYS (the trainer's rollouts only) or RLHF_GENERATION_OPEN=true"
            )
        if self.http_max_connections < 1:
            raise ConfigError("RLHF_HTTP_MAX_CONNECTIONS must be at least 1")

    def apps(self) -> Credentials:
        """The apps' keys (app role; the tenant is the name)."""
        return Credentials.parse(APP, self.api_keys)

"""Model specs (`"auto"`, `"gpt-4o-mini"`, `"openai:gpt-5-mini"`, `"ollama:qwen3"`...) resolved to clients.

This is the one place where a spec becomes a client. Providers are data: a base URL and the
environment variable holding the key. Every provider speaks the OpenAI protocol except
`anthropic`, which has its own client (optional extra: `pip install 'rlm[anthropic]'`).

A spec without a known provider prefix (`"auto"`, `"my-model"`, `"llama3:8b"`) goes to the
default endpoint: `api_url=`, else `RLM_API_URL`, else http://localhost:8080/v1.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from rlm.errors import ConfigError
from rlm.utils.limits import ResponseLimits
from rlm.utils.llm import LLMClient, OpenAICompatibleClient

__all__ = ["Provider", "PROVIDERS", "resolve_client", "split_spec"]


@dataclass(frozen=True, kw_only=True)
class Provider:
    """Where a provider's API lives and which environment variable holds its key."""

    base_url: str
    key_env: str | None = None
    key_required: bool = False
    client: str = "openai"  # "openai" (OpenAI-compatible) or "anthropic" (native)


PROVIDERS: dict[str, Provider] = {
    "openai": Provider(base_url="https://api.openai.com/v1", key_env="OPENAI_API_KEY", key_required=True),
    "anthropic": Provider(
        base_url="https://api.anthropic.com", key_env="ANTHROPIC_API_KEY", key_required=True, client="anthropic"
    ),
    "openrouter": Provider(base_url="https://openrouter.ai/api/v1", key_env="OPENROUTER_API_KEY", key_required=True),
    "gemini": Provider(
        base_url="https://generativelanguage.googleapis.com/v1beta/openai", key_env="GEMINI_API_KEY", key_required=True
    ),
    "groq": Provider(base_url="https://api.groq.com/openai/v1", key_env="GROQ_API_KEY", key_required=True),
    "together": Provider(base_url="https://api.together.xyz/v1", key_env="TOGETHER_API_KEY", key_required=True),
    "deepseek": Provider(base_url="https://api.deepseek.com/v1", key_env="DEEPSEEK_API_KEY", key_required=True),
    "vllm": Provider(base_url="http://localhost:8000/v1", key_env="VLLM_API_KEY"),
    "sglang": Provider(base_url="http://localhost:30000/v1"),
    "ollama": Provider(base_url="http://localhost:11434/v1"),
    "llamacpp": Provider(base_url="http://localhost:8080/v1"),
    "lmstudio": Provider(base_url="http://localhost:1234/v1"),
}


def split_spec(spec: str) -> tuple[str | None, str]:
    """("openai", "gpt-5-mini") for "openai:gpt-5-mini"; (None, spec) without a known provider."""
    prefix, sep, rest = spec.partition(":")
    if sep and prefix.lower() in PROVIDERS:
        return prefix.lower(), rest or "auto"
    return None, spec


def resolve_client(
    spec: str,
    *,
    api_url: str | None = None,
    api_key: str | None = None,
    timeout: float = 600.0,
    max_retries: int = 3,
    limits: ResponseLimits | None = None,
) -> LLMClient:
    """The client for a model spec. `api_url` / `api_key` override a provider's preset; `limits`
    caps what an answer may hold (`rlm.utils.limits.ResponseLimits`)."""
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError("a model must be a name, 'auto', or 'provider:name' such as 'openai:gpt-4o-mini'")
    name, model = split_spec(spec.strip())
    if name is None:
        return OpenAICompatibleClient(
            model, api_url=api_url, api_key=api_key, timeout=timeout, max_retries=max_retries, limits=limits
        )
    provider = PROVIDERS[name]
    key = api_key or (os.environ.get(provider.key_env) if provider.key_env else None)
    if provider.key_required and not key:
        raise ConfigError(f"{spec!r} needs an API key: set {provider.key_env} (or pass api_key=)")
    url = api_url or provider.base_url
    if provider.client == "anthropic":
        return _anthropic_client(model, url, key, timeout, max_retries, limits)
    return OpenAICompatibleClient(
        model, api_url=url, api_key=key or "not-needed", timeout=timeout, max_retries=max_retries, limits=limits
    )


def _anthropic_client(
    model: str, url: str, key: str | None, timeout: float, max_retries: int, limits: ResponseLimits | None
) -> LLMClient:
    try:
        from rlm.utils.anthropic_client import AnthropicClient
    except ImportError as exc:
        raise ConfigError(
            f"the anthropic provider needs the optional extra: pip install 'rlm[anthropic]' ({exc})"
        ) from None
    if model == "auto":
        raise ConfigError("name the Anthropic model, e.g. 'anthropic:claude-haiku-4-5'; 'auto' is not supported")
    return AnthropicClient(model, api_url=url, api_key=key, timeout=timeout, max_retries=max_retries, limits=limits)

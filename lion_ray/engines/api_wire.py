"""A chat request as it goes over the wire, shared by the online engine (``api``) and the
Batch API (``batch``): its body, its response-cache key, its worst-case cost, the key it is
sent with, and the errors that stop a stage."""

from __future__ import annotations

import os

from lion_ray.config import EndpointConfig
from lion_ray.engines import cache as response_cache
from lion_ray.errors import LionError
from lion_ray.logic.accounting import cost_usd, estimate_prompt_tokens
from lion_ray.logic.chat import ChatRequest


class FatalApiError(LionError):
    """An error that retrying cannot fix (bad key, unknown model or URL): stop the stage."""


class QuotaExhausted(FatalApiError):
    """The provider says the account is out of credit (429 insufficient_quota)."""


class BudgetExceeded(LionError):
    """The endpoint's spending cap was reached; what was done is kept in the cache."""


def request_params(
    endpoint: EndpointConfig, seed: int | None, response_format: dict | None = None
) -> dict:
    """Everything a request sends besides model and messages (None: not sent)."""
    params = {"temperature": endpoint.temperature, "top_p": endpoint.top_p, "seed": seed}
    params[endpoint.token_param] = endpoint.max_tokens
    if response_format is not None:
        params["response_format"] = response_format
    return params


def request_body(endpoint: EndpointConfig, request: ChatRequest) -> dict:
    """The chat-completions body of a request, as sent online or written into a batch."""
    params = request_params(endpoint, request.seed, request.response_format)
    return {"model": endpoint.model, "messages": request.messages} | {
        k: v for k, v in params.items() if v is not None
    }


def request_key(endpoint: EndpointConfig, request: ChatRequest) -> str:
    """The response cache's key of a request."""
    params = request_params(endpoint, request.seed, request.response_format)
    return response_cache.cache_key(endpoint.model, params, request.messages)


def api_key(endpoint: EndpointConfig) -> str:
    """The endpoint's key from its environment variable (never from the config)."""
    if not endpoint.api_key_env:
        return "none"
    value = os.environ.get(endpoint.api_key_env, "")
    if not value:
        raise FatalApiError(
            f"environment variable {endpoint.api_key_env} is not set or empty; export the API key "
            f"for {endpoint.base_url} in it (or change api_key_env)"
        )
    return value


def worst_case(endpoint: EndpointConfig, messages: list[dict]) -> tuple[int, float]:
    """(tokens, USD) a request may use at most: what the limiter and the budget reserve."""
    prompt = estimate_prompt_tokens(messages)
    usd = cost_usd(
        prompt, endpoint.max_tokens, endpoint.price_per_1k_input, endpoint.price_per_1k_output
    )
    return prompt + endpoint.max_tokens, usd

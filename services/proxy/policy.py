"""The usage policy at the proxy: checked after the body is read, before anything goes upstream.

A model outside the endpoint's list is 403 `model_not_allowed`; a value over a cap is
400 `policy_limit_exceeded` naming the limit, or lowered to the cap where the policy
says `over_cap = "clamp"` (the body is then re-encoded; the signature covered what
the client sent, and what goes upstream is never more than that).
"""

from __future__ import annotations

import orjson

from shared.errors import ApiError, BadRequestError, ForbiddenError
from shared.policy import EndpointRules, PolicyHolder, endpoint_for
from shared.ratelimit import Limit
from shared.tokens import ProxyClaims

from .bodies import JsonBody, Upload
from .routes import Route

__all__ = ["USER_LAYER", "RequestPolicy"]

USER_LAYER = "per-user"

# Body fields a `max_tokens` cap applies to (chat completions has had both names; the
# Responses API calls it max_output_tokens).
_TOKEN_FIELDS = ("max_tokens", "max_completion_tokens", "max_output_tokens")

# Where a clamping policy writes its cap when the request named none.
_DEFAULT_CAP_FIELD = {"chat_completions": "max_completion_tokens", "responses": "max_output_tokens"}


def _limit(name: str, cap: int) -> BadRequestError:
    return BadRequestError(
        f"{name} exceeds the policy limit of {cap}", code="policy_limit_exceeded"
    )


def _check_model(rules: EndpointRules, model: str | None) -> None:
    if model is None:
        raise BadRequestError("the request must name a model", code="model_required")
    if not rules.allows_model(model):
        raise ForbiddenError("this model is not allowed by policy", code="model_not_allowed")


class RequestPolicy:
    """`PolicyHolder.current` applied to one proxy request."""

    def __init__(self, holder: PolicyHolder) -> None:
        self._holder = holder

    @classmethod
    def built_in(cls) -> RequestPolicy:
        """The built-in policy (shared.policy.default_policy), for a handler built without one."""
        return cls(PolicyHolder(None, service="proxy"))

    def _rules(self, route: Route, claims: ProxyClaims) -> EndpointRules | None:
        endpoint = endpoint_for(route.endpoint)
        return self._holder.current.rules(endpoint, claims.tier) if endpoint else None

    def output_cap(self, route: Route, claims: ProxyClaims) -> int | None:
        """The policy's output token cap for this route and tier (None: no cap)."""
        rules = self._rules(route, claims)
        return rules.max_tokens if rules is not None else None

    @staticmethod
    def user_limits(claims: ProxyClaims, per_minute: int) -> list[Limit]:
        """The per-user layer, next to per-token and per-IP (tokens with a principal)."""
        return [Limit(USER_LAYER, claims.sub, per_minute, 60.0)] if claims.sub else []

    def check_upload(self, route: Route, claims: ProxyClaims, upload: Upload) -> None:
        """A multipart upload (transcription): its model and size (the audio length
        bound the policy can check without decoding); a refused upload is closed."""
        rules = self._rules(route, claims)
        if rules is None:
            return
        try:
            _check_model(rules, upload.model)
            if rules.max_input_bytes is not None and upload.size > rules.max_input_bytes:
                raise _limit("the upload", rules.max_input_bytes)
        except ApiError:
            upload.close()
            raise

    def apply(self, route: Route, claims: ProxyClaims, body: JsonBody) -> JsonBody:
        """`body` as it may go upstream (possibly clamped); raises when it may not."""
        rules = self._rules(route, claims)
        if rules is None:
            return body
        _check_model(rules, body.model)
        payload = body.payload
        if rules.max_input_bytes is not None and len(body.raw) > rules.max_input_bytes:
            raise _limit("the request body", rules.max_input_bytes)
        text = payload.get("input")
        limit = rules.max_input_chars
        if limit is not None and isinstance(text, str) and len(text) > limit:
            raise _limit("input length", limit)
        clamped: dict[str, int] = {}
        caps = [(name, rules.max_tokens) for name in _TOKEN_FIELDS] + [("n", rules.max_n)]
        for name, cap in caps:
            value = payload.get(name)
            if cap is None or value is None:
                continue
            if not isinstance(value, int) or isinstance(value, bool):
                raise BadRequestError(f"{name} must be an integer", code="invalid_request")
            if value > cap:
                if rules.over_cap != "clamp":
                    raise _limit(name, cap)
                clamped[name] = cap
        asked = any(payload.get(f) is not None for f in _TOKEN_FIELDS)
        field = _DEFAULT_CAP_FIELD.get(route.endpoint)
        if field and rules.over_cap == "clamp" and rules.max_tokens is not None and not asked:
            # No cap asked for means the provider's maximum: a clamping policy sets its own.
            clamped[field] = rules.max_tokens
        if not clamped:
            return body
        changed = {**payload, **clamped}
        return JsonBody(orjson.dumps(changed), changed)

"""One exception tree; each class knows its HTTP status, error type and code."""

from __future__ import annotations

from typing import Any

import orjson


class GatewayError(Exception):
    status = 500
    type = "server_error"
    code = "internal_error"

    def __init__(
        self,
        message: str,
        details: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.details = details or {}
        self.headers = headers or {}

    def body(self) -> bytes:
        """The JSON error body in SPEC §4's envelope (a family may read another: its
        Family.error_body)."""
        return error_body(self.message, self.type, self.code, self.details)


def error_body(message: str, type_: str, code: str, details: dict[str, Any] | None = None) -> bytes:
    return orjson.dumps(
        {
            "error": {
                "message": message,
                "type": type_,
                "code": code,
                "param": None,
                "details": details or {},
            }
        }
    )


class Unauthorized(GatewayError):
    status = 401
    type = "authentication_error"
    code = "unauthorized"


class ModelNotAllowed(GatewayError):
    status = 403
    type = "permission_error"
    code = "model_not_allowed"


class BadRequest(GatewayError):
    status = 400
    type = "invalid_request_error"
    code = "bad_request"


class ValidationFailed(GatewayError):
    status = 422
    type = "invalid_request_error"
    code = "validation_error"


class ModelNotFound(GatewayError):
    status = 400
    type = "invalid_request_error"
    code = "model_not_found"


class ModelNotListed(ModelNotFound):
    status = 404


class NotFound(GatewayError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class MethodNotAllowed(GatewayError):
    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"


class PayloadTooLarge(GatewayError):
    status = 413
    type = "invalid_request_error"
    code = "payload_too_large"


class RateLimited(GatewayError):
    status = 429
    type = "rate_limit_error"
    code = "rate_limited"


class QuotaExhausted(GatewayError):
    status = 429
    type = "rate_limit_error"
    code = "subscription_limit"


class NoProviderAvailable(GatewayError):
    status = 503
    type = "server_error"
    code = "no_provider_available"


class UpstreamUnavailable(GatewayError):
    status = 502
    type = "server_error"
    code = "upstream_unavailable"


class UpstreamTimeout(GatewayError):
    status = 504
    type = "server_error"
    code = "upstream_timeout"


class UpstreamDisconnected(GatewayError):
    status = 502
    type = "server_error"
    code = "upstream_disconnected"


class UpstreamResponseTooLarge(GatewayError):
    status = 502
    type = "server_error"
    code = "upstream_response_too_large"


class UriTooLong(GatewayError):
    status = 414
    type = "invalid_request_error"
    code = "uri_too_long"


class HeaderTooLarge(GatewayError):
    status = 431
    type = "invalid_request_error"
    code = "header_too_large"


class RequestTimeout(GatewayError):
    status = 408
    type = "invalid_request_error"
    code = "request_timeout"


class UpgradeRequired(GatewayError):
    status = 426
    type = "invalid_request_error"
    code = "upgrade_required"


class Overloaded(GatewayError):
    status = 503
    type = "server_error"
    code = "overloaded"


class ApiNotSupported(GatewayError):
    status = 400
    type = "invalid_request_error"
    code = "api_not_supported"


class ResponseNotFound(GatewayError):
    status = 404
    type = "invalid_request_error"
    code = "response_not_found"


class StateUnavailable(GatewayError):
    """`--state redis://` with `--state-fail closed` and Redis unreachable."""

    status = 503
    type = "server_error"
    code = "state_unavailable"


class ClientLeft(GatewayError):
    """Not sent to anyone: a trace's error.type for a request its client abandoned."""

    status = 499
    code = "client_gone"


class MisdirectedRequest(GatewayError):
    """The keyless loopback sidecar asked under a Host it is not (DNS rebinding)."""

    status = 421
    type = "invalid_request_error"
    code = "misdirected_request"


class ForbiddenOrigin(GatewayError):
    """The keyless loopback sidecar asked by a web page of another origin."""

    status = 403
    type = "invalid_request_error"
    code = "forbidden_origin"


class UnsupportedMediaType(GatewayError):
    status = 415
    type = "invalid_request_error"
    code = "unsupported_media_type"


class VersionNotSupported(GatewayError):
    status = 505
    type = "invalid_request_error"
    code = "http_version_not_supported"


class NotImplementedByGateway(GatewayError):
    """A request framing the gateway does not implement (a Transfer-Encoding other than
    chunked), answered 501 as nginx does."""

    status = 501
    type = "invalid_request_error"
    code = "not_implemented"

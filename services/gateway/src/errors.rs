//! The one mapping of a gRPC status to an HTTP answer: the status code the public clients
//! expect, the body they parse, and whether a retry can help.

use axum::response::{IntoResponse, Response};
use http::{HeaderValue, StatusCode};
use tonic::{Code, Status};
use tonic_types::StatusExt as _;

/// Which body an error gets: the control plane's (google.rpc style, the whole body is the
/// error) or the OpenAI style of the inference routes (`{"error": {…}}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Style {
    Control,
    Inference,
}

/// An error on its way to an HTTP caller.
#[derive(Debug)]
pub struct ApiError {
    pub status: Status,
    pub style: Style,
}

impl ApiError {
    pub fn new(status: Status, style: Style) -> Self {
        Self { status, style }
    }

    pub fn invalid(field: &str, reason: impl std::fmt::Display, style: Style) -> Self {
        Self::new(
            kiln_core::Error::invalid(field, reason.to_string()).into(),
            style,
        )
    }
}

/// The HTTP status of a gRPC code.
pub fn http_status(code: Code) -> StatusCode {
    match code {
        Code::Ok => StatusCode::OK,
        Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => {
            StatusCode::BAD_REQUEST
        }
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::AlreadyExists | Code::Aborted => StatusCode::CONFLICT,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Code::Cancelled => StatusCode::from_u16(499).expect("499 is a status code"),
        Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        Code::Unknown | Code::Internal | Code::DataLoss => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// OpenAI's error `type` for a gRPC code.
fn inference_type(code: Code) -> &'static str {
    match http_status(code).as_u16() {
        400 => "invalid_request_error",
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        409 => "conflict_error",
        429 => "rate_limit_error",
        501 => "not_implemented_error",
        503 => "service_unavailable_error",
        _ => "api_error",
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = &self.status;
        let code = status.code();
        let name = kiln_core::metrics::code_name(code);
        let field = status
            .get_details_bad_request()
            .and_then(|b| b.field_violations.first().map(|v| v.field.clone()));
        let retry_after = status.get_details_retry_info().and_then(|r| r.retry_delay);
        let body = match self.style {
            Style::Control => serde_json::json!({
                "code": code as i32,
                "status": name,
                "message": status.message(),
                "details": field.iter().map(|f| serde_json::json!({
                    "@type": "type.googleapis.com/google.rpc.BadRequest",
                    "fieldViolations": [{"field": f}],
                })).collect::<Vec<_>>(),
            }),
            Style::Inference => serde_json::json!({
                "error": {
                    "message": status.message(),
                    "type": inference_type(code),
                    "code": name,
                    "param": field,
                }
            }),
        };
        let mut response = (http_status(code), axum::Json(body)).into_response();
        let headers = response.headers_mut();
        // Both public clients retry 408, 409, 429 and 5xx unless told a retry cannot help.
        let retry_helps = match code {
            Code::ResourceExhausted => retry_after.is_some(),
            Code::Unavailable | Code::DeadlineExceeded | Code::Aborted | Code::Internal => true,
            _ => false,
        };
        headers.insert(
            "x-should-retry",
            HeaderValue::from_static(if retry_helps { "true" } else { "false" }),
        );
        if let Some(delay) = retry_after {
            let millis = delay.as_millis();
            headers.insert("retry-after-ms", HeaderValue::from(millis as u64));
            headers.insert(
                "retry-after",
                HeaderValue::from(millis.div_ceil(1000) as u64),
            );
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_the_clients_know_has_its_status() {
        let expected = [
            (Code::InvalidArgument, 400),
            (Code::FailedPrecondition, 400),
            (Code::Unauthenticated, 401),
            (Code::PermissionDenied, 403),
            (Code::NotFound, 404),
            (Code::AlreadyExists, 409),
            (Code::ResourceExhausted, 429),
            (Code::Unimplemented, 501),
            (Code::Unavailable, 503),
            (Code::Internal, 500),
        ];
        for (code, http) in expected {
            assert_eq!(http_status(code).as_u16(), http, "{code:?}");
        }
    }

    #[test]
    fn a_rate_limit_says_when_to_retry_and_a_conflict_says_not_to() {
        let limited: Status = kiln_core::Error::ResourceExhausted {
            message: "rate limit".into(),
            retry_after: Some(std::time::Duration::from_millis(1500)),
        }
        .into();
        let response = ApiError::new(limited, Style::Inference).into_response();
        assert_eq!(response.status(), 429);
        assert_eq!(response.headers()["retry-after"], "2");
        assert_eq!(response.headers()["retry-after-ms"], "1500");
        assert_eq!(response.headers()["x-should-retry"], "true");

        let exists = ApiError::new(Status::already_exists("x exists"), Style::Control);
        let response = exists.into_response();
        assert_eq!(response.status(), 409);
        assert_eq!(response.headers()["x-should-retry"], "false");
    }
}

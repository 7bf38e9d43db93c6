//! The one mapping from domain errors to gRPC status codes. No wildcard arms: a new
//! error variant must be given a code here.

use crate::broker::BrokerError;
use crate::identity::IdentityError;
use crate::mint::MintError;
use crate::policy::Denied;
use tonic::{Code, Status};

/// The gRPC code for a broker error.
pub fn code(e: &BrokerError) -> Code {
    match e {
        BrokerError::Identity(IdentityError::KeysUnavailable(_)) => Code::Unavailable,
        BrokerError::Identity(
            IdentityError::Missing
            | IdentityError::Oversized(_)
            | IdentityError::Malformed(_)
            | IdentityError::Algorithm(_)
            | IdentityError::ForbiddenHeader(_)
            | IdentityError::UnknownIssuer
            | IdentityError::UnknownKey
            | IdentityError::BadSignature
            | IdentityError::Expired
            | IdentityError::NotYetValid
            | IdentityError::TooOld
            | IdentityError::Audience
            | IdentityError::Claim(_),
        ) => Code::Unauthenticated,
        BrokerError::Denied(
            Denied::DenyRule { .. }
            | Denied::NoRuleMatched { .. }
            | Denied::ScopeNotGranted { .. }
            | Denied::RoleNotGranted(_),
        ) => Code::PermissionDenied,
        BrokerError::InvalidRequest(_) => Code::InvalidArgument,
        BrokerError::UnknownTarget(_) => Code::NotFound,
        BrokerError::Mint(MintError::MissingClaim(_)) => Code::PermissionDenied,
        BrokerError::Mint(MintError::Upstream { .. }) => Code::Unavailable,
        BrokerError::Mint(MintError::Refused { .. }) => Code::PermissionDenied,
        BrokerError::Mint(MintError::Invalid(_)) => Code::InvalidArgument,
        BrokerError::Mint(MintError::Signing(_)) => Code::Internal,
        BrokerError::Mint(MintError::Unsupported { .. }) => Code::FailedPrecondition,
        BrokerError::Audit(_) | BrokerError::Store(_) => Code::Unavailable,
        BrokerError::Quota(_) | BrokerError::Replay(_) => Code::ResourceExhausted,
        BrokerError::UnknownLease => Code::NotFound,
        BrokerError::NotLeaseOwner => Code::PermissionDenied,
        BrokerError::NotRenewable(_) => Code::FailedPrecondition,
        BrokerError::Conflict => Code::Aborted,
        BrokerError::RateLimited(_) => Code::ResourceExhausted,
        BrokerError::Busy(_) => Code::Unavailable,
    }
}

/// The status for a broker error. Internal faults carry the request id as a correlation
/// id (also logged); messages never carry secrets.
pub fn to_status(e: &BrokerError, request_id: &str) -> Status {
    let c = code(e);
    let msg = match c {
        Code::Internal => format!("internal error (correlation id {request_id})"),
        _ => e.to_string(),
    };
    if c == Code::Internal {
        tracing::error!(request_id, error = %e, "internal error");
    }
    let mut s = Status::new(c, msg);
    if let BrokerError::RateLimited(x) = e {
        if let Ok(v) = x.retry_after_secs().to_string().parse() {
            s.metadata_mut().insert("retry-after", v);
        }
    }
    s
}

/// An RFC 6749 error: the HTTP status and the `error` code for a broker error, with the
/// same meaning as the gRPC code from [`code`]. No wildcard arms.
pub fn oauth(e: &BrokerError) -> (u16, &'static str) {
    match e {
        BrokerError::Identity(IdentityError::KeysUnavailable(_)) => {
            (503, "temporarily_unavailable")
        }
        BrokerError::Identity(IdentityError::Missing | IdentityError::Oversized(_)) => {
            (400, "invalid_request")
        }
        BrokerError::Identity(
            IdentityError::Malformed(_)
            | IdentityError::Algorithm(_)
            | IdentityError::ForbiddenHeader(_)
            | IdentityError::UnknownIssuer
            | IdentityError::UnknownKey
            | IdentityError::BadSignature
            | IdentityError::Expired
            | IdentityError::NotYetValid
            | IdentityError::TooOld
            | IdentityError::Audience
            | IdentityError::Claim(_),
        ) => (400, "invalid_grant"),
        BrokerError::Denied(Denied::ScopeNotGranted { .. }) => (400, "invalid_scope"),
        BrokerError::Denied(
            Denied::DenyRule { .. } | Denied::NoRuleMatched { .. } | Denied::RoleNotGranted(_),
        ) => (403, "access_denied"),
        BrokerError::InvalidRequest(_) => (400, "invalid_request"),
        BrokerError::UnknownTarget(_) => (400, "invalid_target"),
        BrokerError::Mint(MintError::MissingClaim(_)) => (403, "access_denied"),
        BrokerError::Mint(MintError::Upstream { .. }) => (503, "temporarily_unavailable"),
        BrokerError::Mint(MintError::Refused { .. }) => (403, "access_denied"),
        BrokerError::Mint(MintError::Invalid(_)) => (400, "invalid_request"),
        BrokerError::Mint(MintError::Signing(_)) => (500, "server_error"),
        BrokerError::Mint(MintError::Unsupported { .. }) => (400, "invalid_request"),
        BrokerError::Audit(_) | BrokerError::Store(_) => (503, "temporarily_unavailable"),
        BrokerError::Quota(_) => (429, "temporarily_unavailable"),
        BrokerError::Replay(_) => (400, "invalid_grant"),
        BrokerError::UnknownLease | BrokerError::NotRenewable(_) => (400, "invalid_request"),
        BrokerError::NotLeaseOwner => (403, "access_denied"),
        BrokerError::Conflict => (503, "temporarily_unavailable"),
        BrokerError::RateLimited(_) => (429, "temporarily_unavailable"),
        BrokerError::Busy(_) => (503, "temporarily_unavailable"),
    }
}

/// The `error_description` for a broker error: the same stable message as the gRPC
/// status, with a correlation id instead of detail for internal faults.
pub fn description(e: &BrokerError, request_id: &str) -> String {
    to_status(e, request_id).message().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::StoreError;

    #[test]
    fn codes_follow_the_contract() {
        assert_eq!(code(&IdentityError::Expired.into()), Code::Unauthenticated);
        assert_eq!(
            code(&IdentityError::KeysUnavailable("x".into()).into()),
            Code::Unavailable
        );
        assert_eq!(
            code(&Denied::RoleNotGranted("admin").into()),
            Code::PermissionDenied
        );
        assert_eq!(
            code(&BrokerError::UnknownTarget("t".into())),
            Code::NotFound
        );
        assert_eq!(
            code(&BrokerError::InvalidRequest("x".into())),
            Code::InvalidArgument
        );
        assert_eq!(
            code(&BrokerError::Audit(StoreError::Unavailable("x".into()))),
            Code::Unavailable
        );
        assert_eq!(code(&BrokerError::Quota(3)), Code::ResourceExhausted);
        assert_eq!(code(&BrokerError::Replay(1)), Code::ResourceExhausted);
        assert_eq!(code(&BrokerError::UnknownLease), Code::NotFound);
        assert_eq!(code(&BrokerError::NotLeaseOwner), Code::PermissionDenied);
        assert_eq!(
            code(&BrokerError::NotRenewable("x".into())),
            Code::FailedPrecondition
        );
        assert_eq!(code(&BrokerError::Conflict), Code::Aborted);
        let s = to_status(&MintError::Signing("t".into()).into(), "req-1");
        assert_eq!(s.code(), Code::Internal);
        assert!(s.message().contains("req-1"));
    }

    #[test]
    fn oauth_errors_follow_rfc_6749_and_agree_with_grpc() {
        let cases: Vec<(BrokerError, u16, &str, Code)> = vec![
            (
                IdentityError::Missing.into(),
                400,
                "invalid_request",
                Code::Unauthenticated,
            ),
            (
                IdentityError::Expired.into(),
                400,
                "invalid_grant",
                Code::Unauthenticated,
            ),
            (
                IdentityError::KeysUnavailable("x".into()).into(),
                503,
                "temporarily_unavailable",
                Code::Unavailable,
            ),
            (
                Denied::ScopeNotGranted {
                    scope: "w".into(),
                    target: "t".into(),
                }
                .into(),
                400,
                "invalid_scope",
                Code::PermissionDenied,
            ),
            (
                Denied::NoRuleMatched {
                    target: "t".into(),
                    hint: None,
                    names: None,
                }
                .into(),
                403,
                "access_denied",
                Code::PermissionDenied,
            ),
            (
                BrokerError::UnknownTarget("t".into()),
                400,
                "invalid_target",
                Code::NotFound,
            ),
            (
                BrokerError::InvalidRequest("x".into()),
                400,
                "invalid_request",
                Code::InvalidArgument,
            ),
            (
                BrokerError::Audit(StoreError::Unavailable("x".into())),
                503,
                "temporarily_unavailable",
                Code::Unavailable,
            ),
            (
                MintError::Upstream {
                    target: "t".into(),
                    reason: "r".into(),
                }
                .into(),
                503,
                "temporarily_unavailable",
                Code::Unavailable,
            ),
            (
                MintError::Signing("t".into()).into(),
                500,
                "server_error",
                Code::Internal,
            ),
            (
                BrokerError::Quota(1),
                429,
                "temporarily_unavailable",
                Code::ResourceExhausted,
            ),
        ];
        for (e, http, err, grpc) in cases {
            assert_eq!(oauth(&e), (http, err), "{e}");
            assert_eq!(code(&e), grpc, "{e}");
        }
        let d = description(&MintError::Signing("t".into()).into(), "req-9");
        assert!(d.contains("req-9") && !d.contains("signing failed"), "{d}");
    }
}

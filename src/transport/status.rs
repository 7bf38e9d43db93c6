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
        BrokerError::Mint(MintError::Signing(_)) => Code::Internal,
        BrokerError::Mint(MintError::Unsupported { .. }) => Code::FailedPrecondition,
        BrokerError::Audit(_) | BrokerError::Store(_) => Code::Unavailable,
        BrokerError::Quota(_) | BrokerError::Replay(_) => Code::ResourceExhausted,
        BrokerError::UnknownLease => Code::NotFound,
        BrokerError::NotLeaseOwner => Code::PermissionDenied,
        BrokerError::NotRenewable(_) => Code::FailedPrecondition,
        BrokerError::Conflict => Code::Aborted,
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
    Status::new(c, msg)
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
}

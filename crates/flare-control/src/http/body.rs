//! The one extractor of JSON request bodies: parsed, then validated, before the handler
//! runs. The raw bytes are dropped as soon as they are parsed.

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use flare_api::{
    validate_inputs, AddInputs, ApiError, CancelCall, CreateApp, CreateCall, CreateMount, DetachApp,
    RegisterFunctions, UpdateAutoscaler,
};
use serde::de::DeserializeOwned;

use super::HttpError;

/// A JSON request body the API takes.
pub(crate) trait ApiBody: DeserializeOwned {
    /// What an empty body means; `None`: an empty body is invalid.
    fn if_empty() -> Option<Self> {
        None
    }

    /// Checks of the values, after parsing.
    fn validate(&self) -> Result<(), ApiError> {
        Ok(())
    }
}

/// A parsed and validated request body.
pub(crate) struct Valid<T>(pub(crate) T);

impl<T: ApiBody, S: Send + Sync> FromRequest<S> for Valid<T> {
    type Rejection = HttpError;

    async fn from_request(req: Request, state: &S) -> Result<Self, HttpError> {
        let body = Bytes::from_request(req, state)
            .await
            .map_err(|e| HttpError(ApiError::invalid(format!("reading the request body: {e}"))))?;
        if body.is_empty() {
            if let Some(v) = T::if_empty() {
                return Ok(Valid(v));
            }
        }
        let v: T = serde_json::from_slice(&body)
            .map_err(|e| HttpError(ApiError::invalid(format!("invalid request body: {e}"))))?;
        drop(body);
        v.validate()?;
        Ok(Valid(v))
    }
}

impl ApiBody for CreateApp {
    fn validate(&self) -> Result<(), ApiError> {
        CreateApp::validate(self)
    }
}

impl ApiBody for RegisterFunctions {
    fn validate(&self) -> Result<(), ApiError> {
        RegisterFunctions::validate(self)
    }
}

impl ApiBody for CreateMount {
    fn validate(&self) -> Result<(), ApiError> {
        CreateMount::validate(self)
    }
}

impl ApiBody for CreateCall {
    fn validate(&self) -> Result<(), ApiError> {
        CreateCall::validate(self)
    }
}

impl ApiBody for AddInputs {
    fn validate(&self) -> Result<(), ApiError> {
        validate_inputs(&self.inputs)
    }
}

impl ApiBody for DetachApp {
    fn if_empty() -> Option<Self> {
        Some(DetachApp::default())
    }
}

impl ApiBody for CancelCall {
    fn if_empty() -> Option<Self> {
        Some(CancelCall::default())
    }
}

impl ApiBody for UpdateAutoscaler {
    fn if_empty() -> Option<Self> {
        Some(UpdateAutoscaler::default())
    }
}

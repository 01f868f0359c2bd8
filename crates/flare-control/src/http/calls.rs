//! Calls: create (with the first inputs), more inputs with back-pressure, outputs by
//! long-poll, cancel, inspect.

use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::Json;
use flare_api::*;
use tokio::time::Instant;

use super::body::Valid;
use super::routes::Route;
use super::{caller, CallerExt, HttpError, MAX_WAIT, R};
use crate::ControlPlane;

pub(super) fn routes() -> Vec<Route> {
    vec![
        Route::post("/v1/functions/{function_id}/calls", create_call).container(),
        Route::get("/v1/calls/{call_id}", call_info).container(),
        Route::post("/v1/calls/{call_id}/inputs", add_inputs).container(),
        Route::get("/v1/calls/{call_id}/outputs", outputs).container(),
        Route::post("/v1/calls/{call_id}/cancel", cancel_call).container(),
    ]
}

/// Waits until the call has outputs after `after`, is done, or the deadline passes.
async fn wait_outputs(
    cp: &ControlPlane,
    call_id: &str,
    after: i64,
    wait: Duration,
    limit: usize,
) -> Result<(Vec<Output>, bool), HttpError> {
    let deadline = Instant::now() + wait.min(MAX_WAIT);
    loop {
        let (outs, done, mut rx) = cp.outputs(call_id, after, limit)?;
        if !outs.is_empty() || done || Instant::now() >= deadline {
            return Ok((outs, done));
        }
        match tokio::time::timeout_at(deadline, rx.changed()).await {
            Ok(Ok(())) | Err(_) => continue,
            Ok(Err(_)) => return Ok((outs, done)),
        }
    }
}

async fn create_call(
    State(cp): State<ControlPlane>,
    who: CallerExt,
    Path(fid): Path<String>,
    Valid(req): Valid<CreateCall>,
) -> R<CallCreated> {
    let inputs = req.inputs.into_iter().map(|i| i.args.0).collect();
    let ((call_id, _rx), ticket) = cp.create_call_queued(&caller(who), &fid, req.kind, inputs, req.more)?;
    if let Some(t) = ticket {
        t.wait().await?;
    }
    let (outputs, done) = if req.wait_ms > 0 {
        wait_outputs(&cp, &call_id, -1, Duration::from_millis(req.wait_ms), 10_000).await?
    } else {
        (Vec::new(), false)
    };
    let log_seq = if outputs.is_empty() { -1 } else { cp.log_position(&call_id) };
    Ok(Json(CallCreated { call_id, outputs, done, log_seq }))
}

async fn add_inputs(
    State(cp): State<ControlPlane>,
    who: CallerExt,
    Path(call_id): Path<String>,
    Valid(req): Valid<AddInputs>,
) -> R<InputsAdded> {
    cp.check_call_access(&caller(who), &call_id)?;
    let mut inputs: Vec<Bytes> = req.inputs.into_iter().map(|i| i.args.0).collect();
    // Back-pressure: while the caller has not read enough outputs, the inputs wait here
    // (at most BACKPRESSURE_WAIT, then the client is told to send them again).
    let deadline = Instant::now() + crate::BACKPRESSURE_WAIT;
    loop {
        let (admitted, ticket) = cp.try_add_inputs_queued(&call_id, inputs, req.more)?;
        if let Some(t) = ticket {
            t.wait().await?;
        }
        match admitted {
            Ok((first_idx, count)) => return Ok(Json(InputsAdded { first_idx, count })),
            Err((back, mut no_room)) => {
                inputs = back;
                if tokio::time::timeout_at(deadline, no_room.room.changed()).await.is_err() {
                    return Err(ApiError::exhausted(format!(
                        "call {call_id} has {} inputs whose outputs were not read yet (the limit is {}): read outputs, then send these inputs again",
                        no_room.unconsumed, no_room.window
                    ))
                    .into());
                }
            }
        }
    }
}

async fn outputs(
    State(cp): State<ControlPlane>,
    who: CallerExt,
    Path(call_id): Path<String>,
    Query(q): Query<PollQuery>,
) -> R<OutputsPage> {
    cp.check_call_access(&caller(who), &call_id)?;
    let limit = q.limit.unwrap_or(10_000).clamp(1, 100_000);
    let (outputs, done) =
        wait_outputs(&cp, &call_id, q.after, Duration::from_millis(q.wait_ms), limit).await?;
    let next = outputs.last().map(|o| o.seq as i64).unwrap_or(q.after);
    let log_seq = if outputs.is_empty() { -1 } else { cp.log_position(&call_id) };
    Ok(Json(OutputsPage { outputs, next, done, log_seq }))
}

async fn cancel_call(
    State(cp): State<ControlPlane>,
    who: CallerExt,
    Path(call_id): Path<String>,
    Valid(req): Valid<CancelCall>,
) -> R<Empty> {
    cp.check_call_access(&caller(who), &call_id)?;
    cp.cancel_call(&call_id, req.terminate_containers)?;
    Ok(Json(Empty {}))
}

async fn call_info(
    State(cp): State<ControlPlane>,
    who: CallerExt,
    Path(call_id): Path<String>,
) -> R<CallInfo> {
    cp.check_call_access(&caller(who), &call_id)?;
    Ok(Json(cp.call_info(&call_id)?))
}

//! Functions: registration, look-up, stats, autoscaler settings.

use axum::extract::{Path, State};
use axum::Json;
use flare_api::*;

use super::body::Valid;
use super::routes::Route;
use super::{caller, CallerExt, R};
use crate::{AppRef, ControlPlane};

pub(super) fn routes() -> Vec<Route> {
    vec![
        Route::post("/v1/apps/{app_id}/functions", register_functions),
        Route::get("/v1/apps/{app_id}/functions/{name}", function_by_app_id).container(),
        Route::get("/v1/apps/by-name/{app_name}/functions/{name}", function_by_app_name).container(),
        Route::get("/v1/functions/{function_id}/stats", function_stats).container(),
        Route::post("/v1/functions/{function_id}/autoscaler", update_autoscaler),
    ]
}

async fn register_functions(
    State(cp): State<ControlPlane>,
    Path(app_id): Path<String>,
    Valid(req): Valid<RegisterFunctions>,
) -> R<FunctionsRegistered> {
    let (done, ticket) = cp.register_functions_queued(&app_id, req.functions)?;
    ticket.wait().await?;
    let functions = done
        .into_iter()
        .map(|(name, function_id)| {
            let (web_url, web_urls) = cp.web_urls(&function_id);
            FunctionRef { name, function_id, web_url, web_urls }
        })
        .collect();
    Ok(Json(FunctionsRegistered { functions }))
}

async fn function_by_app_id(
    State(cp): State<ControlPlane>,
    who: CallerExt,
    Path((app_id, name)): Path<(String, String)>,
) -> R<FunctionInfo> {
    cp.check_app_access(&caller(who), &app_id)?;
    Ok(Json(cp.function_info(AppRef::Id(&app_id), &name)?))
}

async fn function_by_app_name(
    State(cp): State<ControlPlane>,
    Path((name, fname)): Path<(String, String)>,
) -> R<FunctionInfo> {
    Ok(Json(cp.function_info(AppRef::DeployedName(&name), &fname)?))
}

async fn function_stats(
    State(cp): State<ControlPlane>,
    who: CallerExt,
    Path(fid): Path<String>,
) -> R<FunctionStats> {
    cp.check_function_access(&caller(who), &fid)?;
    Ok(Json(cp.function_stats(&fid)?))
}

async fn update_autoscaler(
    State(cp): State<ControlPlane>,
    Path(fid): Path<String>,
    Valid(req): Valid<UpdateAutoscaler>,
) -> R<Empty> {
    cp.update_autoscaler_queued(&fid, req)?.wait().await?;
    Ok(Json(Empty {}))
}

//! Apps as the control plane holds them: typed mode and state, converted to the store's
//! rows only at its boundary.

use flare_api::AppMode;
use flare_store::AppRow;

/// Where an app is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AppState {
    /// An ephemeral app whose client is there (`flare run`).
    Running,
    /// An ephemeral app whose client may leave (`flare run --detach`): it keeps running
    /// without heartbeats and stops once its client left and no work is left.
    Detached,
    /// A deployed app (`flare deploy`).
    Deployed,
    /// Stopped: takes no inputs; leaves memory once its containers exited.
    Stopped,
}

impl AppState {
    pub fn as_str(self) -> &'static str {
        match self {
            AppState::Running => "running",
            AppState::Detached => "detached",
            AppState::Deployed => "deployed",
            AppState::Stopped => "stopped",
        }
    }

    pub(crate) fn parse(s: &str) -> Option<Self> {
        match s {
            "running" => Some(AppState::Running),
            "detached" => Some(AppState::Detached),
            "deployed" => Some(AppState::Deployed),
            "stopped" => Some(AppState::Stopped),
            _ => None,
        }
    }

    /// The state a new app of `mode` starts in.
    pub(crate) fn initial(mode: AppMode) -> Self {
        match mode {
            AppMode::Deployed => AppState::Deployed,
            AppMode::Ephemeral => AppState::Running,
        }
    }
}

pub(crate) fn parse_mode(s: &str) -> AppMode {
    if s == AppMode::Deployed.as_str() {
        AppMode::Deployed
    } else {
        AppMode::Ephemeral
    }
}

/// An app's record.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct AppRecord {
    pub(crate) app_id: String,
    pub(crate) name: String,
    pub(crate) mode: AppMode,
    pub(crate) state: AppState,
    pub(crate) version: i64,
    pub(crate) created_at: f64,
}

impl AppRecord {
    pub(crate) fn from_row(row: &AppRow) -> Self {
        let state = AppState::parse(&row.state).unwrap_or_else(|| {
            tracing::warn!(app = %row.app_id, state = %row.state, "unknown app state in the store; taken as stopped");
            AppState::Stopped
        });
        AppRecord {
            app_id: row.app_id.clone(),
            name: row.name.clone(),
            mode: parse_mode(&row.mode),
            state,
            version: row.version,
            created_at: row.created_at,
        }
    }

    pub(crate) fn to_row(&self) -> AppRow {
        AppRow {
            app_id: self.app_id.clone(),
            name: self.name.clone(),
            mode: self.mode.as_str().to_string(),
            state: self.state.as_str().to_string(),
            version: self.version,
            created_at: self.created_at,
        }
    }

    pub(crate) fn stopped(&self) -> bool {
        self.state == AppState::Stopped
    }

    /// A deployed app that is not stopped, named `name`: what deploys and look-ups by name find.
    pub(crate) fn is_live_deployed(&self, name: &str) -> bool {
        self.name == name && self.mode == AppMode::Deployed && !self.stopped()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_round_trip() {
        for (mode, state) in [
            (AppMode::Ephemeral, AppState::Running),
            (AppMode::Ephemeral, AppState::Detached),
            (AppMode::Deployed, AppState::Deployed),
            (AppMode::Deployed, AppState::Stopped),
        ] {
            let r = AppRecord {
                app_id: "ap-1".into(),
                name: "a".into(),
                mode,
                state,
                version: 3,
                created_at: 1.5,
            };
            assert_eq!(AppRecord::from_row(&r.to_row()), r);
        }
        assert_eq!(AppState::initial(AppMode::Deployed), AppState::Deployed);
        assert_eq!(AppState::initial(AppMode::Ephemeral), AppState::Running);
    }
}

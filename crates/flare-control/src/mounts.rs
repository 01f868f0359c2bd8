//! Code mounts: uploaded files stored under `home/mounts/<id>`.

use bytes::Bytes;
use flare_api::ApiError;
use flare_proto::B64;

use crate::{new_id, now_ts, store_err, ApiResult, ControlPlane};

impl ControlPlane {
    /// Stores a mount's files under `home/mounts/<id>`; identical uploads share one id.
    pub fn create_mount(&self, files: Vec<flare_api::MountFile>) -> ApiResult<String> {
        // The API checked the request as received; this is what gets written (a file list's
        // files included), checked again before anything of it is.
        flare_api::validate_file_list(
            files
                .iter()
                .map(|f| flare_api::ListEntry { path: &f.path, kind: flare_api::ListEntryKind::File }),
        )?;
        let mut sorted: Vec<&flare_api::MountFile> = files.iter().collect();
        sorted.sort_by(|a, b| a.path.cmp(&b.path));
        // The id is the server's own (clients only pass it back): BLAKE3, like the rest of
        // the content addressing, over each file's path, mode and contents.
        let mut h = flare_cas::Hasher::new();
        for f in &sorted {
            h.update(&(f.path.len() as u64).to_le_bytes());
            h.update(f.path.as_bytes());
            h.update(&f.mode.to_le_bytes());
            h.update(&(f.data.0.len() as u64).to_le_bytes());
            h.update(&f.data.0);
        }
        let id = format!("mo-{}", &h.finalize().hex()[..32]);
        let dir = self.mounts_dir().join(&id);
        if dir.is_dir() {
            return Ok(id);
        }
        let tmp = self.mounts_dir().join(format!(".tmp-{}", new_id("m")));
        let write = || flare_api::write_mount_dir(&dir, &tmp, sorted.iter().copied());
        write().map_err(|e| ApiError::internal(format!("could not store mount: {e}")))?;
        self.store().put_mount(&id, now_ts()).map_err(store_err)?;
        Ok(id)
    }

    /// The files of a mount (workers on other machines fetch mounts with this).
    pub fn read_mount(&self, mount_id: &str) -> ApiResult<Vec<flare_api::MountFile>> {
        use std::os::unix::fs::PermissionsExt;
        if flare_api::validate_relative_path(mount_id).is_err() || mount_id.contains('/') {
            return Err(ApiError::invalid(format!("invalid mount id {mount_id:?}")));
        }
        let root = self.mounts_dir().join(mount_id);
        if !root.is_dir() {
            return Err(ApiError::not_found(format!("mount {mount_id} not found")));
        }
        let mut files = Vec::new();
        let mut stack = vec![root.clone()];
        while let Some(dir) = stack.pop() {
            let rd =
                std::fs::read_dir(&dir).map_err(|e| ApiError::internal(format!("reading mount: {e}")))?;
            for e in rd.flatten() {
                let p = e.path();
                let Ok(meta) = std::fs::symlink_metadata(&p) else { continue };
                if meta.is_dir() {
                    stack.push(p);
                } else if meta.is_file() {
                    let rel = p.strip_prefix(&root).expect("under root").to_string_lossy().into_owned();
                    let data =
                        std::fs::read(&p).map_err(|e| ApiError::internal(format!("reading mount: {e}")))?;
                    files.push(flare_api::MountFile {
                        path: rel,
                        data: B64(Bytes::from(data)),
                        mode: meta.permissions().mode() & 0o777,
                    });
                }
            }
        }
        files.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(files)
    }
}

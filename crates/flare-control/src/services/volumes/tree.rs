//! The pure part of volumes: paths inside a volume, listing a tree, and applying one
//! commit's changes to the latest manifest, file by file.
//!
//! A commit is applied onto the volume's *latest* version, not onto the version its
//! writer started from: each put, remove and copy touches only its own paths, so two
//! writers of different files both keep theirs, and of two commits of the same file the
//! one applied later wins. Within one commit the removes come first, then the copies,
//! then the puts. A commit is all or nothing: the first failing change fails it and the
//! tree stays as it was.

use flare_cas::{normalize_path, Entry, EntryKind, FileContent, Manifest};

/// Why a change cannot be applied (or a path is refused).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TreeError {
    InvalidPath { path: String, reason: String },
    NotFound(String),
    Exists(String),
    NotADirectory(String),
    IsADirectory(String),
    NotEmpty(String),
    Invalid(String),
}

impl std::fmt::Display for TreeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TreeError::InvalidPath { path, reason } => write!(f, "invalid volume path {path:?}: {reason}"),
            TreeError::NotFound(p) => write!(f, "no file or directory /{p} in the volume"),
            TreeError::Exists(p) => {
                write!(f, "/{p} already exists in the volume (upload with force=True to replace it)")
            }
            TreeError::NotADirectory(p) => write!(f, "/{p} is not a directory"),
            TreeError::IsADirectory(p) => write!(f, "/{p} is a directory"),
            TreeError::NotEmpty(p) => {
                write!(f, "/{p} is a non-empty directory (remove it with recursive=True)")
            }
            TreeError::Invalid(m) => f.write_str(m),
        }
    }
}

/// Longest path in a volume.
pub const MAX_PATH_LEN: usize = 4096;

/// A path in a volume, as the manifest keys it: leading slashes dropped (`/a/b` and
/// `a/b` are the same file), `.` and empty components dropped; `..`, NUL bytes and
/// over-long paths refused. The root is `""` and only allowed where `root_ok`.
pub fn volume_path(path: &str, root_ok: bool) -> Result<String, TreeError> {
    let bad = |reason: &str| TreeError::InvalidPath { path: path.to_owned(), reason: reason.to_owned() };
    if path.len() > MAX_PATH_LEN {
        return Err(bad("too long"));
    }
    let rel = path.trim_start_matches('/');
    if rel.split('/').all(|c| c.is_empty() || c == ".") && !rel.contains('\0') {
        return if root_ok { Ok(String::new()) } else { Err(bad("the volume's root is not a file")) };
    }
    normalize_path(rel).map_err(|e| match e {
        flare_cas::CasError::InvalidPath { reason, .. } => bad(&reason),
        other => bad(&other.to_string()),
    })
}

fn join(dir: &str, name: &str) -> String {
    if dir.is_empty() {
        name.to_owned()
    } else {
        format!("{dir}/{name}")
    }
}

fn basename(path: &str) -> &str {
    path.rsplit_once('/').map(|(_, n)| n).unwrap_or(path)
}

/// The entries strictly below `dir` (`""`: all), in path order.
fn below<'a>(m: &'a Manifest, dir: &str) -> Box<dyn Iterator<Item = (&'a String, &'a Entry)> + 'a> {
    if dir.is_empty() {
        return Box::new(m.entries.iter());
    }
    let prefix = format!("{dir}/");
    Box::new(m.entries.range(prefix.clone()..).take_while(move |(k, _)| k.starts_with(&prefix)))
}

/// What `listdir(path, recursive)` lists: the file itself for a file; the entries of a
/// directory (all of them below it with `recursive`).
pub fn list<'a>(
    m: &'a Manifest,
    path: &str,
    recursive: bool,
) -> Result<Vec<(&'a str, &'a Entry)>, TreeError> {
    if !path.is_empty() {
        match m.entries.get_key_value(path) {
            None => return Err(TreeError::NotFound(path.to_owned())),
            Some((k, e)) if !e.is_dir() => return Ok(vec![(k.as_str(), e)]),
            Some(_) => {}
        }
    }
    let depth = if path.is_empty() { 0 } else { path.len() + 1 };
    Ok(below(m, path)
        .filter(|(k, _)| recursive || !k[depth..].contains('/'))
        .map(|(k, e)| (k.as_str(), e))
        .collect())
}

/// A file to write: its normalized path and what it becomes.
#[derive(Debug, Clone)]
pub struct Put {
    pub path: String,
    pub mode: u32,
    pub mtime: i64,
    pub content: FileContent,
}

/// A file or directory to remove.
#[derive(Debug, Clone)]
pub struct Remove {
    pub path: String,
    pub recursive: bool,
}

/// `cp [-r] src... dst` inside the volume.
#[derive(Debug, Clone)]
pub struct Copy {
    pub src_paths: Vec<String>,
    pub dst_path: String,
    pub recursive: bool,
}

/// One commit's changes (paths normalized with [`volume_path`]).
#[derive(Debug, Clone, Default)]
pub struct Changes {
    pub removes: Vec<Remove>,
    pub copies: Vec<Copy>,
    pub puts: Vec<Put>,
    /// Puts replace existing files (else an existing file fails the commit).
    pub force: bool,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        self.removes.is_empty() && self.copies.is_empty() && self.puts.is_empty()
    }
}

/// Make every ancestor of `path` a directory (new ones mode 0755, mtime `now`).
fn ensure_dirs(m: &mut Manifest, path: &str, now: i64) -> Result<(), TreeError> {
    for (i, _) in path.match_indices('/') {
        let dir = &path[..i];
        match m.entries.get(dir) {
            Some(e) if e.is_dir() => {}
            Some(_) => return Err(TreeError::NotADirectory(dir.to_owned())),
            None => {
                m.entries.insert(dir.to_owned(), Entry { mtime: now, ..Entry::dir(0o755) });
            }
        }
    }
    Ok(())
}

fn is_dir_path(m: &Manifest, path: &str) -> bool {
    path.is_empty() || m.entries.get(path).is_some_and(Entry::is_dir)
}

/// Apply `changes` to `m` (see the module docs). On error `m` may be partly changed:
/// callers apply to a copy.
pub fn apply(m: &mut Manifest, changes: &Changes, now: i64) -> Result<(), TreeError> {
    for r in &changes.removes {
        if r.path.is_empty() {
            if !r.recursive && !m.entries.is_empty() {
                return Err(TreeError::Invalid(
                    "the volume's root is not empty (remove it with recursive=True)".into(),
                ));
            }
            m.entries.clear();
            continue;
        }
        let Some(e) = m.entries.get(&r.path) else { return Err(TreeError::NotFound(r.path.clone())) };
        if e.is_dir() && !r.recursive && below(m, &r.path).next().is_some() {
            return Err(TreeError::NotEmpty(r.path.clone()));
        }
        m.remove_tree(&r.path);
    }
    for c in &changes.copies {
        let into = is_dir_path(m, &c.dst_path);
        if c.src_paths.len() > 1 && !into {
            return Err(TreeError::NotADirectory(c.dst_path.clone()));
        }
        for src in &c.src_paths {
            if src.is_empty() {
                return Err(TreeError::Invalid("cannot copy the volume's root".into()));
            }
            let Some(e) = m.entries.get(src).cloned() else { return Err(TreeError::NotFound(src.clone())) };
            let target = if into { join(&c.dst_path, basename(src)) } else { c.dst_path.clone() };
            if target == *src || target.starts_with(&format!("{src}/")) {
                return Err(TreeError::Invalid(format!("cannot copy /{src} into itself (/{target})")));
            }
            if e.is_dir() {
                if !c.recursive {
                    return Err(TreeError::IsADirectory(src.clone()));
                }
                if m.entries.get(&target).is_some_and(|t| !t.is_dir()) {
                    return Err(TreeError::NotADirectory(target));
                }
                let subtree: Vec<(String, Entry)> =
                    below(m, src).map(|(k, v)| (format!("{target}{}", &k[src.len()..]), v.clone())).collect();
                ensure_dirs(m, &target, now)?;
                m.entries.insert(target.clone(), e);
                for (k, v) in subtree {
                    if m.entries.get(&k).is_some_and(|t| t.is_dir() != v.is_dir()) {
                        m.remove_tree(&k);
                    }
                    m.entries.insert(k, v);
                }
            } else {
                if is_dir_path(m, &target) {
                    return Err(TreeError::IsADirectory(target));
                }
                ensure_dirs(m, &target, now)?;
                m.entries.insert(target, e);
            }
        }
    }
    for p in &changes.puts {
        if p.path.is_empty() {
            return Err(TreeError::Invalid("the volume's root is not a file".into()));
        }
        match m.entries.get(&p.path) {
            Some(e) if e.is_dir() => return Err(TreeError::IsADirectory(p.path.clone())),
            Some(_) if !changes.force => return Err(TreeError::Exists(p.path.clone())),
            _ => {}
        }
        ensure_dirs(m, &p.path, now)?;
        let entry = Entry { mtime: p.mtime, ..Entry::file(p.content.clone(), p.mode & 0o7777) };
        m.entries.insert(p.path.clone(), entry);
    }
    Ok(())
}

/// A listed entry's size: a file's length, a symlink's target length, 0 for a directory.
pub fn entry_size(e: &Entry) -> u64 {
    match &e.kind {
        EntryKind::File(c) => c.size,
        EntryKind::Symlink { target } => target.len() as u64,
        EntryKind::Dir => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flare_cas::{Chunk, Digest};

    fn content(data: &[u8]) -> FileContent {
        let d = Digest::of(data);
        FileContent {
            size: data.len() as u64,
            chunks: vec![Chunk { digest: d, offset: 0, len: data.len() as u64 }],
        }
    }

    fn put(path: &str, data: &[u8]) -> Put {
        Put { path: volume_path(path, false).unwrap(), mode: 0o644, mtime: 7, content: content(data) }
    }

    fn puts(ps: Vec<Put>) -> Changes {
        Changes { puts: ps, force: true, ..Changes::default() }
    }

    fn keys(m: &Manifest) -> Vec<&str> {
        m.entries.keys().map(String::as_str).collect()
    }

    fn data_of(m: &Manifest, p: &str) -> Digest {
        match &m.get(p).unwrap().kind {
            EntryKind::File(c) => c.chunks[0].digest,
            k => panic!("{p} is {k:?}"),
        }
    }

    #[test]
    fn paths_are_normalized_and_escapes_refused() {
        assert_eq!(volume_path("/a//b/./c", false).unwrap(), "a/b/c");
        assert_eq!(volume_path("a/b", false).unwrap(), "a/b");
        assert_eq!(volume_path("/", true).unwrap(), "");
        assert_eq!(volume_path("", true).unwrap(), "");
        assert!(volume_path("/", false).is_err());
        for bad in ["../x", "/a/../../b", "a/..", "a\0b", "..", "/..//x"] {
            assert!(matches!(volume_path(bad, true), Err(TreeError::InvalidPath { .. })), "{bad:?}");
        }
        assert!(volume_path(&"a".repeat(MAX_PATH_LEN + 1), false).is_err());
    }

    #[test]
    fn puts_create_parents_and_merge_per_file() {
        let mut m = Manifest::new();
        apply(&mut m, &puts(vec![put("/x/y/a.txt", b"a"), put("b", b"b")]), 1).unwrap();
        assert_eq!(keys(&m), ["b", "x", "x/y", "x/y/a.txt"]);
        assert!(m.get("x/y").unwrap().is_dir());
        // Two writers who started from the same base: each one's file survives.
        let base = m.clone();
        let mut latest = base.clone();
        apply(&mut latest, &puts(vec![put("one", b"1")]), 2).unwrap();
        apply(&mut latest, &puts(vec![put("two", b"2")]), 3).unwrap();
        assert!(latest.get("one").is_some() && latest.get("two").is_some());
        // The same file twice: the later commit wins.
        apply(&mut latest, &puts(vec![put("same", b"first")]), 4).unwrap();
        apply(&mut latest, &puts(vec![put("same", b"second")]), 5).unwrap();
        assert_eq!(data_of(&latest, "same"), Digest::of(b"second"));
        // Without force an existing file fails the commit.
        let c = Changes { puts: vec![put("same", b"third")], ..Changes::default() };
        assert_eq!(apply(&mut latest.clone(), &c, 6), Err(TreeError::Exists("same".into())));
        // A file where a directory is needed, a directory where a file would go.
        assert_eq!(
            apply(&mut latest.clone(), &puts(vec![put("b/c", b"")]), 6),
            Err(TreeError::NotADirectory("b".into()))
        );
        assert_eq!(
            apply(&mut latest.clone(), &puts(vec![put("x/y", b"")]), 6),
            Err(TreeError::IsADirectory("x/y".into()))
        );
        assert_eq!(m.get("b").unwrap().mtime, 7);
    }

    #[test]
    fn removes_files_and_directories() {
        let mut m = Manifest::new();
        apply(&mut m, &puts(vec![put("d/e/f", b"f"), put("d/g", b"g"), put("h", b"h")]), 1).unwrap();
        let rm = |p: &str, recursive: bool| Changes {
            removes: vec![Remove { path: volume_path(p, true).unwrap(), recursive }],
            ..Changes::default()
        };
        assert_eq!(apply(&mut m.clone(), &rm("nope", false), 2), Err(TreeError::NotFound("nope".into())));
        assert_eq!(apply(&mut m.clone(), &rm("d", false), 2), Err(TreeError::NotEmpty("d".into())));
        let mut a = m.clone();
        apply(&mut a, &rm("/d/g", false), 2).unwrap();
        assert_eq!(keys(&a), ["d", "d/e", "d/e/f", "h"]);
        apply(&mut a, &rm("d", true), 2).unwrap();
        assert_eq!(keys(&a), ["h"]);
        let mut b = m.clone();
        apply(&mut b, &rm("/", true), 2).unwrap();
        assert!(b.entries.is_empty());
        // Removes come before puts in one commit.
        let mut c = m.clone();
        let both = Changes {
            removes: vec![Remove { path: "h".into(), recursive: false }],
            puts: vec![put("h", b"new")],
            ..Changes::default()
        };
        apply(&mut c, &both, 3).unwrap();
        assert_eq!(data_of(&c, "h"), Digest::of(b"new"));
    }

    #[test]
    fn copies_like_cp() {
        let mut m = Manifest::new();
        apply(
            &mut m,
            &puts(vec![put("a", b"a"), put("b", b"b"), put("dir/x", b"x"), put("dir/sub/y", b"y")]),
            1,
        )
        .unwrap();
        let cp = |srcs: &[&str], dst: &str, recursive: bool| Changes {
            copies: vec![Copy {
                src_paths: srcs.iter().map(|s| volume_path(s, false).unwrap()).collect(),
                dst_path: volume_path(dst, true).unwrap(),
                recursive,
            }],
            ..Changes::default()
        };
        // A file to a new name, and into an existing directory.
        let mut t = m.clone();
        apply(&mut t, &cp(&["a"], "/new/a2", false), 2).unwrap();
        assert_eq!(data_of(&t, "new/a2"), Digest::of(b"a"));
        assert!(t.get("new").unwrap().is_dir());
        apply(&mut t, &cp(&["a", "b"], "dir", false), 2).unwrap();
        assert_eq!((data_of(&t, "dir/a"), data_of(&t, "dir/b")), (Digest::of(b"a"), Digest::of(b"b")));
        assert_eq!(data_of(&t, "a"), Digest::of(b"a"), "the source stays");
        // Several sources need a directory; a directory needs recursive.
        assert_eq!(
            apply(&mut m.clone(), &cp(&["a", "b"], "zz", false), 2),
            Err(TreeError::NotADirectory("zz".into()))
        );
        assert_eq!(
            apply(&mut m.clone(), &cp(&["dir"], "d2", false), 2),
            Err(TreeError::IsADirectory("dir".into()))
        );
        assert_eq!(
            apply(&mut m.clone(), &cp(&["missing"], "d2", false), 2),
            Err(TreeError::NotFound("missing".into()))
        );
        assert!(matches!(
            apply(&mut m.clone(), &cp(&["dir"], "dir/sub", true), 2),
            Err(TreeError::Invalid(_))
        ));
        let mut r = m.clone();
        apply(&mut r, &cp(&["dir"], "d2", true), 2).unwrap();
        assert_eq!(data_of(&r, "d2/sub/y"), Digest::of(b"y"));
        assert!(r.get("d2/sub").unwrap().is_dir());
        // Into the root.
        let mut root = m.clone();
        apply(&mut root, &cp(&["dir/x"], "/", false), 2).unwrap();
        assert_eq!(data_of(&root, "x"), Digest::of(b"x"));
    }

    #[test]
    fn lists_one_level_or_all() {
        let mut m = Manifest::new();
        apply(&mut m, &puts(vec![put("a", b"a"), put("d/x", b"x"), put("d/s/y", b"y"), put("dd", b"z")]), 1)
            .unwrap();
        let names =
            |p: &str, r: bool| list(&m, p, r).unwrap().into_iter().map(|(k, _)| k).collect::<Vec<_>>();
        assert_eq!(names("", false), ["a", "d", "dd"]);
        assert_eq!(names("", true), ["a", "d", "d/s", "d/s/y", "d/x", "dd"]);
        assert_eq!(names("d", false), ["d/s", "d/x"]);
        assert_eq!(names("d", true), ["d/s", "d/s/y", "d/x"]);
        assert_eq!(names("d/x", false), ["d/x"]);
        assert_eq!(list(&m, "nope", false).unwrap_err(), TreeError::NotFound("nope".into()));
        assert_eq!(entry_size(list(&m, "a", false).unwrap()[0].1), 1);
    }
}

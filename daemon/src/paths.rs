//! Paths a client names (snapshot files): confined to the daemon's data directory. A relative
//! path lives under it; an absolute one must be inside it; no `..`, and no symbolic link that
//! leads out of it.

use std::io;
use std::path::{Component, Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum PathError {
    #[error("path must not be empty")]
    Empty,
    #[error("path {0:?} has a `..` component; name a path inside the data directory")]
    DotDot(String),
    #[error("path {path:?} is outside the data directory {}", data_dir.display())]
    Outside { path: String, data_dir: PathBuf },
    #[error("path {path:?} leads outside the data directory (or nowhere) through a symbolic link")]
    Symlink { path: String },
    #[error("cannot resolve path {path:?}")]
    Resolve {
        path: String,
        #[source]
        source: io::Error,
    },
}

/// The file `path` names, checked to be inside `data_dir` (which must be absolute and
/// canonical). The part of it that exists is resolved, so a symbolic link inside the data
/// directory that points out of it is refused too; the part that does not exist yet (a new
/// snapshot's file and directories) is taken as written.
pub fn confine(data_dir: &Path, path: &str) -> Result<PathBuf, PathError> {
    if path.is_empty() {
        return Err(PathError::Empty);
    }
    let p = Path::new(path);
    if p.components().any(|c| c == Component::ParentDir) {
        return Err(PathError::DotDot(path.to_owned()));
    }
    let full = if p.is_absolute() {
        p.to_owned()
    } else {
        data_dir.join(p)
    };
    if !full.starts_with(data_dir) {
        return Err(PathError::Outside {
            path: path.to_owned(),
            data_dir: data_dir.to_owned(),
        });
    }
    // The deepest part that exists (a link counts, dangling or not), resolved.
    let existing = full
        .ancestors()
        .find(|a| a.symlink_metadata().is_ok())
        .unwrap_or(data_dir);
    let resolved = existing.canonicalize().map_err(|source| {
        let dangling = existing
            .symlink_metadata()
            .is_ok_and(|m| m.file_type().is_symlink());
        if dangling {
            PathError::Symlink {
                path: path.to_owned(),
            }
        } else {
            PathError::Resolve {
                path: path.to_owned(),
                source,
            }
        }
    })?;
    if !resolved.starts_with(data_dir) {
        return Err(PathError::Symlink {
            path: path.to_owned(),
        });
    }
    let rest = full.strip_prefix(existing).unwrap_or(Path::new(""));
    Ok(if rest.as_os_str().is_empty() {
        resolved
    } else {
        resolved.join(rest)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_stay_in_the_data_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("data");
        std::fs::create_dir_all(data.join("snaps")).unwrap();
        let data = data.canonicalize().unwrap();
        let outside = tmp.path().canonicalize().unwrap().join("outside");
        std::fs::create_dir_all(&outside).unwrap();

        assert_eq!(confine(&data, "a.snap").unwrap(), data.join("a.snap"));
        assert_eq!(
            confine(&data, "snaps/new/b.snap").unwrap(),
            data.join("snaps/new/b.snap")
        );
        let inside = data.join("snaps/c.snap");
        assert_eq!(confine(&data, inside.to_str().unwrap()).unwrap(), inside);

        assert!(matches!(confine(&data, ""), Err(PathError::Empty)));
        assert!(matches!(
            confine(&data, "snaps/../../x"),
            Err(PathError::DotDot(_))
        ));
        assert!(matches!(
            confine(&data, "/etc/passwd"),
            Err(PathError::Outside { .. })
        ));
        let e = confine(&data, outside.join("x").to_str().unwrap()).unwrap_err();
        assert!(e.to_string().contains("outside the data directory"), "{e}");

        // A directory link and a file link that lead out are refused, a link inside is not.
        std::os::unix::fs::symlink(&outside, data.join("out")).unwrap();
        assert!(matches!(
            confine(&data, "out/x.snap"),
            Err(PathError::Symlink { .. })
        ));
        std::os::unix::fs::symlink(outside.join("f"), data.join("f.snap")).unwrap();
        assert!(matches!(
            confine(&data, "f.snap"),
            Err(PathError::Symlink { .. })
        ));
        std::os::unix::fs::symlink(data.join("snaps"), data.join("s")).unwrap();
        assert_eq!(
            confine(&data, "s/d.snap").unwrap(),
            data.join("snaps/d.snap")
        );
    }
}

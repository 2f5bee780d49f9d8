//! Staging and target paths must lie under the kubelet directory, after
//! `..` and symlinks are resolved: nothing is ever mounted anywhere else.

use std::path::{Component, Path, PathBuf};

use super::error::NodeError;

/// Resolves `path` (which may not exist yet: its deepest existing ancestor
/// is canonicalised and the rest appended, with no `..` allowed in the
/// rest) and checks that it lies strictly under `kubelet_dir` (canonical).
pub fn under_kubelet(
    field: &'static str,
    path: &str,
    kubelet_dir: &Path,
) -> Result<PathBuf, NodeError> {
    let outside = || NodeError::OutsideKubeletDir {
        field,
        path: PathBuf::from(path),
        kubelet_dir: kubelet_dir.to_owned(),
    };
    let p = Path::new(path);
    if !p.is_absolute() || path.contains('\0') {
        return Err(outside());
    }
    let mut existing = p.to_path_buf();
    let mut rest: Vec<std::ffi::OsString> = Vec::new();
    let resolved = loop {
        match existing.canonicalize() {
            Ok(c) => break c,
            Err(_) => {
                let name = existing.file_name().ok_or_else(outside)?.to_owned();
                rest.push(name);
                if !existing.pop() {
                    return Err(outside());
                }
            }
        }
    };
    let mut full = resolved;
    for name in rest.iter().rev() {
        match Path::new(name).components().next() {
            Some(Component::Normal(_)) => full.push(name),
            _ => return Err(outside()),
        }
    }
    if full.starts_with(kubelet_dir) && full != kubelet_dir {
        Ok(full)
    } else {
        Err(outside())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_must_stay_under_the_kubelet_dir() {
        let dir = tempfile::tempdir().unwrap();
        let kubelet = dir
            .path()
            .join("kubelet")
            .canonicalize()
            .unwrap_or_else(|_| {
                std::fs::create_dir(dir.path().join("kubelet")).unwrap();
                dir.path().join("kubelet").canonicalize().unwrap()
            });
        std::fs::create_dir_all(kubelet.join("pods/p1")).unwrap();
        let ok = under_kubelet(
            "target_path",
            kubelet.join("pods/p1/vol").to_str().unwrap(),
            &kubelet,
        )
        .unwrap();
        assert_eq!(ok, kubelet.join("pods/p1/vol"));
        // `..` that climbs out, a symlink that points out, the dir itself,
        // a relative path: all refused.
        let climb = format!("{}/pods/../../etc", kubelet.display());
        assert!(under_kubelet("target_path", &climb, &kubelet).is_err());
        std::os::unix::fs::symlink("/etc", kubelet.join("pods/evil")).unwrap();
        let via_link = format!("{}/pods/evil/x", kubelet.display());
        assert!(under_kubelet("target_path", &via_link, &kubelet).is_err());
        assert!(under_kubelet("target_path", kubelet.to_str().unwrap(), &kubelet).is_err());
        assert!(under_kubelet("target_path", "pods/p1", &kubelet).is_err());
        let missing_dotdot = format!("{}/pods/missing/../../..", kubelet.display());
        assert!(under_kubelet("target_path", &missing_dotdot, &kubelet).is_err());
    }
}

//! A CSI endpoint: the UNIX socket a driver serves on and a client dials.
//! Shared by the server, the settings and the operator tools.

use std::path::{Path, PathBuf};

/// A UNIX-socket gRPC endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    path: PathBuf,
}

/// Not a `unix://` address with an absolute path.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a UNIX socket endpoint; use unix:///absolute/path.sock")]
pub struct EndpointError(pub String);

impl Endpoint {
    /// Parses `unix:///abs/path` or `unix:/abs/path` (what CSI sidecars and
    /// gRPC accept). A `unix://host/...` authority form and relative paths
    /// are refused.
    pub fn parse(s: &str) -> Result<Endpoint, EndpointError> {
        let path = s
            .strip_prefix("unix://")
            .or_else(|| s.strip_prefix("unix:"))
            .ok_or_else(|| EndpointError(s.to_owned()))?;
        if !path.starts_with('/') || path.contains('\0') || path.ends_with('/') {
            return Err(EndpointError(s.to_owned()));
        }
        Ok(Endpoint::from_path(PathBuf::from(path)))
    }

    /// An endpoint at an absolute path.
    pub fn from_path(path: PathBuf) -> Endpoint {
        debug_assert!(path.is_absolute());
        Endpoint { path }
    }

    /// The socket file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The address as gRPC core wants it: `unix:/abs/path` (it reads
    /// `unix://tmp/x` as the relative `//tmp/x` on the server side).
    pub fn grpc_address(&self) -> String {
        format!("unix:{}", self.path.display())
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "unix://{}", self.path.display())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_forms() {
        let ep = Endpoint::parse("unix:///csi/csi.sock").unwrap();
        assert_eq!(ep.path(), Path::new("/csi/csi.sock"));
        assert_eq!(ep.grpc_address(), "unix:/csi/csi.sock");
        assert_eq!(ep.to_string(), "unix:///csi/csi.sock");
        assert_eq!(Endpoint::parse("unix:/csi/csi.sock").unwrap(), ep);
        for bad in [
            "/csi/csi.sock",
            "tcp://127.0.0.1:10000",
            "unix://csi/csi.sock",
            "unix:relative.sock",
            "unix:///csi/",
            "unix:///csi/a\0b",
        ] {
            assert!(Endpoint::parse(bad).is_err(), "{bad} accepted");
        }
    }
}

//! Where the CLI finds its orchestrator and how it proves who it is: flags and environment
//! first (`--server`, `--ca`, `--cert`, `--key`, `GODWIT_TOKEN`), then the config file
//! (`--config`, `GODWIT_CONFIG`, or `~/.config/godwit/config.toml`), then the defaults.
//!
//! ```toml
//! server = "https://10.0.0.1:7000"
//! ca = "ca.crt"            # paths relative to this file's directory
//! cert = "ann.crt"
//! key = "ann.key"
//! # token = "gdw_..."     # instead of cert/key (or GODWIT_TOKEN)
//! ```

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use godwit_daemon::client::ClientAuth;
use serde::Deserialize;

/// The orchestrator's address when nothing says otherwise.
pub const DEFAULT_SERVER: &str = "https://127.0.0.1:7000";

/// What the config file may hold; every key is optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileProfile {
    pub server: Option<String>,
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub token: Option<String>,
}

/// The command line's and the environment's say (already merged by clap).
#[derive(Debug, Default)]
pub struct Given {
    pub server: Option<String>,
    pub config: Option<PathBuf>,
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub token: Option<String>,
}

/// The orchestrator's URL and the client's identity.
#[derive(Debug)]
pub struct Profile {
    pub server: String,
    pub auth: ClientAuth,
}

fn default_config() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))?;
    Some(base.join("godwit").join("config.toml"))
}

/// Reads the config file: the one named (which must exist), else the default one if present.
fn read_file(named: Option<&Path>) -> Result<(FileProfile, PathBuf)> {
    let (path, must) = match named {
        Some(p) => (p.to_owned(), true),
        None => match default_config() {
            Some(p) => (p, false),
            None => return Ok((FileProfile::default(), PathBuf::from("."))),
        },
    };
    let dir = path
        .parent()
        .map(Path::to_owned)
        .unwrap_or_else(|| PathBuf::from("."));
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if !must && e.kind() == std::io::ErrorKind::NotFound => {
            return Ok((FileProfile::default(), dir))
        }
        Err(e) => {
            return Err(e)
                .with_context(|| format!("Cannot read the config file {}", path.display()))
        }
    };
    let file: FileProfile = toml::from_str(&text)
        .with_context(|| format!("The config file {} is invalid", path.display()))?;
    Ok((file, dir))
}

pub fn resolve(given: Given) -> Result<Profile> {
    let (file, dir) = read_file(given.config.as_deref())?;
    let rel = |p: PathBuf| if p.is_absolute() { p } else { dir.join(p) };
    let server = given
        .server
        .or(file.server)
        .unwrap_or_else(|| DEFAULT_SERVER.to_owned());
    let ca = given.ca.or(file.ca.map(rel));
    let cert = given.cert.or(file.cert.map(rel));
    let key = given.key.or(file.key.map(rel));
    let token = given.token.or(file.token).filter(|t| !t.is_empty());
    let auth = match (ca, cert, key) {
        (Some(ca), Some(cert), Some(key)) => {
            let creds = godwit_tls::Credentials::load(&ca, &cert, &key)
                .map_err(|e| anyhow::anyhow!(godwit_daemon::chain(&e)))?;
            ClientAuth::certificate(&creds)
                .map_err(|e| anyhow::anyhow!(godwit_daemon::chain(&e)))?
                .with_token(token)
        }
        (Some(ca), None, None) => ClientAuth::ca_only(&ca)
            .map_err(|e| anyhow::anyhow!(godwit_daemon::chain(&e)))?
            .with_token(token),
        (None, None, None) => {
            if token.is_some() {
                bail!("A token needs the cluster CA to check the server with: give --ca (or `ca` in the config file)");
            }
            ClientAuth::insecure()
        }
        _ => bail!("--cert and --key go together, and need --ca"),
    };
    Ok(Profile { server, auth })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_win_over_the_file_and_paths_are_relative_to_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        std::fs::write(
            &path,
            "server = \"https://10.0.0.1:7000\"\nca = \"nope.crt\"\n",
        )
        .unwrap();
        // The file's CA path is read relative to the file (and is missing there).
        let e = resolve(Given {
            config: Some(path.clone()),
            token: Some("gdw_x".into()),
            ..Given::default()
        })
        .unwrap_err();
        assert!(
            format!("{e:#}").contains(&dir.path().join("nope.crt").display().to_string()),
            "{e:#}"
        );
        let p = resolve(Given {
            config: Some(path.clone()),
            server: Some("http://127.0.0.1:1".into()),
            ca: None,
            ..Given::default()
        });
        // The file's ca still applies: a missing file is an error.
        assert!(p.is_err());
        std::fs::write(&path, "server = \"http://127.0.0.1:9\"\n").unwrap();
        let p = resolve(Given {
            config: Some(path.clone()),
            ..Given::default()
        })
        .unwrap();
        assert_eq!(p.server, "http://127.0.0.1:9");
        assert!(!p.auth.is_tls());
        std::fs::write(&path, "sever = \"typo\"\n").unwrap();
        assert!(resolve(Given {
            config: Some(path),
            ..Given::default()
        })
        .is_err());
        let e = resolve(Given {
            config: Some(dir.path().join("missing.toml")),
            ..Given::default()
        })
        .unwrap_err();
        assert!(format!("{e:#}").contains("Cannot read the config file"));
    }
}

//! The entropy device a guest reads through a port (docs/guest-abi.md, "Devices"): this
//! host's random source (`/dev/urandom`), or after a global reference the source host's,
//! fetched over HTTP from its agent. Each host's device has an identifier the guest can read,
//! so a test can see which host's device a VM is bound to.

use std::fs::File;
use std::io::{self, Read};
use std::sync::Mutex;
use std::time::Duration;

/// How many bytes a remote device fetches at a time.
const REMOTE_BATCH: usize = 4096;

/// A source of random words with an identity.
pub trait EntropySource: Send + Sync + std::fmt::Debug {
    /// Never 0 (0 tells the guest there is no device).
    fn device_id(&self) -> u32;
    fn next_u32(&self) -> io::Result<u32>;
    /// `entropy HOST#ID`, or with `via` for a remote one.
    fn location(&self) -> String;
}

/// The identifier of `host`'s device of `class`: stable, non-zero.
pub fn device_id(host: &str, class: &str) -> u32 {
    let h = blake3::hash(format!("{host}\0{class}").as_bytes());
    u32::from_le_bytes(h.as_bytes()[..4].try_into().unwrap_or_default()) | 1
}

/// This host's `/dev/urandom`.
#[derive(Debug)]
pub struct LocalEntropy {
    file: Mutex<File>,
    id: u32,
    host: String,
}

impl LocalEntropy {
    pub fn open(host: &str) -> io::Result<Self> {
        Ok(LocalEntropy {
            file: Mutex::new(File::open("/dev/urandom")?),
            id: device_id(host, "entropy"),
            host: host.to_owned(),
        })
    }

    /// Fills `buf` from this host's device (what a remote device fetches).
    pub fn fill(&self, buf: &mut [u8]) -> io::Result<()> {
        self.file
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .read_exact(buf)
    }
}

impl EntropySource for LocalEntropy {
    fn device_id(&self) -> u32 {
        self.id
    }

    fn next_u32(&self) -> io::Result<u32> {
        let mut b = [0u8; 4];
        self.fill(&mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    fn location(&self) -> String {
        format!("entropy {}#{:08x}", self.host, self.id)
    }
}

/// Another host's device, read through that host's agent (`GET /v1/devices/entropy`).
#[derive(Debug)]
pub struct RemoteEntropy {
    url: String,
    host: String,
    id: u32,
    buffer: Mutex<Vec<u8>>,
    client: reqwest::blocking::Client,
}

impl RemoteEntropy {
    /// `url` is the remote agent's base URL, `host` its name.
    pub fn new(
        url: &str,
        host: &str,
        auth: &godwit_daemon::client::ClientAuth,
    ) -> io::Result<Self> {
        let client = auth
            .blocking_client(Duration::from_secs(5))
            .map_err(io::Error::other)?;
        Ok(RemoteEntropy {
            url: url.trim_end_matches('/').to_owned(),
            host: host.to_owned(),
            id: device_id(host, "entropy"),
            buffer: Mutex::new(Vec::new()),
            client,
        })
    }

    fn fetch(&self) -> io::Result<Vec<u8>> {
        let resp = self
            .client
            .get(format!(
                "{}/v1/devices/entropy?bytes={REMOTE_BATCH}",
                self.url
            ))
            .send()
            .map_err(io::Error::other)?;
        if !resp.status().is_success() {
            return Err(io::Error::other(format!(
                "the entropy device on {} answered {}",
                self.host,
                resp.status()
            )));
        }
        let bytes = resp.bytes().map_err(io::Error::other)?;
        if bytes.len() < 4 {
            return Err(io::Error::other(format!(
                "the entropy device on {} sent {} bytes",
                self.host,
                bytes.len()
            )));
        }
        Ok(bytes.to_vec())
    }
}

impl EntropySource for RemoteEntropy {
    fn device_id(&self) -> u32 {
        self.id
    }

    fn next_u32(&self) -> io::Result<u32> {
        let mut buf = self.buffer.lock().unwrap_or_else(|e| e.into_inner());
        if buf.len() < 4 {
            *buf = self.fetch()?;
        }
        let tail = buf.len() - 4;
        let word = u32::from_le_bytes(buf[tail..].try_into().unwrap_or_default());
        buf.truncate(tail);
        Ok(word)
    }

    fn location(&self) -> String {
        format!("entropy {}#{:08x} via {}", self.host, self.id, self.url)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_per_host_and_never_zero() {
        assert_ne!(
            device_id("host-1", "entropy"),
            device_id("host-2", "entropy")
        );
        assert_eq!(device_id("a", "entropy"), device_id("a", "entropy"));
        assert_eq!(device_id("a", "entropy") & 1, 1);
    }

    #[test]
    fn local_device_reads() {
        let e = LocalEntropy::open("h").unwrap();
        let words: Vec<u32> = (0..8).map(|_| e.next_u32().unwrap()).collect();
        assert!(words.iter().any(|&w| w != words[0]));
        assert!(e.location().starts_with("entropy h#"));
    }
}

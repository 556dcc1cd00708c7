//! `godwit ca ...`: the cluster's certificate authority and its certificates
//! (docs/security.md). Everything happens on this machine: keys are made here and written
//! with mode 0600; the CA key never has to leave the CA directory.

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Subcommand;
use godwit_tls::ca::{self, Validity};
use godwit_tls::{Identity, Role};

#[derive(Debug, Subcommand)]
pub enum CaCommand {
    /// Make a new cluster CA in DIR (ca.crt, ca.key). An existing CA is never replaced.
    Init {
        dir: PathBuf,
        /// The cluster's name, in the CA's subject.
        #[arg(long, default_value = "godwit")]
        cluster: String,
    },
    /// Issue a certificate signed by the CA: for a host (an agent or the orchestrator, which
    /// serve and connect) or for an operator with a role. Writes NAME.crt and NAME.key (and a
    /// copy of ca.crt) to --out.
    Issue {
        /// The CA's directory (from `godwit ca init`).
        #[arg(long)]
        ca: PathBuf,
        /// A host name: the agent's --name, or the orchestrator's.
        #[arg(long, conflicts_with_all = ["user", "role"], required_unless_present = "user")]
        host: Option<String>,
        /// Another name or IP address the host is reached at (repeatable). Its name,
        /// localhost, 127.0.0.1 and ::1 are always in.
        #[arg(long = "san", requires = "host")]
        sans: Vec<String>,
        /// An operator's name.
        #[arg(long, requires = "role")]
        user: Option<String>,
        /// The operator's role: admin (may change things) or viewer (may read).
        #[arg(long, value_parser = ["admin", "viewer"])]
        role: Option<String>,
        /// Where to write the files (default: the current directory).
        #[arg(long, default_value = ".")]
        out: PathBuf,
        /// Days the certificate is valid.
        #[arg(long, default_value_t = 365)]
        days: i64,
    },
}

pub fn run(cmd: CaCommand, json: bool) -> Result<()> {
    match cmd {
        CaCommand::Init { dir, cluster } => {
            let cert = ca::init(&dir, &cluster)?;
            if json {
                return super::print_json(&serde_json::json!({
                    "ca_cert": cert, "ca_key": dir.join(ca::CA_KEY),
                }));
            }
            println!(
                "CA made: {} (give it to every host and operator)",
                cert.display()
            );
            println!(
                "CA key:  {} (keep it here; it signs every certificate)",
                dir.join(ca::CA_KEY).display()
            );
            Ok(())
        }
        CaCommand::Issue {
            ca: ca_dir,
            host,
            sans,
            user,
            role,
            out,
            days,
        } => {
            if days < 1 {
                bail!("--days must be at least 1");
            }
            let who = match (host, user, role) {
                (Some(name), None, None) => Identity {
                    name,
                    role: Role::Host,
                },
                (None, Some(name), Some(role)) => Identity {
                    name,
                    role: Role::parse(&role).unwrap_or(Role::Viewer),
                },
                _ => bail!("give --host NAME, or --user NAME with --role admin|viewer"),
            };
            let issued = ca::issue(&ca_dir, &who, &sans, Validity::days(days), &out)?;
            if json {
                return super::print_json(&serde_json::json!({
                    "name": who.name, "role": who.role.as_str(), "cert": issued.cert,
                    "key": issued.key, "ca": issued.ca, "days": days,
                }));
            }
            println!(
                "{} certificate for {}: {} (key {}, CA {}), valid {days} days",
                who.role,
                who.name,
                issued.cert.display(),
                issued.key.display(),
                issued.ca.display()
            );
            Ok(())
        }
    }
}

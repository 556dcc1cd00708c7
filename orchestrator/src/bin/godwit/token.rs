//! `godwit token new`: a bearer token for an operator who authenticates without a client
//! certificate. The token is printed once; the daemons keep only its SHA-256 (the
//! `[[tokens]]` entry printed beside it goes into the orchestrator's config file, or into an
//! agent's `--tokens` file).

use anyhow::Result;
use clap::Subcommand;
use godwit_daemon::auth::{new_token, token_hash, TokenEntry};

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Make a new random token for NAME and print it with its config entry.
    New {
        /// Who holds it (appears in the daemons' logs).
        name: String,
        /// admin (may change things) or viewer (may read).
        #[arg(long, value_parser = ["admin", "viewer"], default_value = "viewer")]
        role: String,
    },
}

pub fn run(cmd: TokenCommand, json: bool) -> Result<()> {
    match cmd {
        TokenCommand::New { name, role } => {
            let token = new_token().map_err(anyhow::Error::msg)?;
            let entry = TokenEntry {
                name,
                role,
                sha256: token_hash(&token),
            };
            if json {
                return super::print_json(&serde_json::json!({
                    "token": token, "name": entry.name, "role": entry.role, "sha256": entry.sha256,
                }));
            }
            println!("token: {token}");
            println!("(shown once: give it to {}; use it as GODWIT_TOKEN or `token` in the CLI's config file)", entry.name);
            println!();
            println!("Add to the orchestrator's config file (or an agent's --tokens file):");
            println!("[[tokens]]");
            println!("name = {:?}", entry.name);
            println!("role = {:?}", entry.role);
            println!("sha256 = {:?}", entry.sha256);
            Ok(())
        }
    }
}

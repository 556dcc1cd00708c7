//! The agent's API errors: the same sentences-with-a-status as the VMM's, so an answer from a
//! VMM passes through with its status (see `godwit_daemon::AgentError`).

pub use godwit_daemon::{chain, AgentError};

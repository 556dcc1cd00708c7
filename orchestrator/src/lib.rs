//! Godwit's control plane. For now it holds the `godwit` CLI's helpers for driving agents;
//! the orchestrator daemon (membership, placement, balancing) grows here next.

#![forbid(unsafe_code)]

pub mod agent_client;
pub mod local;

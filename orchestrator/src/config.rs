//! The orchestrator's configuration: a TOML file whose every key has a default (see
//! docs/orchestrator.md). The balancing policy's parameters live under `[policy]`.

use std::path::Path;

use godwit_api::BalancerMode;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// How often each agent is polled for host and VM state, ms.
    pub poll_interval_ms: u64,
    /// An agent not heard from (heartbeat or poll) for this long is down, ms.
    pub agent_timeout_ms: u64,
    /// How often the balancer runs, ms.
    pub balance_interval_ms: u64,
    /// Balancer mode at first start (later changes via the API are remembered).
    pub balancer: BalancerMode,
    /// Load samples kept per host (the policy's n must not exceed it).
    pub load_history: usize,
    /// CPU capacity assumed per host, cores; 0 = the agent's reported cores.
    pub host_capacity_cores: f64,
    /// How often a running migration's status is polled from its source agent, ms.
    pub migration_poll_ms: u64,
    pub policy: policies::Params,
    /// Bearer tokens operators may present instead of a client certificate (`[[tokens]]`
    /// with `name`, `role` = admin or viewer, and `sha256`, the token's SHA-256 in hex).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tokens: Vec<godwit_daemon::auth::TokenEntry>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            poll_interval_ms: 1000,
            agent_timeout_ms: 6000,
            balance_interval_ms: 3000,
            balancer: BalancerMode::Automatic,
            load_history: 10,
            host_capacity_cores: 0.0,
            migration_poll_ms: 250,
            policy: policies::Params::default(),
            tokens: Vec::new(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("Cannot read the config file {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("The config file {path} is not valid")]
    Parse {
        path: String,
        #[source]
        source: toml::de::Error,
    },
    #[error("The config is not usable: {0}")]
    Invalid(String),
}

impl Config {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let config: Config = toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.display().to_string(),
            source,
        })?;
        config.check()?;
        Ok(config)
    }

    /// The bearer tokens of `tokens`, checked.
    pub fn tokens(&self) -> Result<godwit_daemon::auth::Tokens, ConfigError> {
        godwit_daemon::auth::Tokens::new(&self.tokens).map_err(ConfigError::Invalid)
    }

    pub fn check(&self) -> Result<(), ConfigError> {
        self.tokens()?;
        if self.poll_interval_ms == 0 || self.balance_interval_ms == 0 {
            return Err(ConfigError::Invalid(
                "poll_interval_ms and balance_interval_ms must be above 0".into(),
            ));
        }
        if self.agent_timeout_ms < self.poll_interval_ms {
            return Err(ConfigError::Invalid(
                "agent_timeout_ms must be at least poll_interval_ms".into(),
            ));
        }
        if self.migration_poll_ms == 0 {
            return Err(ConfigError::Invalid(
                "migration_poll_ms must be above 0".into(),
            ));
        }
        let window = self.policy.hotspot.window;
        if self.load_history < window.max(1) {
            return Err(ConfigError::Invalid(format!(
                "load_history ({}) must be at least policy.hotspot.window ({window}), or no host \
                 could ever be found hot",
                self.load_history
            )));
        }
        self.policy
            .validate()
            .map_err(|e| ConfigError::Invalid(format!("policy: {e}")))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_gives_defaults_and_keys_override() {
        let c: Config = toml::from_str("").unwrap();
        assert_eq!(c, Config::default());
        let c: Config =
            toml::from_str("balancer = \"recommend\"\npoll_interval_ms = 500\n").unwrap();
        assert_eq!(c.balancer, BalancerMode::Recommend);
        assert_eq!(c.poll_interval_ms, 500);
        assert!(toml::from_str::<Config>("bogus = 1").is_err());
    }

    #[test]
    fn policy_parameters_are_checked() {
        let c: Config = toml::from_str("load_history = 3\n").unwrap();
        assert!(c.check().unwrap_err().to_string().contains("load_history"));
        let c: Config = toml::from_str("[policy.hotspot]\nthreshold = -1.0\n").unwrap();
        assert!(c.check().is_err());
        assert!(Config::default().check().is_ok());
    }

    #[test]
    fn nonsense_is_rejected() {
        let c = Config {
            agent_timeout_ms: 10,
            ..Config::default()
        };
        assert!(c.check().is_err());
    }
}

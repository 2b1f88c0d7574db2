//! What every verb shares: the validated config, the targets' clients, the metrics.
//!
//! Built once per process from a [`Config`]; cheap to clone (everything inside is shared).

use std::sync::Arc;

use crate::config::Config;
use crate::metrics::Metrics;
use crate::notify::Notifier;
use crate::storage::catalog::{self, Catalog, Filter};
use crate::storage::target::{Target, TargetError};

#[derive(Clone)]
pub struct App {
    pub config: Arc<Config>,
    pub targets: Arc<Vec<Target>>,
    pub metrics: Metrics,
    /// `[notify] webhook` and the sources' pings.
    pub notifier: Notifier,
}

impl App {
    pub fn new(config: Config) -> Result<App, TargetError> {
        let targets = config
            .targets
            .iter()
            .map(Target::from_config)
            .collect::<Result<Vec<_>, _>>()?;
        let metrics = Metrics::new();
        for t in &targets {
            metrics.init_target(&t.name);
        }
        Ok(App {
            notifier: Notifier::new(&config.notify),
            config: Arc::new(config),
            targets: Arc::new(targets),
            metrics,
        })
    }

    pub fn target(&self, name: &str) -> Option<&Target> {
        self.targets.iter().find(|t| t.name == name)
    }

    /// The catalog of the configured sources on the configured targets (see `catalog`).
    pub async fn catalog(&self, filter: &Filter) -> Catalog {
        let sources: Vec<&str> = self
            .config
            .sources
            .iter()
            .map(|s| s.name.as_str())
            .collect();
        catalog::load(&self.targets, &sources, filter).await
    }
}

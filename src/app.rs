//! What every verb shares: the validated config, the targets' clients, the metrics.
//!
//! Built once per process from a [`Config`]; cheap to clone (everything inside is shared).

use std::sync::Arc;

use crate::config::Config;
use crate::metrics::Metrics;
use crate::notify::Notifier;
use crate::storage::catalog::{self, Catalog, Filter, Plan, Read};
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

    fn source_names(&self) -> Vec<&str> {
        self.config
            .sources
            .iter()
            .map(|s| s.name.as_str())
            .collect()
    }

    /// The catalog of the configured sources on the configured targets (see `catalog`), every
    /// manifest read: for what decides on it.
    pub async fn catalog(&self, filter: &Filter) -> Catalog {
        catalog::load(&self.targets, &self.source_names(), filter).await
    }

    /// The catalog read through the folders' indexes, whole: for reports over a few databases
    /// or the small facts of a fleet (metrics).
    pub async fn catalog_indexed(&self, filter: &Filter) -> Catalog {
        catalog::load_with(&self.targets, &self.source_names(), filter, Read::Indexed).await
    }

    /// The database folders `filter` selects, to stream a fleet's catalog folder by folder.
    pub async fn catalog_plan(&self, filter: &Filter) -> Plan {
        Plan::new(&self.targets, &self.source_names(), filter).await
    }

    /// Sets the last-success gauges from what the buckets hold (see `metrics::from_catalog`):
    /// every configured source, one database folder at a time through the folders' indexes,
    /// so memory is one folder's whatever the fleet. A target that cannot be listed leaves
    /// what the others say.
    pub async fn refresh_bucket_metrics(&self) {
        use futures::StreamExt;
        let plan = self.catalog_plan(&Filter::default()).await;
        let mut pieces = std::pin::pin!(plan.stream(Read::Indexed));
        while let Some(piece) = pieces.next().await {
            crate::metrics::from_catalog::seed(
                &self.metrics,
                &piece,
                self.config.pipeline.min_targets,
            );
        }
    }
}

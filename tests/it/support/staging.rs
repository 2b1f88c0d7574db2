//! The restore destination of the tests: a second PostgreSQL cluster ("staging") beside a
//! [`TestEnv`]'s production one, its superuser password one of that environment's secret
//! variables, and the `[[restore_target]]` that points at it.
//!
//! Because the password is registered with the environment, `env.pgferry(…)` and
//! `env.command(…)` reach staging with no further setup, and every run's output is checked
//! for the password like for the environment's own secrets.

use std::ops::Deref;
use std::path::Path;

use super::env::TestEnv;
use super::postgres::PgCluster;

/// Environment variable carrying the staging cluster's superuser password into configs.
pub const STAGING_PW_VAR: &str = "PGFERRY_TEST_STAGING_PASSWORD";

/// A running staging cluster; it derefs to its [`PgCluster`] (`staging.databases()`,
/// `staging.table_fingerprints(…)`).
pub struct Staging {
    pg: PgCluster,
}

impl Staging {
    /// Starts a cluster with role `odoo` (the restore target's owner) and a database `acme`
    /// holding `previous_sql` (what a restore replaces, and a failed one must leave), and
    /// adds its password to `env`'s variables and secrets.
    pub async fn start(env: &TestEnv, previous_sql: &str) -> Staging {
        let pg = PgCluster::start()
            .await
            .expect("start the staging PostgreSQL");
        pg.create_role("odoo", "odoo-pw", "").await.unwrap();
        pg.create_database("acme").await.unwrap();
        pg.execute("acme", previous_sql).await.unwrap();
        env.add_secret_var(STAGING_PW_VAR, pg.superuser_password());
        Staging { pg }
    }

    /// The superuser URL with the password as `${STAGING_PW_VAR}`, for a config's
    /// `[[restore_target]]` or `[verify]` `url`.
    pub fn url(&self) -> String {
        format!(
            "postgres://postgres:${{{STAGING_PW_VAR}}}@127.0.0.1:{}/postgres",
            self.pg.port()
        )
    }

    /// A `[[restore_target]]` of namespace `staging-*` on this cluster, owner `odoo`, running
    /// `hooks`; the caller may append further keys of the table.
    pub fn restore_target_toml<P: AsRef<Path>>(&self, hooks: &[P]) -> String {
        let hooks = hooks
            .iter()
            .map(|h| format!("{:?}", h.as_ref().display().to_string()))
            .collect::<Vec<_>>()
            .join(", ");
        format!(
            "[[restore_target]]\nnamespace = \"staging-*\"\nurl = \"{}\"\nowner = \"odoo\"\nhooks = [{hooks}]\n",
            self.url()
        )
    }
}

impl Deref for Staging {
    type Target = PgCluster;

    fn deref(&self) -> &PgCluster {
        &self.pg
    }
}

//! The shipped Odoo hook through a real restore: an Odoo-shaped production database (only the
//! tables and columns `config/hooks/odoo-neutralize.sql` touches) comes out of `pgferry
//! restore` neutralized as Odoo 16+'s `odoo neutralize` leaves it, with the copy's identity
//! reset and `web.base.url` from a `[[restore_target]] variables` entry; a second hook sees
//! the psql-style variables, quotes in values included, literally. The same hook on
//! databases without those tables (or with an older Odoo's columns) succeeds.

use crate::restore::{hook_path, World};
use crate::support::postgres::PgCluster;

/// An Odoo with everything in its production state, beside restore.rs's `ODOO_SQL` (20 crons,
/// a mail server, a fetchmail server, `web.base.url` and an enterprise code).
const LIVE_ODOO_SQL: &str = r#"
CREATE TABLE ir_model_data (id serial PRIMARY KEY, module varchar NOT NULL, name varchar NOT NULL,
    model varchar NOT NULL, res_id int);
INSERT INTO ir_cron (name) VALUES ('Base: Auto-vacuum internal data');
INSERT INTO ir_model_data (module, name, model, res_id)
    SELECT 'base', 'autovacuum_job', 'ir.cron', id FROM ir_cron WHERE name LIKE 'Base: Auto%';
INSERT INTO ir_model_data (module, name, model, res_id)
    VALUES ('mail', 'ir_cron_mail_scheduler_action', 'ir.cron', 1);
CREATE TABLE mail_template (id serial PRIMARY KEY, name text, mail_server_id int);
INSERT INTO mail_template (name, mail_server_id) VALUES ('invoice', 1), ('welcome', NULL);
CREATE TABLE base_automation (id serial PRIMARY KEY, name text, "trigger" varchar, active boolean);
INSERT INTO base_automation (name, "trigger", active)
    VALUES ('from the shop', 'on_webhook', true), ('on create', 'on_create', true);
CREATE TABLE payment_provider (id serial PRIMARY KEY, code varchar, state varchar, is_live boolean);
INSERT INTO payment_provider (code, state, is_live)
    VALUES ('stripe', 'enabled', true), ('paypal', 'disabled', false);
CREATE TABLE delivery_carrier (id serial PRIMARY KEY, name text, prod_environment boolean);
INSERT INTO delivery_carrier (name, prod_environment) VALUES ('fedex', true);
CREATE TABLE account_edi_proxy_client_user (id serial PRIMARY KEY, proxy_type varchar,
    edi_mode varchar);
INSERT INTO account_edi_proxy_client_user (proxy_type, edi_mode)
    VALUES ('peppol', 'prod'), ('l10n_es_edi', 'prod'), ('l10n_my_edi', 'prod');
CREATE TABLE iap_account (id serial PRIMARY KEY, service_name varchar, account_token varchar);
INSERT INTO iap_account (service_name, account_token) VALUES ('sms', 'tok1'), ('ocr', 'tok2+old');
CREATE TABLE res_users (id serial PRIMARY KEY, login varchar, microsoft_calendar_token varchar,
    microsoft_calendar_rtoken varchar);
INSERT INTO res_users (login, microsoft_calendar_token, microsoft_calendar_rtoken)
    VALUES ('admin', 'ms-access', 'ms-refresh');
CREATE TABLE res_users_settings (id serial PRIMARY KEY, user_id int,
    google_calendar_token varchar, google_calendar_rtoken varchar,
    microsoft_calendar_sync_token varchar, microsoft_synchronization_stopped boolean,
    microsoft_last_sync_date timestamp);
INSERT INTO res_users_settings VALUES (1, 1, 'g-access', 'g-refresh', 'ms-sync', false, now());
CREATE TABLE website (id serial PRIMARY KEY, name text, domain varchar, cdn_activated boolean,
    robots_txt text);
INSERT INTO website (name, domain, cdn_activated, robots_txt)
    VALUES ('Acme', 'https://www.acme.example', true, 'User-agent: *');
CREATE TABLE ir_ui_view (id serial PRIMARY KEY, key varchar, active boolean);
INSERT INTO ir_ui_view (key, active)
    VALUES ('website.neutralize_ribbon', false), ('website.layout', true);
CREATE TABLE ir_attachment (id serial PRIMARY KEY, name varchar, url varchar, store_fname varchar);
INSERT INTO ir_attachment (name, url, store_fname) VALUES
    ('web.assets_frontend.min.css', '/web/assets/1a2b3c4/web.assets_frontend.min.css', 'ab/ab01'),
    ('web.assets_backend.min.js', '/web/assets/5d6e7f8/web.assets_backend.min.js', 'cd/cd01'),
    ('invoice.pdf', NULL, 'ef/ef01'),
    ('logo.png', '/web/image/logo.png', NULL);
INSERT INTO ir_config_parameter (key, value) VALUES
    ('database.uuid', '6d2b7b1e-0000-4000-8000-000000000001'),
    ('database.secret', 'production-secret'),
    ('sms.endpoint', 'https://iap-sms.odoo.com');
"#;

/// The staging target's variables: `base_url` expanded per namespace, and values with quotes
/// and backslashes that must arrive literally.
const VARIABLES: &str = r#"variables = { base_url = "https://{namespace}.staging.example.net", evil = "x'); DROP TABLE ir_attachment; --", path = "C:\\temp\\it's {database}" }"#;

/// A hook reading every variable, at top level (substituted) and as a setting.
const VARS_HOOK: &str = r#"-- :'evil' in a comment is not substituted
CREATE TABLE pgferry_hook_vars AS
SELECT :'namespace'::text AS namespace, :'database'::text AS database,
       :'snapshot_id'::text AS snapshot_id, :'base_url'::text AS base_url,
       :'evil'::text AS evil, :'path'::text AS path,
       current_setting('pgferry.evil') AS evil_setting, ':''evil''' AS quoted,
       :{?base_url} AS has_base_url, :{?nope} AS has_nope;
ALTER TABLE pgferry_hook_vars RENAME COLUMN quoted TO :"evil";
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_neutralizes_like_odoo_and_binds_the_variables() {
    let dir = tempfile::tempdir().unwrap();
    let vars_hook = dir.path().join("vars.sql");
    std::fs::write(&vars_hook, VARS_HOOK).unwrap();
    let w = World::start(
        LIVE_ODOO_SQL,
        &[hook_path(), vars_hook.display().to_string()],
        VARIABLES,
    )
    .await;
    let id = w.backup().await;
    w.restore(&[]).await.assert_code(0);
    let c = w.staging.client("acme").await.unwrap();
    let strings = |sql: &'static str| {
        let c = &c;
        async move {
            c.query(sql, &[])
                .await
                .unwrap_or_else(|e| panic!("{sql}: {e}"))
                .iter()
                .map(|r| {
                    r.get::<_, Option<String>>(0)
                        .unwrap_or_else(|| "NULL".into())
                })
                .collect::<Vec<String>>()
        }
    };

    // Mail, crons (but the autovacuum), webhooks.
    assert_eq!(
        strings("SELECT name FROM ir_cron WHERE active").await,
        ["Base: Auto-vacuum internal data"]
    );
    assert_eq!(strings("SELECT count(*)::text FROM ir_cron").await, ["21"]);
    assert_eq!(
        strings("SELECT count(*)::text FROM ir_mail_server WHERE active UNION ALL SELECT count(*)::text FROM fetchmail_server WHERE active").await,
        ["0", "0"]
    );
    assert_eq!(
        strings("SELECT count(*)::text FROM mail_template WHERE mail_server_id IS NOT NULL").await,
        ["0"]
    );
    assert_eq!(
        strings("SELECT name || '=' || active FROM base_automation ORDER BY id").await,
        ["from the shop=false", "on create=true"]
    );
    // Payment, delivery, e-invoicing, in-app purchases in test mode.
    assert_eq!(
        strings("SELECT code || ' ' || state || ' ' || is_live FROM payment_provider ORDER BY id")
            .await,
        ["stripe test false", "paypal disabled false"]
    );
    assert_eq!(
        strings("SELECT prod_environment::text FROM delivery_carrier").await,
        ["false"]
    );
    assert_eq!(
        strings(
            "SELECT proxy_type || ' ' || edi_mode FROM account_edi_proxy_client_user ORDER BY id"
        )
        .await,
        ["peppol demo", "l10n_es_edi test", "l10n_my_edi prod"]
    );
    assert_eq!(
        strings("SELECT account_token FROM iap_account ORDER BY id").await,
        ["tok1+disabled", "tok2+disabled"]
    );
    // Calendar tokens.
    assert_eq!(
        strings("SELECT concat_ws(',', microsoft_calendar_token, microsoft_calendar_rtoken) FROM res_users").await,
        [""]
    );
    assert_eq!(
        strings("SELECT concat_ws(',', google_calendar_token, google_calendar_rtoken, microsoft_calendar_sync_token, microsoft_last_sync_date) || microsoft_synchronization_stopped FROM res_users_settings").await,
        ["true"]
    );
    // Websites: no domain, no CDN, no robots, the ribbon on.
    assert_eq!(
        strings("SELECT concat_ws('|', domain, cdn_activated::text, robots_txt) FROM website")
            .await,
        ["false|User-agent: *\nDisallow: /"]
    );
    assert_eq!(
        strings("SELECT key FROM ir_ui_view WHERE active ORDER BY key").await,
        ["website.layout", "website.neutralize_ribbon"]
    );
    // Asset bundles gone, other attachments kept.
    assert_eq!(
        strings("SELECT name FROM ir_attachment ORDER BY id").await,
        ["invoice.pdf", "logo.png"]
    );
    // The copy's identity and URL.
    let param = |key: &'static str| {
        let c = &c;
        async move {
            c.query_opt(
                "SELECT value FROM ir_config_parameter WHERE key = $1",
                &[&key],
            )
            .await
            .unwrap()
            .map(|r| r.get::<_, String>(0))
        }
    };
    let uuid = param("database.uuid").await.expect("a database.uuid");
    assert_ne!(uuid, "6d2b7b1e-0000-4000-8000-000000000001");
    assert_eq!(
        strings("SELECT value::uuid::text FROM ir_config_parameter WHERE key = 'database.uuid'")
            .await,
        [uuid]
    );
    let secret = param("database.secret").await.expect("a database.secret");
    assert!(
        secret != "production-secret" && secret.len() >= 32,
        "{secret}"
    );
    assert_eq!(
        param("web.base.url").await.as_deref(),
        Some("https://staging-acme.staging.example.net")
    );
    assert_eq!(
        param("database.is_neutralized").await.as_deref(),
        Some("True")
    );
    assert_eq!(param("database.enterprise_code").await, None);
    assert_eq!(
        param("sms.endpoint").await.as_deref(),
        Some("https://iap-services-test.odoo.com")
    );
    assert_eq!(
        strings("SELECT count(*)::text FROM ir_config_parameter WHERE key IN ('database.uuid', 'database.secret', 'web.base.url')").await,
        ["3"]
    );

    // The variables hook: every value literal, nothing substituted inside quotes.
    let row = c
        .query_one("SELECT * FROM pgferry_hook_vars", &[])
        .await
        .unwrap();
    let evil = "x'); DROP TABLE ir_attachment; --";
    assert_eq!(row.get::<_, String>("namespace"), "staging-acme");
    assert_eq!(row.get::<_, String>("database"), "acme");
    assert_eq!(row.get::<_, String>("snapshot_id"), id);
    assert_eq!(
        row.get::<_, String>("base_url"),
        "https://staging-acme.staging.example.net"
    );
    assert_eq!(row.get::<_, String>("evil"), evil);
    assert_eq!(row.get::<_, String>("evil_setting"), evil);
    assert_eq!(row.get::<_, String>("path"), r"C:\temp\it's acme");
    assert_eq!(row.get::<_, String>(evil), ":'evil'");
    assert!(row.get::<_, bool>("has_base_url"));
    assert!(!row.get::<_, bool>("has_nope"));
    w.assert_no_leftovers().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hook_runs_on_databases_without_the_odoo_tables() {
    let pg = PgCluster::start().await.expect("start PostgreSQL");
    let sql = std::fs::read_to_string(hook_path()).unwrap();
    let (sql, unset) = pgferry::restore::hookvars::HookVars::default().substitute(&sql);
    assert!(unset.is_empty(), "{unset:?}");
    let run = |db: &'static str| {
        let (pg, sql) = (&pg, &sql);
        async move {
            let mut c = pg.client(db).await.unwrap();
            let tx = c.transaction().await.unwrap();
            tx.batch_execute(sql)
                .await
                .unwrap_or_else(|e| panic!("hook on {db}: {e:?}"));
            tx.commit().await.unwrap();
        }
    };

    // No Odoo at all: nothing to do, nothing created, nothing left behind.
    pg.create_database("plain").await.unwrap();
    pg.execute(
        "plain",
        "CREATE TABLE t (id int, active boolean); INSERT INTO t VALUES (1, true);",
    )
    .await
    .unwrap();
    run("plain").await;
    let c = pg.client("plain").await.unwrap();
    let tables: i64 = c
        .query_one(
            "SELECT count(*) FROM pg_tables WHERE schemaname NOT IN ('pg_catalog', 'information_schema')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(tables, 1);
    let active: bool = c
        .query_one("SELECT active FROM t", &[])
        .await
        .unwrap()
        .get(0);
    assert!(active);

    // An older Odoo: crons but no ir_model_data, providers with `state` only, a website
    // without a CDN column, no ir_config_parameter.
    pg.create_database("older").await.unwrap();
    pg.execute(
        "older",
        "CREATE TABLE ir_cron (id serial PRIMARY KEY, active boolean);
         INSERT INTO ir_cron (active) VALUES (true), (true);
         CREATE TABLE payment_provider (id serial PRIMARY KEY, state varchar);
         INSERT INTO payment_provider (state) VALUES ('enabled');
         CREATE TABLE website (id serial PRIMARY KEY, domain varchar);
         INSERT INTO website (domain) VALUES ('https://www.acme.example');",
    )
    .await
    .unwrap();
    run("older").await;
    let c = pg.client("older").await.unwrap();
    let row = c
        .query_one(
            "SELECT (SELECT count(*) FROM ir_cron WHERE active),
                    (SELECT state FROM payment_provider),
                    (SELECT domain FROM website)",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, i64>(0), 0);
    assert_eq!(row.get::<_, String>(1), "test");
    assert_eq!(row.get::<_, Option<String>>(2), None);
}

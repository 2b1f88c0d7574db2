-- Neutralize a restored Odoo database before anyone can reach it, as Odoo 16+'s
-- `odoo neutralize` does (the effects of the modules' `data/neutralize.sql`), plus the
-- resets of Odoo's own duplicate (`restore_db(copy=True)`): no mail goes out or is fetched,
-- no scheduled action runs but the autovacuum, payment providers, delivery carriers and
-- e-invoicing run in test mode, calendar sync tokens are dropped, websites lose their domain
-- and CDN and ask robots to stay away, the copy gets its own identity, and the compiled
-- asset bundles are deleted so Odoo rebuilds them (their files are not in the staging
-- filestore).
--
-- pgferry runs this in the temporary database, in one transaction, before swapping it in.
-- Each statement is guarded by its table and columns existing, so the hook also runs on an
-- older Odoo, on one without a module, and on a non-Odoo database.
--
-- Variables (see README "Restore hooks"): pgferry substitutes `:'name'` psql-style outside
-- quotes and dollar-quoted bodies, and sets every variable for the transaction as
-- `pgferry.<name>`, which is how the DO body below reads them (psql never substitutes inside
-- `$$`). `base_url` (`[[restore_target]] variables = { base_url = "https://…" }`) becomes
-- `web.base.url` when it is set; without it, `web.base.url` is left as it was.

-- True when public.<tbl> exists and, if `col` is given, has that column.
CREATE FUNCTION pg_temp.pgferry_has(tbl text, col text DEFAULT NULL) RETURNS boolean
LANGUAGE sql STABLE AS $fn$
    SELECT to_regclass('public.' || quote_ident(tbl)) IS NOT NULL
       AND (col IS NULL OR EXISTS (
               SELECT 1 FROM pg_attribute
                WHERE attrelid = to_regclass('public.' || quote_ident(tbl))
                  AND attname = col AND attnum > 0 AND NOT attisdropped))
$fn$;

DO $$
DECLARE
    base_url text := nullif(current_setting('pgferry.base_url', true), '');
BEGIN
    -- Outgoing and incoming mail (base, mail, fetchmail).
    IF pg_temp.pgferry_has('ir_mail_server', 'active') THEN
        UPDATE ir_mail_server SET active = false WHERE active;
    END IF;
    IF pg_temp.pgferry_has('mail_template', 'mail_server_id') THEN
        UPDATE mail_template SET mail_server_id = NULL WHERE mail_server_id IS NOT NULL;
    END IF;
    IF pg_temp.pgferry_has('fetchmail_server', 'active') THEN
        UPDATE fetchmail_server SET active = false WHERE active;
    END IF;

    -- Scheduled actions, but the autovacuum (it only cleans up, and Odoo keeps it too).
    IF pg_temp.pgferry_has('ir_cron', 'active') THEN
        IF pg_temp.pgferry_has('ir_model_data', 'res_id') THEN
            UPDATE ir_cron SET active = false
             WHERE active
               AND id NOT IN (SELECT res_id FROM ir_model_data
                               WHERE model = 'ir.cron' AND module = 'base'
                                 AND name = 'autovacuum_job' AND res_id IS NOT NULL);
        ELSE
            UPDATE ir_cron SET active = false WHERE active;
        END IF;
    END IF;

    -- Automations triggered by an incoming webhook (base_automation, Odoo 17+): the copy
    -- must not act on the production integrations' calls.
    IF pg_temp.pgferry_has('base_automation', 'trigger') THEN
        UPDATE base_automation SET active = false WHERE "trigger" = 'on_webhook' AND active;
    END IF;

    -- Payment providers in test mode: `is_live` (Odoo 18+), `state` (16, 17).
    IF pg_temp.pgferry_has('payment_provider', 'is_live') THEN
        UPDATE payment_provider SET is_live = false WHERE is_live;
    END IF;
    IF pg_temp.pgferry_has('payment_provider', 'state') THEN
        UPDATE payment_provider SET state = 'test' WHERE state = 'enabled';
    END IF;

    -- Delivery carriers in test mode (delivery).
    IF pg_temp.pgferry_has('delivery_carrier', 'prod_environment') THEN
        UPDATE delivery_carrier SET prod_environment = false WHERE prod_environment;
    END IF;

    -- E-invoicing proxy users in test/demo mode (account_edi_proxy_client); the Malaysian
    -- and Greek ones are left to their own modules, as Odoo does.
    IF pg_temp.pgferry_has('account_edi_proxy_client_user', 'edi_mode')
       AND pg_temp.pgferry_has('account_edi_proxy_client_user', 'proxy_type') THEN
        UPDATE account_edi_proxy_client_user
           SET edi_mode = CASE WHEN proxy_type IN ('l10n_it_edi', 'peppol', 'nemhandel', 'pdp')
                               THEN 'demo' ELSE 'test' END
         WHERE proxy_type NOT IN ('l10n_my_edi', 'l10n_gr_edi');
    END IF;

    -- In-app purchase accounts cannot spend production credit (iap).
    IF pg_temp.pgferry_has('iap_account', 'account_token') THEN
        UPDATE iap_account
           SET account_token = regexp_replace(account_token, '([+].*)?$', '+disabled')
         WHERE account_token IS NOT NULL;
    END IF;

    -- Calendar synchronisation: no tokens, so the copy cannot write to users' calendars.
    IF pg_temp.pgferry_has('res_users_settings', 'google_calendar_token') THEN
        UPDATE res_users_settings
           SET google_calendar_token = NULL, google_calendar_rtoken = NULL;
    END IF;
    IF pg_temp.pgferry_has('res_users', 'microsoft_calendar_token') THEN
        UPDATE res_users SET microsoft_calendar_token = NULL, microsoft_calendar_rtoken = NULL
         WHERE microsoft_calendar_token IS NOT NULL OR microsoft_calendar_rtoken IS NOT NULL;
    END IF;
    IF pg_temp.pgferry_has('res_users_settings', 'microsoft_calendar_sync_token') THEN
        UPDATE res_users_settings
           SET microsoft_calendar_sync_token = NULL, microsoft_synchronization_stopped = true,
               microsoft_last_sync_date = NULL;
    END IF;

    -- Websites: no production domain, no CDN, no indexing, and the "neutralized" ribbon.
    IF pg_temp.pgferry_has('website', 'domain') THEN
        UPDATE website SET domain = NULL WHERE domain IS NOT NULL;
    END IF;
    IF pg_temp.pgferry_has('website', 'cdn_activated') THEN
        UPDATE website SET cdn_activated = false WHERE cdn_activated;
    END IF;
    IF pg_temp.pgferry_has('website', 'robots_txt') THEN
        UPDATE website SET robots_txt = E'User-agent: *\nDisallow: /';
    END IF;
    IF pg_temp.pgferry_has('ir_ui_view', 'key') THEN
        UPDATE ir_ui_view SET active = true WHERE key = 'website.neutralize_ribbon';
    END IF;

    -- Compiled CSS/JS bundles: Odoo rebuilds missing ones on the next page load, whereas
    -- stale rows point at files the staging filestore may not have (a blank UI).
    IF pg_temp.pgferry_has('ir_attachment', 'url') THEN
        DELETE FROM ir_attachment WHERE url LIKE '/web/assets/%';
    END IF;

    IF pg_temp.pgferry_has('ir_config_parameter', 'value') THEN
        -- The copy's identity, as Odoo's duplicate resets it: a new uuid (so the copy does
        -- not pose as production to Odoo's services) and a new secret (signed links and
        -- sessions of production are not valid here); no enterprise code.
        DELETE FROM ir_config_parameter
         WHERE key IN ('database.uuid', 'database.secret', 'database.create_date',
                       'database.enterprise_code', 'database.is_neutralized',
                       'pgferry.neutralized', 'cloud_storage_provider',
                       'sms.endpoint', 'snailmail.endpoint');
        INSERT INTO ir_config_parameter (key, value)
        -- (gen_random_uuid(), PostgreSQL 13+, draws from the strong random source, as a
        -- secret must; random() would not.)
        VALUES ('database.uuid', gen_random_uuid()::text),
               ('database.secret', gen_random_uuid()::text),
               ('database.create_date', to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS')),
               -- Text messages and letters go to Odoo's test service (sms, snailmail).
               ('sms.endpoint', 'https://iap-services-test.odoo.com'),
               ('snailmail.endpoint', 'https://iap-services-test.odoo.com'),
               -- The markers Odoo 16+ and operators look for.
               ('database.is_neutralized', 'True'),
               ('pgferry.neutralized', now()::text);
        IF base_url IS NOT NULL THEN
            DELETE FROM ir_config_parameter WHERE key = 'web.base.url';
            INSERT INTO ir_config_parameter (key, value) VALUES ('web.base.url', base_url);
        END IF;
    END IF;
END
$$;

DROP FUNCTION pg_temp.pgferry_has(text, text);

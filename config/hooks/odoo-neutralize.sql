-- Neutralize a restored Odoo database before anyone can reach it: no mail goes out, no mail
-- is fetched, no scheduled action runs. pgferry runs this in the temporary database, in one
-- transaction, before swapping it in. Tables that do not exist are skipped, so the hook also
-- runs on a non-Odoo database.
DO $$
BEGIN
    IF to_regclass('public.ir_mail_server') IS NOT NULL THEN
        UPDATE ir_mail_server SET active = false;
    END IF;
    IF to_regclass('public.fetchmail_server') IS NOT NULL THEN
        UPDATE fetchmail_server SET active = false;
    END IF;
    IF to_regclass('public.ir_cron') IS NOT NULL THEN
        UPDATE ir_cron SET active = false;
    END IF;
    IF to_regclass('public.ir_config_parameter') IS NOT NULL THEN
        -- No enterprise code (the copy must not register as production) and the markers
        -- Odoo 16+ (`database.is_neutralized`) and operators (`pgferry.neutralized`) look for.
        DELETE FROM ir_config_parameter
         WHERE key IN ('database.enterprise_code', 'database.is_neutralized', 'pgferry.neutralized');
        INSERT INTO ir_config_parameter (key, value)
        VALUES ('database.is_neutralized', 'True'), ('pgferry.neutralized', now()::text);
    END IF;
END
$$;

-- Schema version 17: each device's serial again in a narrow table of its own, indexed by
-- trigrams (pg_trgm), so that a search anywhere in a serial (`q=` on the lists and pages)
-- reads an index instead of every device row. A table of its own because a check-in's report
-- writes its device's row again (its time seen is indexed), which writes every index on
-- `devices` again: a trigram index there doubled the cost of each report. Serials never
-- change; a trigger adds a new device's, and a deleted device's goes with it.
CREATE TABLE device_serials (
    device_id BIGINT PRIMARY KEY REFERENCES devices(id) ON DELETE CASCADE,
    serial TEXT NOT NULL
);
INSERT INTO device_serials (device_id, serial) SELECT id, serial FROM devices;
CREATE FUNCTION device_serials_add() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO device_serials (device_id, serial) VALUES (NEW.id, NEW.serial);
    RETURN NULL;
END
$$;
CREATE TRIGGER devices_serials AFTER INSERT ON devices
    FOR EACH ROW EXECUTE FUNCTION device_serials_add();
-- pg_trgm ships with PostgreSQL and is a trusted extension (a database owner may create it);
-- where it cannot be created, a search scans the narrow table instead.
DO $$
BEGIN
    CREATE EXTENSION IF NOT EXISTS pg_trgm;
    CREATE INDEX device_serials_trgm ON device_serials USING gin (serial gin_trgm_ops);
EXCEPTION WHEN OTHERS THEN
    RAISE NOTICE 'pg_trgm is not available (%): serial searches scan device_serials', SQLERRM;
END
$$;

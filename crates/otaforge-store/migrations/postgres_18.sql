-- Schema version 18: each device's time seen in a narrow table of its own. Every check-in
-- reports it, and it is indexed (the lists sort and filter by it): on `devices` each report
-- wrote a new version of the whole row and an entry in each of its eight indexes. Here a
-- report writes a row of three numbers and two index entries, and the device's own row only
-- when something else it reported changed (then in place: no indexed column of it changes
-- from one poll to the next). A trigger adds a new device's row; a deleted device's goes with
-- it. The product is copied so that a list in order of time seen walks this table's index.
CREATE TABLE device_seen (
    device_id BIGINT PRIMARY KEY REFERENCES devices(id) ON DELETE CASCADE,
    seen_product BIGINT NOT NULL,
    last_seen BIGINT
);
INSERT INTO device_seen (device_id, seen_product, last_seen)
    SELECT id, product_id, last_seen FROM devices;
CREATE INDEX device_seen_order ON device_seen (seen_product, (COALESCE(last_seen, 0)), device_id);
DROP INDEX devices_product_seen;
ALTER TABLE devices DROP COLUMN last_seen;
CREATE FUNCTION device_seen_add() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO device_seen (device_id, seen_product) SELECT id, product_id FROM added;
    RETURN NULL;
END
$$;
CREATE TRIGGER devices_seen AFTER INSERT ON devices REFERENCING NEW TABLE AS added
    FOR EACH STATEMENT EXECUTE FUNCTION device_seen_add();

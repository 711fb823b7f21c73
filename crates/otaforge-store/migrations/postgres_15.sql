-- The chip family a device's check-ins announce (esp32, esp8266, w800, swupdate, mender),
-- for lists filtered by chip.
ALTER TABLE devices ADD COLUMN chip TEXT;
CREATE INDEX devices_product_chip ON devices (product_id, chip);

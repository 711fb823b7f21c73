-- Schema version 12: indexes for paged, filtered and counted lists at a million devices.
CREATE INDEX devices_product_seen ON devices(product_id, (COALESCE(last_seen, 0)), id);
CREATE INDEX devices_product_id ON devices(product_id, id);
CREATE INDEX devices_tally ON devices(product_id, group_id, status, version);
CREATE INDEX devices_product_version ON devices(product_id, version);
CREATE INDEX rollout_devices_stage ON rollout_devices(rollout_id, stage, device_id);

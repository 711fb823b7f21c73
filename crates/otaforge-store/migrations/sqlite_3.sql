-- Schema version 3: staged rollouts, device update events, the audit log.
CREATE TABLE rollouts (
    id INTEGER PRIMARY KEY,
    product_id BIGINT NOT NULL REFERENCES products(id) ON DELETE CASCADE,
    firmware_id BIGINT NOT NULL REFERENCES firmware(id),
    target TEXT NOT NULL,
    stages TEXT NOT NULL,
    rate_per_minute BIGINT,
    state TEXT NOT NULL,
    current_stage BIGINT NOT NULL,
    stage_started_at BIGINT NOT NULL,
    rolled_back_stages TEXT NOT NULL,
    message TEXT NOT NULL,
    created_by TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);
CREATE TABLE rollout_devices (
    rollout_id BIGINT NOT NULL REFERENCES rollouts(id) ON DELETE CASCADE,
    device_id BIGINT NOT NULL REFERENCES devices(id) ON DELETE CASCADE,
    stage BIGINT NOT NULL,
    state TEXT NOT NULL,
    from_version TEXT,
    offered_at BIGINT,
    updated_at BIGINT NOT NULL,
    message TEXT NOT NULL,
    PRIMARY KEY (rollout_id, device_id)
);
CREATE INDEX rollout_devices_device ON rollout_devices(device_id);
CREATE TABLE device_events (
    id INTEGER PRIMARY KEY,
    device_id BIGINT NOT NULL REFERENCES devices(id) ON DELETE CASCADE,
    at BIGINT NOT NULL,
    kind TEXT NOT NULL,
    detail TEXT NOT NULL
);
CREATE INDEX device_events_device ON device_events(device_id, id);
CREATE TABLE audit_log (
    id INTEGER PRIMARY KEY,
    at BIGINT NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    subject TEXT NOT NULL,
    detail TEXT NOT NULL
);

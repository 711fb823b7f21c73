-- Schema version 2: the web platform (sessions, sketches, builds, per-device firmware, Wi-Fi).
CREATE TABLE sessions (
    digest TEXT PRIMARY KEY,
    user_id BIGINT REFERENCES users(id) ON DELETE CASCADE,
    device_id BIGINT REFERENCES devices(id) ON DELETE CASCADE,
    csrf TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL
);
ALTER TABLE devices ADD COLUMN firmware_id BIGINT REFERENCES firmware(id);
ALTER TABLE devices ADD COLUMN secrets TEXT;
CREATE TABLE sketch_revisions (
    id INTEGER PRIMARY KEY,
    device_id BIGINT NOT NULL REFERENCES devices(id) ON DELETE CASCADE,
    fqbn TEXT NOT NULL,
    files TEXT NOT NULL,
    author TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE INDEX sketch_revisions_device ON sketch_revisions(device_id, id);
CREATE TABLE builds (
    id INTEGER PRIMARY KEY,
    product_id BIGINT REFERENCES products(id) ON DELETE CASCADE,
    device_id BIGINT REFERENCES devices(id) ON DELETE SET NULL,
    fqbn TEXT NOT NULL,
    files TEXT NOT NULL,
    status TEXT NOT NULL,
    log TEXT NOT NULL,
    diagnostics TEXT NOT NULL,
    firmware_id BIGINT REFERENCES firmware(id) ON DELETE SET NULL,
    worker TEXT,
    requested_by TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    started_at BIGINT,
    finished_at BIGINT
);
CREATE INDEX builds_status ON builds(status, id);

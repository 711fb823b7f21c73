-- Schema version 1 for SQLite. Integers are BIGINT, timestamps are Unix milliseconds,
-- booleans are 0/1, JSON is TEXT: the same column types as the PostgreSQL schema.
CREATE TABLE users (
    id INTEGER PRIMARY KEY,
    username TEXT NOT NULL UNIQUE,
    password_hash TEXT NOT NULL,
    is_admin BIGINT NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE TABLE api_tokens (
    digest TEXT PRIMARY KEY,
    user_id BIGINT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    created_at BIGINT NOT NULL
);
CREATE TABLE products (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    api_key_digest TEXT NOT NULL UNIQUE,
    default_group_id BIGINT NOT NULL DEFAULT 0,
    created_at BIGINT NOT NULL
);
CREATE TABLE firmware (
    id INTEGER PRIMARY KEY,
    product_id BIGINT NOT NULL REFERENCES products(id) ON DELETE CASCADE,
    version TEXT NOT NULL,
    size BIGINT NOT NULL,
    md5 TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    format TEXT NOT NULL,
    metadata TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    UNIQUE (product_id, version)
);
CREATE INDEX firmware_sha256 ON firmware(sha256);
CREATE TABLE device_groups (
    id INTEGER PRIMARY KEY,
    product_id BIGINT NOT NULL REFERENCES products(id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    is_default BIGINT NOT NULL,
    firmware_id BIGINT REFERENCES firmware(id),
    config TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    UNIQUE (product_id, name)
);
CREATE TABLE devices (
    id INTEGER PRIMARY KEY,
    product_id BIGINT NOT NULL REFERENCES products(id) ON DELETE CASCADE,
    group_id BIGINT NOT NULL REFERENCES device_groups(id),
    serial TEXT NOT NULL,
    status TEXT NOT NULL,
    password_hash TEXT,
    created_at BIGINT NOT NULL,
    last_seen BIGINT,
    version TEXT,
    sketch_md5 TEXT,
    sta_mac TEXT,
    ap_mac TEXT,
    free_space BIGINT,
    chip_size BIGINT,
    sdk_version TEXT,
    UNIQUE (product_id, serial)
);
CREATE INDEX devices_group ON devices(group_id);
CREATE TABLE resources (
    id INTEGER PRIMARY KEY,
    group_id BIGINT NOT NULL REFERENCES device_groups(id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    fk TEXT NOT NULL UNIQUE,
    size BIGINT NOT NULL,
    md5 TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    UNIQUE (group_id, name)
);
CREATE INDEX resources_sha256 ON resources(sha256);

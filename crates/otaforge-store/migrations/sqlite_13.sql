-- Schema version 13: what lets every process sharing the database keep its caches right.
-- `cache_generation` grows with every management write (a process seeing it change forgets
-- its caches); `device_changes` lists devices whose rows changed (a process forgets those).
CREATE TABLE cache_generation (
    id INTEGER PRIMARY KEY,
    n BIGINT NOT NULL
);
INSERT INTO cache_generation (id, n) VALUES (1, 0);
CREATE TABLE device_changes (
    seq INTEGER PRIMARY KEY,
    product_id BIGINT NOT NULL,
    serial TEXT NOT NULL,
    at BIGINT NOT NULL
);

-- Several nodes on one database: leases (one node evaluates rollout gates at a time) and
-- counting windows shared by every node (sign-in limits, rollout rate caps).
CREATE TABLE leases (
    name TEXT PRIMARY KEY,
    holder TEXT NOT NULL,
    until BIGINT NOT NULL
);
CREATE TABLE count_windows (
    key TEXT PRIMARY KEY,
    since BIGINT NOT NULL,
    count BIGINT NOT NULL
);
CREATE INDEX count_windows_since ON count_windows (since);

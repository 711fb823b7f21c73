-- Operator roles: admin (everything, accounts too), operator (fleet changes), viewer (looks
-- only). Accounts made before roles keep what is_admin said.
ALTER TABLE users ADD COLUMN role TEXT NOT NULL DEFAULT 'operator'
    CHECK (role IN ('admin', 'operator', 'viewer'));
UPDATE users SET role = 'admin' WHERE is_admin <> 0;

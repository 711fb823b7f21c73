-- The key digests (hex SHA-256 of the public key) a product's firmware must be signed with
-- (ESP-IDF Secure Boot V2); an empty list: signatures are checked when present, not required.
ALTER TABLE products ADD COLUMN firmware_keys TEXT NOT NULL DEFAULT '[]';

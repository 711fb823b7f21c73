-- Schema version 10: the public keys (PEM, a JSON array) a product's Linux artifacts must be
-- signed with; empty: signatures are reported, not required.
ALTER TABLE products ADD COLUMN artifact_keys TEXT NOT NULL DEFAULT '[]';

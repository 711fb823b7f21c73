-- Schema version 4: bearer tokens expire (tokens issued before this version get 30 days
-- from their creation).
ALTER TABLE api_tokens ADD COLUMN expires_at BIGINT NOT NULL DEFAULT 0;
UPDATE api_tokens SET expires_at = created_at + 2592000000;

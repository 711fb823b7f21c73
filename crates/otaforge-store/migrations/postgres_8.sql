-- Schema version 8: the public key a device signs its authentication requests with (Mender),
-- PEM; bound on its first request.
ALTER TABLE devices ADD COLUMN public_key TEXT;

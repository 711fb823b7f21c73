-- Schema version 9: the firmware a hawkBit client was offered and has not finished with (its
-- open action); when it is no longer offered, the client is told to cancel it.
ALTER TABLE devices ADD COLUMN open_firmware_id BIGINT;

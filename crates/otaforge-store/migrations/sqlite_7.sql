-- Schema version 7: the firmware whose offer the device closed without installing it (a
-- hawkBit action closed with failure, cancelled or rejected): it is not offered again.
ALTER TABLE devices ADD COLUMN closed_firmware_id BIGINT;
